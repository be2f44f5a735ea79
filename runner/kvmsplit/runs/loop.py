"""Run a list of scenarios and keep the results safe.

results.json is rewritten after every scenario, so Ctrl-C, SIGTERM or a
crash loses at most the scenario in flight, and that one is recorded as
ERROR with the phase it was in. Host changes are restored on every exit path.
"""
from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Callable, Protocol

from kvmsplit import __version__
from kvmsplit.scenario.engine import RunOptions, ScenarioRun
from kvmsplit.vmm.guest.build import guest_image
from kvmsplit.host.changes import HostChanges
from kvmsplit.vmm.kvm import Kvm
from kvmsplit.runs.results import ERROR, MISS, RunResult, ScenarioResult
from kvmsplit.scenario.model import Scenario


class ResultSink(Protocol):
    """Something that keeps results as they come (report files, the history
    database). Called after results.json is written, so a sink that fails
    never loses results."""

    def started(self, rr: RunResult, outdir: Path) -> None: ...
    def scenario_done(self, rr: RunResult, index: int, outdir: Path) -> None: ...
    def finished(self, rr: RunResult, outdir: Path) -> None: ...


def run_items(entries: list[tuple[str, dict]], run_one: Callable, facts: dict, outdir: Path, *,
              allow_host_changes: bool = True, argv: list[str] | None = None,
              on_result: Callable[[int, ScenarioResult], None] | None = None,
              sinks: list[ResultSink] = ()) -> RunResult:
    """The loop every backend shares: entries (name, definition) start as
    MISS, run_one(index, host, rr) runs one and returns its result (it may put
    its in-progress result into rr.scenarios[index] first, so an interrupt
    records the phase it was in)."""
    rr = RunResult(host=facts, argv=list(argv if argv is not None else sys.argv),
                   kvmsplit_version=__version__)
    rr.scenarios = [ScenarioResult(name=name, scenario=d) for name, d in entries]
    rr.write(outdir)
    for sink in sinks:
        sink.started(rr, outdir)
    current = None
    try:
        with HostChanges(allowed=allow_host_changes) as host:
            rr.host_changes = host.log
            for i in range(len(entries)):
                current = i
                rr.scenarios[i] = run_one(i, host, rr)
                current = None
                rr.write(outdir)
                for sink in sinks:
                    sink.scenario_done(rr, i, outdir)
                if on_result:
                    on_result(i, rr.scenarios[i])
    except BaseException:
        rr.interrupted = True
        if current is not None:
            r = rr.scenarios[current]
            if r.verdict == MISS:
                r.verdict = ERROR
                r.reasons = r.reasons or ["interrupted"]
        raise
    finally:
        rr.finished = time.time()
        rr.write(outdir)
        for sink in sinks:
            sink.finished(rr, outdir)
    return rr


def run_suite(scenarios: list[Scenario], facts: dict, outdir: Path, *,
              options: RunOptions | None = None, allow_host_changes: bool = True,
              argv: list[str] | None = None,
              on_result: Callable[[int, ScenarioResult], None] | None = None,
              sinks: list[ResultSink] = ()) -> RunResult:
    """kvmsplit's own scenarios on /dev/kvm."""
    options = options or RunOptions()
    image = guest_image()
    kvm = Kvm()

    def run_one(i: int, host, rr: RunResult) -> ScenarioResult:
        run = ScenarioRun(scenarios[i], facts, image, host, kvm, options)
        rr.scenarios[i] = run.res      # so an interrupt records the phase
        return run.run()

    try:
        return run_items([(s.name, s.to_dict()) for s in scenarios], run_one, facts, outdir,
                         allow_host_changes=allow_host_changes, argv=argv, on_result=on_result,
                         sinks=sinks)
    finally:
        kvm.close()
