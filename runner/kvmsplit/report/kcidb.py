"""Results as a KCIDB v5.3 fragment (kcidb.json), ready for `kcidb-submit`.

The objects: one checkout (the series under test, or this run when no
series was named), one build (the kernel running on this host), one test
per scenario, and an issue plus an incident for every kernel report, keyed
by its title so the same WARNING found by two hosts is one issue.
"""
from __future__ import annotations

import hashlib
import json
import re
from datetime import UTC, datetime

from kvmsplit.kernellog import corrupted_note
from kvmsplit.runs.digest import (
    failed,
    failure_text,
    host_name,
    kernel_release,
    kind,
    reports,
    rerun_command,
    series_label,
)
from kvmsplit.runs.results import RunResult, ScenarioResult, Verdict

ORIGIN = "kvmsplit"
SCHEMA = {"major": 5, "minor": 3}
LOG_EXCERPT_MAX = 16384        # KCIDB's limit on log_excerpt
_SHA1 = re.compile(r"^[0-9a-f]{40}$")


def _corrupted(rep: dict) -> dict:
    """A corrupted report's incident says so: its title is a best guess."""
    if not corrupted_note(rep):
        return {}
    return {"comment": f"corrupted report: {rep.get('corrupted_reason')}",
            "misc": {"corrupted": True, "corrupted_reason": rep.get("corrupted_reason")}}


def _time(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).isoformat()


def _digest(value) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()[:16]


def kcidb_path(sr: ScenarioResult) -> str:
    """KCIDB paths are dot-separated [A-Za-z0-9_-] words: thp/2m/ring -> kvmsplit.thp.2m.ring."""
    words = [re.sub(r"[^A-Za-z0-9_-]", "_", w) for w in re.split(r"[/.]", sr.name) if w]
    return ".".join([ORIGIN if kind(sr) == "scenario" else re.sub(r"\W", "_", kind(sr))] + words)


def _checkout(rr: RunResult, checkout_id: str) -> dict:
    c = {"id": checkout_id, "origin": ORIGIN, "start_time": _time(rr.started)}
    series = rr.series or {}
    if series:
        c["comment"] = series_label(series)
        c["misc"] = dict(series)
    commit = series.get("base_commit", "").lower()
    if _SHA1.match(commit):
        c["git_commit_hash"] = commit
    msgid = series.get("message_id", "").strip("<>")
    if "@" in msgid:          # KCIDB checks it as an e-mail address
        c["message_id"] = msgid
    return c


# KCIDB's statuses are ours, but for a missing witness: "DONE" is KCIDB's
# "ran, and its outcome is not stated" - never PASS
KCIDB_STATUS = {Verdict.UNCONFIRMED: "DONE"}


def _test(rr: RunResult, sr: ScenarioResult, test_id: str, build_id: str, source: str) -> dict:
    t = {"id": test_id, "build_id": build_id, "origin": ORIGIN, "path": kcidb_path(sr),
         "status": KCIDB_STATUS.get(sr.verdict, sr.verdict), "comment": sr.name,
         "environment": {"comment": host_name(rr),
                         "misc": {"host": host_name(rr), "kernel": kernel_release(rr)}},
         "misc": {"scenario": sr.scenario, "reasons": sr.reasons,
                  "phases": {p.name: p.duration_s for p in sr.phases}}}
    if sr.started:
        t["start_time"] = _time(sr.started)
    if sr.duration_s is not None:
        t["duration"] = sr.duration_s
    if sr.observed_split:
        t["misc"]["observed_split"] = sr.observed_split
    if sr.expectation:
        t["misc"]["expected_split"] = sr.expectation.get("split")
    if failed(sr):
        t["log_excerpt"] = failure_text(sr, source)[-LOG_EXCERPT_MAX:]
        t["misc"]["rerun"] = rerun_command(source, sr.name)
    return t


def kcidb_fragment(rr: RunResult, source: str) -> dict:
    host = host_name(rr)
    checkout_id = f"{ORIGIN}:" + (f"series-{_digest(rr.series)}" if rr.series else f"{host}-{rr.run_id}")
    build_id = f"{ORIGIN}:{host}-{rr.run_id}"
    machine = rr.host.get("kernel", {}).get("machine", "")
    build = {"id": build_id, "checkout_id": checkout_id, "origin": ORIGIN,
             "comment": f"kernel {kernel_release(rr)} running on {host}",
             "misc": {"kernel_release": kernel_release(rr),
                      "kernel_version": rr.host.get("kernel", {}).get("version", "")}}
    if re.fullmatch(r"[a-z0-9_]+", machine):
        build["architecture"] = machine
    tests, issues, incidents = [], {}, []
    for i, sr in enumerate(rr.scenarios):
        test_id = f"{build_id}-{i}"
        tests.append(_test(rr, sr, test_id, build_id, source))
        for j, rep in enumerate(reports(sr)):
            title = rep.get("title") or "kernel report"
            issue_id = f"{ORIGIN}:{_digest(title)}"
            issues[issue_id] = {"id": issue_id, "version": 1, "origin": ORIGIN,
                                "report_subject": title, "culprit": {"code": True}}
            incidents.append({"id": f"{test_id}-{j}", "origin": ORIGIN, "issue_id": issue_id,
                              "issue_version": 1, "test_id": test_id, "build_id": build_id,
                              "present": True, **_corrupted(rep)})
    return {"version": SCHEMA, "checkouts": [_checkout(rr, checkout_id)], "builds": [build],
            "tests": tests, "issues": list(issues.values()), "incidents": incidents}
