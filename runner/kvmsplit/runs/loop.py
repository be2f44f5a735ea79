"""The run loop every backend shares, and keeping its results safe.

results.json is rewritten after every item, so Ctrl-C, SIGTERM or a crash
loses at most the item in flight, and that one is recorded as ERROR with the
phase it was in. Host changes are restored on every exit path.
"""
from __future__ import annotations

import sys
import time
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Protocol

from kvmsplit import __version__
from kvmsplit.host.changes import HostChanges
from kvmsplit.host.facts import HostFacts
from kvmsplit.runs.results import RunResult, ScenarioResult, Verdict
from kvmsplit.runs.sinks import ResultSink, notify


class Backend(Protocol):
    """Something that runs items and yields one result each: kvmsplit's own
    scenarios on /dev/kvm, the kernel's selftests, and later ones (nested
    guests, QEMU) plug in here without touching the loop."""

    kind: str

    def plan(self) -> list[tuple[str, dict]]:
        """(name, definition) of every item, in order; each starts as MISS."""
        ...

    def run_one(self, index: int, host: HostChanges, rr: RunResult) -> ScenarioResult:
        """Run one item. It may put its in-progress result into
        rr.scenarios[index] first, so an interrupt records the phase it was in."""
        ...

    def close(self) -> None: ...


def run_items(backend: Backend, facts: HostFacts, outdir: Path, *,
              allow_host_changes: bool = True, wait_for_host: bool = True, argv: list[str] | None = None,
              on_result: Callable[[int, ScenarioResult], None] | None = None,
              sinks: Sequence[ResultSink] = ()) -> RunResult:
    rr = RunResult(host=facts.to_dict(), argv=list(argv if argv is not None else sys.argv),
                   kvmsplit_version=__version__)
    rr.scenarios = [ScenarioResult(name=name, scenario=d) for name, d in backend.plan()]
    rr.write(outdir)
    notify(sinks, "started", rr, outdir)
    current = None
    try:
        with HostChanges(allowed=allow_host_changes, wait=wait_for_host) as host:
            rr.host_changes = host.log
            for i in range(len(rr.scenarios)):
                current = i
                rr.scenarios[i] = _run_one(backend, i, host, rr)
                current = None
                rr.done(i)
                rr.write(outdir)
                notify(sinks, "scenario_done", rr, i, outdir)
                if on_result:
                    on_result(i, rr.scenarios[i])
    except BaseException:
        rr.interrupted = True
        if current is not None:
            r = rr.scenarios[current]
            if r.verdict is Verdict.MISS:
                r.verdict = Verdict.ERROR
                r.reasons = r.reasons or ["interrupted"]
        raise
    finally:
        backend.close()
        rr.finished = time.time()
        rr.write(outdir)
        notify(sinks, "finished", rr, outdir)
    return rr


def _run_one(backend: Backend, i: int, host: HostChanges, rr: RunResult) -> ScenarioResult:
    """One item; a bug in kvmsplit (any exception the backend did not turn
    into a verdict) is an ERROR for this item with its traceback, and the run
    goes on. Ctrl-C and SIGTERM (BaseException) still end the run."""
    try:
        return backend.run_one(i, host, rr)
    except Exception as e:      # what reaches here is a kvmsplit bug, by definition
        r = rr.scenarios[i]      # the backend's in-progress result, if it put one there
        phase = f" in phase {r.error_phase}" if r.error_phase else ""
        r.verdict, r.reasons = Verdict.ERROR, [f"internal error{phase}: {type(e).__name__}: {e}"]
        r.extra["internal_error"] = traceback.format_exc()
        return r


def replay(rr: RunResult, outdir: Path, sinks: Sequence[ResultSink]) -> None:
    """Give sinks a run that was produced elsewhere (inside `kvmsplit vm`), as
    if it had run here: the same files and history rows."""
    notify(sinks, "started", rr, outdir)
    for i in range(len(rr.scenarios)):
        notify(sinks, "scenario_done", rr, i, outdir)
    notify(sinks, "finished", rr, outdir)
