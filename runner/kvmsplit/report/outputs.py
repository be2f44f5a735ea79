"""The files every run leaves next to results.json, rewritten after each
scenario like results.json itself, so a killed run still has them:

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
    """Writes the files above at every step of a run (a suite.ResultSink)."""

    def write(self, rr: RunResult, outdir: Path) -> None:
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
