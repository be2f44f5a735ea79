"""HistorySink: the run loop's way into the history database."""
from __future__ import annotations

from pathlib import Path

from kvmsplit.errors import BadInputError
from kvmsplit.runs.history.db import History
from kvmsplit.runs.results import RunResult
from kvmsplit.runs.sinks import warn


class HistorySink:
    """Records a run into the history as it goes (a suite.ResultSink)."""

    def __init__(self, history: History):
        self.history = history
        self.pk: int | None = None

    def started(self, rr: RunResult, outdir: Path) -> None:
        try:
            self.pk = self.history.add_run(rr, outdir.resolve())
        except BadInputError as e:
            warn("history not recorded", e)

    def scenario_done(self, rr: RunResult, index: int, outdir: Path) -> None:
        if self.pk is not None:
            try:
                self.history.update_scenario(self.pk, index, rr.scenarios[index])
            except BadInputError as e:
                warn("history not updated", e)

    def finished(self, rr: RunResult, outdir: Path) -> None:
        if self.pk is not None:
            try:
                self.history.finish_run(self.pk, rr)
            except BadInputError as e:
                warn("history not updated", e)
