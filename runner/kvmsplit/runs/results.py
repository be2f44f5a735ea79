"""The results model: one RunResult holding the host facts and a
ScenarioResult per scenario, written as results.json.

Verdicts: PASS, FAIL (KVM misbehaved), ERROR (the run itself broke: guest
hang, crash, bad set-up), SKIP (could not be tested here, reason given),
MISS (never ran, e.g. the run was interrupted first).
"""
from __future__ import annotations

import json
import os
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

SCHEMA_VERSION = 1

PASS, FAIL, ERROR, SKIP, MISS = "PASS", "FAIL", "ERROR", "SKIP", "MISS"
VERDICTS = (PASS, FAIL, ERROR, SKIP, MISS)


@dataclass
class Check:
    name: str
    status: str          # pass, fail, skip (not applicable / could not be judged)
    summary: str
    details: dict = field(default_factory=dict)


@dataclass
class Phase:
    name: str
    duration_s: float
    kernel_s: float = 0.0     # of which waiting on the guest or inside KVM ioctls
    vm_stats: dict = field(default_factory=dict)      # snapshot at the end of the phase
    vcpu_delta: dict = field(default_factory=dict)    # pf_taken, exits, ... during the phase


@dataclass
class ScenarioResult:
    name: str
    scenario: dict
    verdict: str = MISS
    reasons: list[str] = field(default_factory=list)
    checks: list[Check] = field(default_factory=list)
    phases: list[Phase] = field(default_factory=list)
    expectation: dict = field(default_factory=dict)
    observed_split: str | None = None
    dirty: dict = field(default_factory=dict)
    kernel_log: dict = field(default_factory=dict)
    error_phase: str | None = None
    started: float | None = None
    duration_s: float | None = None
    console_tail: list[str] = field(default_factory=list)
    extra: dict = field(default_factory=dict)     # kind-specific data, e.g. a kselftest's exit code and KTAP

    def check(self, name: str) -> Check | None:
        return next((c for c in self.checks if c.name == name), None)

    def phase(self, name: str) -> Phase | None:
        return next((p for p in self.phases if p.name == name), None)

    @classmethod
    def from_dict(cls, d: dict) -> "ScenarioResult":
        """The inverse of asdict(); the caller validates d first (report.schema)."""
        return cls(**{**d, "checks": [Check(**c) for c in d.get("checks", [])],
                      "phases": [Phase(**p) for p in d.get("phases", [])]})


@dataclass
class RunResult:
    host: dict
    argv: list[str]
    kvmsplit_version: str
    schema_version: int = SCHEMA_VERSION
    run_id: str = field(default_factory=lambda: time.strftime("%Y%m%d-%H%M%S") + f"-{os.getpid()}")
    started: float = field(default_factory=time.time)
    finished: float | None = None
    interrupted: bool = False
    host_changes: list[str] = field(default_factory=list)
    scenarios: list[ScenarioResult] = field(default_factory=list)
    # The patch series under test, from the command line: name, version,
    # message_id, base_commit (each optional).
    series: dict | None = None

    def counts(self) -> dict[str, int]:
        c = {v: 0 for v in VERDICTS}
        for s in self.scenarios:
            c[s.verdict] += 1
        return c

    @property
    def ok(self) -> bool:
        """Exit 0 only if everything passed or was skipped with a reason."""
        return not self.interrupted and all(
            s.verdict == PASS or (s.verdict == SKIP and s.reasons) for s in self.scenarios)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "RunResult":
        """The inverse of to_dict(); the caller validates d first (report.schema)."""
        return cls(**{**d, "scenarios": [ScenarioResult.from_dict(s) for s in d.get("scenarios", [])]})

    def write(self, directory: Path) -> Path:
        """Write results.json atomically: a reader (or a Ctrl-C) never sees half a file."""
        directory.mkdir(parents=True, exist_ok=True)
        path = directory / "results.json"
        fd, tmp = tempfile.mkstemp(dir=directory, prefix=".results-", suffix=".json")
        with os.fdopen(fd, "w") as f:
            json.dump(self.to_dict(), f, indent=1, default=_json_default)
            f.write("\n")
        os.replace(tmp, path)
        return path


def _json_default(o):
    if hasattr(o, "to_dict"):
        return o.to_dict()
    if hasattr(o, "item"):        # numpy scalars
        return o.item()
    if isinstance(o, (set, frozenset)):
        return sorted(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")
