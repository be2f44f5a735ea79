"""A run as a person names it: a history id, a results.json, or a run id."""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

from kvmsplit.errors import NoInputError
from kvmsplit.runs.digest import results_source
from kvmsplit.runs.history.db import History
from kvmsplit.runs.results import RunResult
from kvmsplit.runs.schema import load_results, results_path


def fmt_time(ts: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M", time.localtime(ts))


@dataclass
class LoadedRun:
    rr: RunResult
    ref: str                    # how to name it to a person: "run 12" or the file
    source: str                 # how `kvmsplit rerun` takes it (digest.rerun_command)
    path: Path | None = None    # the results.json, when it came from one


def open_run(ref: str, history: History) -> LoadedRun:
    """RUN: a history id (as `kvmsplit history` lists), a results.json or its
    directory, or a RunResult.run_id stored in the history."""
    if ref.isdigit():
        pk = int(ref)
        return LoadedRun(history.load(pk), f"run {pk}", history.run_source(pk))
    p = results_path(ref)
    if p.exists() or ref.endswith(".json") or "/" in ref:
        return LoadedRun(load_results(p), str(p), results_source(p), p)
    found = history.find(ref)
    if found is None:
        raise NoInputError(f"{ref}: neither a results file nor a run in {history.path}")
    return LoadedRun(history.load(found), f"run {found}", history.run_source(found))
