"""Run manifest cases as kvmsplit scenarios, into the same results model as
`kvmsplit run`.

Each case runs alone under the kernel-log guard, so a kernel report is
attributed to the test that caused it. results.json is rewritten after every
case: an interrupt keeps what finished, and the case in flight is an ERROR.
Each case's full output (both streams, interleaved) is kept in logs/ next to
results.json; results.json holds the parsed parts and the tails.
"""
from __future__ import annotations

import json
import re
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from kvmsplit.host.changes import HostChanges
from kvmsplit.host.facts import HostFacts
from kvmsplit.kernellog import KernelLogGuard
from kvmsplit.runs.loop import run_items
from kvmsplit.runs.results import ERROR, SKIP, RunResult, ScenarioResult
from kvmsplit.runs.sinks import ResultSink
from kvmsplit.selftests import process
from kvmsplit.selftests.build import SelftestBuild
from kvmsplit.selftests.manifest import HUGEPAGE_SIZES, SelftestCase
from kvmsplit.selftests.verdict import record
from kvmsplit.syscalls import logging_windows


def log_name(case: SelftestCase) -> str:
    return "logs/" + re.sub(r"[^\w.=+-]+", "_", case.name).strip("_") + ".log"


def _skip(res: ScenarioResult, why: str) -> ScenarioResult:
    res.verdict, res.reasons, res.duration_s = SKIP, [why], 0.0
    return res


def traced(command: list[str], trace_json: Path) -> list[str]:
    """The same command under `kvmsplit trace` (ptrace): its exit code and output pass through."""
    return [sys.executable, "-m", "kvmsplit", "trace", "-q", "--no-summary", "-o", str(trace_json), "--", *command]


def _read_trace(res: ScenarioResult, path: Path) -> None:
    try:
        res.extra["vmm_trace"] = {"kselftest": logging_windows(json.loads(path.read_text()))}
    except (OSError, ValueError) as e:
        res.extra["vmm_trace"] = {"kselftest": {"error": f"no trace: {getattr(e, 'strerror', None) or e}"}}


def run_case(case: SelftestCase, build: SelftestBuild, facts: HostFacts, host: HostChanges,
             outdir: Path, *, accept_user_log: bool = False, trace: bool = False) -> ScenarioResult:
    res = ScenarioResult(name=case.name, scenario=case.to_dict())
    res.started = time.time()
    binary = build.binary(case.test)
    res.extra = {"command": [str(binary), *case.args], "build": build.to_dict()}
    if not binary.exists():
        return _skip(res, f"the KVM selftests of {build.version} have no {case.test}")
    why = case.unmet(facts)
    for size, count in case.hugepages.items():
        why = why or host.ensure_hugepages(HUGEPAGE_SIZES[size], count)
    if why:
        return _skip(res, why)

    log = outdir / log_name(case)
    log.parent.mkdir(parents=True, exist_ok=True)
    res.extra["log"] = log_name(case)
    guard = KernelLogGuard(accept_user=accept_user_log)
    guard.start()
    try:
        # cwd: a crashing test's core file (core_pattern permitting) lands next
        # to its log, not in the user's working directory
        trace_json = log.with_suffix(".trace.json")
        command = traced(res.extra["command"], trace_json) if trace else res.extra["command"]
        proc = process.run(command, case.timeout, log=log, cwd=log.parent)
    except OSError as e:       # it could not even start: not executable, wrong architecture
        res.verdict, res.reasons, res.duration_s = ERROR, [f"cannot run {binary}: {e.strerror}"], 0.0
        return res
    finally:
        res.kernel_log = guard.stop().to_dict()
    record(res, proc, case.timeout)
    if trace:
        _read_trace(res, trace_json)
    return res


class SelftestBackend:
    """The kernel's selftests as a run-loop backend (runs.loop.Backend)."""
    kind = "kselftest"

    def __init__(self, cases: list[SelftestCase], build: SelftestBuild, facts: HostFacts, outdir: Path, *,
                 accept_user_log: bool = False, trace: bool = False,
                 on_start: Callable[[SelftestCase], None] | None = None):
        self.cases, self.build, self.facts, self.outdir = cases, build, facts, outdir
        self.accept_user_log, self.on_start, self.trace = accept_user_log, on_start, trace

    def plan(self) -> list[tuple[str, dict]]:
        return [(c.name, c.to_dict()) for c in self.cases]

    def run_one(self, index: int, host: HostChanges, rr: RunResult) -> ScenarioResult:
        if self.on_start:
            self.on_start(self.cases[index])
        return run_case(self.cases[index], self.build, self.facts, host, self.outdir,
                        accept_user_log=self.accept_user_log, trace=self.trace)

    def close(self) -> None:
        pass


def run_selftests(cases: list[SelftestCase], build: SelftestBuild, facts: HostFacts, outdir: Path, *,
                  allow_host_changes: bool = True, wait_for_host: bool = True, accept_user_log: bool = False,
                  argv: list[str] | None = None, trace: bool = False,
                  on_start: Callable[[SelftestCase], None] | None = None,
                  on_result: Callable[[int, ScenarioResult], None] | None = None,
                  sinks: Sequence[ResultSink] = ()) -> RunResult:
    backend = SelftestBackend(cases, build, facts, outdir, accept_user_log=accept_user_log, trace=trace,
                              on_start=on_start)
    return run_items(backend, facts, outdir, allow_host_changes=allow_host_changes, wait_for_host=wait_for_host,
                     argv=argv,
                     on_result=on_result, sinks=sinks)
