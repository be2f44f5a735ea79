"""The files every run leaves next to results.json, rewritten as the run goes
so a killed run still has them, and at its end:

  results.ktap          KTAP v1
  junit.xml             JUnit, for Jenkins/GitLab
  kcidb.json            a KCIDB v5.3 fragment
  kernel-log/<slug>.txt the kernel-log excerpt of each failed scenario
"""
from __future__ import annotations

import json
import os
import socket
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from kvmsplit.report.junit import junit_xml
from kvmsplit.report.kcidb import kcidb_fragment
from kvmsplit.report.ktap import ktap_text
from kvmsplit.runs.digest import failed, kernel_excerpt, rerun_command, results_source, slug
from kvmsplit.runs.results import RunResult
from kvmsplit.runs.sinks import warn


def write_atomic(path: Path, text: str) -> None:
    """A reader (CI picking up junit.xml mid-run) never sees half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}-")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.chmod(tmp, 0o644)        # mkstemp's 0600 would hide reports from CI's upload step
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


class RunStamp:
    """Fills in what run_suite does not know: the patch series named on the
    command line and this host's name (which reports and the history key
    on). First among the sinks, so the others see a complete run."""

    def __init__(self, series: dict | None):
        self.series = series

    def started(self, rr: RunResult, outdir: Path) -> None:
        rr.series = self.series or rr.series
        rr.host.setdefault("hostname", socket.gethostname())
        rr.write(outdir)

    def scenario_done(self, rr, index, outdir) -> None:
        pass

    def finished(self, rr, outdir) -> None:
        pass


class FileSink:
    """Writes the files above as a run goes (a suite.ResultSink): at its start and end,
    and after a scenario unless the last write was so recent that writing again would
    take more than SHARE of the run's time. They cover the whole run, so each write
    grows with it: on a host, a few ms, after every scenario; under TCG (`kvmsplit vm`)
    seconds late in a suite, which the share turns into a write every half minute or so.
    results.json itself is written after every scenario (runs/loop.py)."""

    SHARE = 0.1

    def __init__(self, clock: Callable[[], float] = time.monotonic):
        self.clock = clock
        self.cost = 0.0                 # how long the last write took
        self.last = float("-inf")       # when it ended

    def due(self) -> bool:
        return self.clock() - self.last >= self.cost / self.SHARE

    def write(self, rr: RunResult, outdir: Path) -> None:
        t0 = self.clock()
        self._write(rr, outdir)
        self.last = self.clock()
        self.cost = self.last - t0

    def _write(self, rr: RunResult, outdir: Path) -> None:
        source = results_source(outdir / "results.json")
        files = {"results.ktap": ktap_text(rr, source), "junit.xml": junit_xml(rr, source),
                 "kcidb.json": json.dumps(kcidb_fragment(rr, source), indent=1) + "\n"}
        files.update({f"kernel-log/{slug(sr.name)}.txt": _kernel_log_file(sr, source)
                      for sr in rr.scenarios if failed(sr)})
        for name, text in files.items():
            try:
                write_atomic(outdir / name, text)
            except OSError as e:
                warn(f"cannot write {outdir / name}", e)

    def started(self, rr: RunResult, outdir: Path) -> None:
        self.write(rr, outdir)

    def scenario_done(self, rr: RunResult, index: int, outdir: Path) -> None:
        if self.due():
            self.write(rr, outdir)

    def finished(self, rr: RunResult, outdir: Path) -> None:
        self.write(rr, outdir)


def _kernel_log_file(sr, source: str) -> str:
    parts = [f"{sr.name}: {sr.verdict}", "\n".join(sr.reasons), "rerun: " + rerun_command(source, sr.name)]
    raw = kernel_excerpt(sr, max_lines=None)
    if raw:
        parts.append(raw)
    else:
        parts.append("no kernel report during this scenario"
                     + ("; the guest console ended with:\n" + "\n".join(sr.console_tail)
                        if sr.console_tail else ""))
    return "\n\n".join(p for p in parts if p) + "\n"
