"""Results as KTAP v1 (Documentation/dev-tools/ktap.rst), the format kernel
CI already parses for kselftest and KUnit.

One test per scenario. Diagnostic lines come before the result line they
explain (reasons, kernel report titles, the rerun command); directives:
SKIP for a skipped scenario, ERROR for one the run itself broke or never
reached (an interrupted run is not ok: nothing vouches for what did not run),
UNCONFIRMED for one where nothing failed but a witness was missing (not ok:
a CI box must not read it as a pass).
"""
from __future__ import annotations

from typing import TextIO

from kvmsplit.kernellog import corrupted_note
from kvmsplit.runs.digest import failed, host_name, kernel_release, reports, rerun_command, results_source, series_label
from kvmsplit.runs.results import ERROR, FAIL, MISS, PASS, SKIP, UNCONFIRMED, RunResult, ScenarioResult


def header(rr: RunResult) -> list[str]:
    what = f"# kvmsplit {rr.kvmsplit_version} on {host_name(rr)}, kernel {kernel_release(rr)}"
    if rr.series:
        what += f", series {series_label(rr.series)}"
    return ["KTAP version 1", what, f"1..{len(rr.scenarios)}"]


def _line(text: str) -> str:
    return " ".join(text.split())


def _clean(text: str) -> str:
    """On a result line '#' would start the directive early."""
    return _line(text.replace("#", ""))


def result(sr: ScenarioResult, number: int, source: str) -> list[str]:
    """The diagnostic lines, then the result line. A SKIP or ERROR carries its
    first reason in the directive, and a kernel report title already quoted
    by a reason is not repeated."""
    in_directive = sr.verdict in (SKIP, ERROR, UNCONFIRMED) and sr.reasons
    why = _clean(sr.reasons[0]) if in_directive else ""
    diag = [f"# {_line(r)}" for r in sr.reasons[1 if in_directive else 0:]]
    diag += [f"# kernel: {_line(rep.get('title', '') + corrupted_note(rep))}" for rep in reports(sr)
             if rep.get("corrupted") or not any(rep.get("title", "") in r for r in sr.reasons)]
    if failed(sr):
        diag.append(f"# rerun: {rerun_command(source, sr.name)}")
    name = _clean(sr.name)
    line = {
        PASS: f"ok {number} {name}",
        SKIP: f"ok {number} {name} # SKIP {why}".rstrip(),
        FAIL: f"not ok {number} {name}",
        ERROR: f"not ok {number} {name} # ERROR {why}".rstrip(),
        MISS: f"not ok {number} {name} # ERROR never ran: the run was interrupted first",
        UNCONFIRMED: f"not ok {number} {name} # UNCONFIRMED {why}".rstrip(),
    }[sr.verdict]
    return diag + [line]


def ktap_text(rr: RunResult, source: str) -> str:
    lines = header(rr)
    for i, sr in enumerate(rr.scenarios, 1):
        lines += result(sr, i, source)
    return "\n".join(lines) + "\n"


class KtapStream:
    """`--ktap`: KTAP on a stream as the run goes, one result line per
    finished scenario, so a CI log shows progress and survives a kill."""

    def __init__(self, stream: TextIO):
        self.stream = stream
        self.source = ""
        self.done: set[int] = set()

    def _emit(self, lines: list[str]) -> None:
        self.stream.write("\n".join(lines) + "\n")
        self.stream.flush()

    def started(self, rr, outdir) -> None:
        self.source = results_source(outdir / "results.json")
        self._emit(header(rr))

    def scenario_done(self, rr, index, outdir) -> None:
        self.done.add(index)
        self._emit(result(rr.scenarios[index], index + 1, self.source))

    def finished(self, rr, outdir) -> None:
        # the scenario in flight when the run stopped, and those never reached
        rest = [i for i in range(len(rr.scenarios)) if i not in self.done]
        for i in rest:
            self.scenario_done(rr, i, outdir)
