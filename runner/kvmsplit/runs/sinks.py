"""Result sinks: things that keep a run's results as they come (report files,
the history database, KTAP on stdout). The run loop calls them after
results.json is written, so a sink that fails never loses results, and one
sink's failure never stops the others or the run."""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Protocol

from kvmsplit.runs.results import RunResult


class ResultSink(Protocol):
    def started(self, rr: RunResult, outdir: Path) -> None: ...
    def scenario_done(self, rr: RunResult, index: int, outdir: Path) -> None: ...
    def finished(self, rr: RunResult, outdir: Path) -> None: ...


def warn(what: str, e: BaseException) -> None:
    print(f"kvmsplit: warning: {what}: {e}", file=sys.stderr)


def notify(sinks, event: str, *args) -> None:
    """Call `event` on every sink; an exception in one is a warning, not the end of the run."""
    for sink in sinks:
        try:
            getattr(sink, event)(*args)
        except Exception as e:
            warn(f"{type(sink).__name__}.{event} failed", e)
