"""What every report says about a run and its scenarios, said once: the
host, the scenario's kind and file-safe name, the one line that heads a
failure, the kernel-log excerpt behind it, and the command that reruns it."""
from __future__ import annotations

import re
import shlex
from pathlib import Path

from kvmsplit.runs.results import ERROR, FAIL, RunResult, ScenarioResult

FAILED = (FAIL, ERROR)
EXCERPT_LINES = 60      # enough for a report's header, registers and call trace


def host_name(rr: RunResult) -> str:
    return rr.host.get("hostname") or "unknown-host"


def kernel_release(rr: RunResult) -> str:
    return rr.host.get("kernel", {}).get("release", "unknown")


def kind(sr: ScenarioResult) -> str:
    """The backend that produced a result; plain kvmsplit scenarios carry no kind."""
    return sr.scenario.get("kind", "scenario")


def slug(name: str) -> str:
    """A scenario name as a file name: thp/2m/ring -> thp_2m_ring."""
    return re.sub(r"[^A-Za-z0-9.-]+", "_", name).strip("_.") or "scenario"


def failed(sr: ScenarioResult) -> bool:
    return sr.verdict in FAILED


def reports(sr: ScenarioResult) -> list[dict]:
    return (sr.kernel_log or {}).get("reports") or []


def report_text(rep: dict) -> str:
    return rep.get("raw") or "\n".join([rep.get("title", "")] + list(rep.get("frames") or []))


def headline(sr: ScenarioResult) -> str:
    """The one line a failure is known by: the kernel's own report title when
    there is one (it is what a bug is filed under), else the first reason."""
    reps = reports(sr)
    if reps:
        return reps[0].get("title") or "kernel report"
    return sr.reasons[0] if sr.reasons else sr.verdict


def kernel_excerpt(sr: ScenarioResult, max_lines: int | None = EXCERPT_LINES) -> str:
    """The raw kernel log of every report in the scenario, cut to max_lines each."""
    out = []
    for rep in reports(sr):
        lines = report_text(rep).splitlines()
        if max_lines is not None and len(lines) > max_lines:
            lines = lines[:max_lines] + [f"[... {len(lines) - max_lines} more lines]"]
        out.append("\n".join(lines))
    return "\n\n".join(out)


def failure_text(sr: ScenarioResult, source: str) -> str:
    """Reasons, kernel excerpt and rerun command: the body of a failure in JUnit and friends."""
    parts = ["\n".join(sr.reasons) or sr.verdict]
    if sr.error_phase:
        parts.append(f"in phase: {sr.error_phase}")
    excerpt = kernel_excerpt(sr)
    if excerpt:
        parts.append(excerpt)
    parts.append("rerun: " + rerun_command(source, sr.name))
    return "\n\n".join(parts)


def rerun_command(source: str, name: str | None = None) -> str:
    """The one line that runs a failure again. source is shell words naming
    the results: results_source(path), or a history run (history.run_source)."""
    cmd = f"kvmsplit rerun {source}"
    return cmd + (f" --only {shlex.quote(name)}" if name else "")


def results_source(path: str | Path) -> str:
    """A results.json as rerun's argument: absolute, so the line works from anywhere."""
    return shlex.quote(str(Path(path).resolve()))


def series_label(series: dict | None) -> str:
    if not series:
        return ""
    s = series.get("name") or series.get("message_id") or series.get("base_commit", "")[:12]
    return s + (f" v{series['version']}" if series.get("version") else "")
