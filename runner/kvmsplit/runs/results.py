"""The results model: one RunResult holding the host facts and a
ScenarioResult per scenario, written as results.json.

Verdicts and check states are enums (str-valued, so results.json and every
report spell them the same way); see Verdict and CheckStatus.
"""
from __future__ import annotations

import json
import os
import tempfile
import time
from dataclasses import asdict, dataclass, field, fields, is_dataclass
from enum import StrEnum
from pathlib import Path

from kvmsplit.errors import EXIT_FAILED, EXIT_INTERNAL, EXIT_NOTHING_TESTED, EXIT_OK, EXIT_UNCONFIRMED

SCHEMA_VERSION = 2      # 2: the UNCONFIRMED verdict; phases' trace and kvm_run_s

class Verdict(StrEnum):
    """One scenario's outcome."""
    PASS = "PASS"       # every check passed, each on its evidence
    FAIL = "FAIL"       # KVM misbehaved: a check failed
    ERROR = "ERROR"     # the run itself broke: guest hang, crash, bad set-up, a kvmsplit bug
    SKIP = "SKIP"       # could not be tested here; the reason is given
    MISS = "MISS"       # never ran, e.g. the run was interrupted first
    # nothing wrong was seen, but a witness was missing (unreadable kernel log,
    # lost records, no tracepoints): not a pass, and not exit 0 unless allowed
    UNCONFIRMED = "UNCONFIRMED"

    @property
    def failed(self) -> bool:
        """What a CI box must act on."""
        return self in (Verdict.FAIL, Verdict.ERROR)

    @property
    def tested(self) -> bool:
        """The scenario ran to a judgement on evidence (good or bad)."""
        return self in (Verdict.PASS, Verdict.FAIL, Verdict.UNCONFIRMED)


PASS, FAIL, ERROR, SKIP, MISS = Verdict.PASS, Verdict.FAIL, Verdict.ERROR, Verdict.SKIP, Verdict.MISS
UNCONFIRMED = Verdict.UNCONFIRMED
VERDICTS = tuple(Verdict)


class CheckStatus(StrEnum):
    """One check's outcome within a scenario."""
    PASS = "pass"
    FAIL = "fail"
    SKIP = "skip"               # could not be judged here (not reached, nothing to judge it on)
    NA = "n/a"                  # does not apply to this scenario (e.g. no huge pages expected)
    UNCHECKED = "unchecked"     # nothing wrong seen, but the witness was missing (unreadable log)


@dataclass
class Check:
    name: str
    status: CheckStatus
    summary: str
    details: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.status = CheckStatus(self.status)


@dataclass
class Phase:
    name: str
    duration_s: float
    kernel_s: float = 0.0     # of which waiting on the guest or inside KVM ioctls
    vm_stats: dict = field(default_factory=dict)      # snapshot at the end of the phase
    vcpu_delta: dict = field(default_factory=dict)    # pf_taken, exits, ... during the phase
    trace: dict | None = None     # the kvmmmu tracepoints' PhaseTrace, None where tracefs was unavailable
    kvm_run_s: float = 0.0        # time inside KVM_RUN during the phase, summed over vCPUs


@dataclass
class ScenarioResult:
    name: str
    scenario: dict
    verdict: Verdict = Verdict.MISS
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

    def __post_init__(self) -> None:
        self.verdict = Verdict(self.verdict)

    def _json_view(self) -> dict:
        d = {f.name: getattr(self, f.name) for f in fields(self)}
        d["checks"] = [{f.name: getattr(c, f.name) for f in fields(c)} for c in self.checks]
        d["phases"] = [{f.name: getattr(p, f.name) for f in fields(p)} for p in self.phases]
        return d

    def check(self, name: str) -> Check | None:
        return next((c for c in self.checks if c.name == name), None)

    def phase(self, name: str) -> Phase | None:
        return next((p for p in self.phases if p.name == name), None)

    @classmethod
    def from_dict(cls, d: dict) -> ScenarioResult:
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

    def counts(self) -> dict[Verdict, int]:
        c = {v: 0 for v in Verdict}
        for s in self.scenarios:
            c[s.verdict] += 1
        return c

    @property
    def internal_errors(self) -> list[ScenarioResult]:
        return [s for s in self.scenarios if s.extra.get("internal_error")]

    def exit_code(self, allow_unchecked: bool = False) -> int:
        """The process exit code a CI box acts on (README: Exit codes). The
        worst finding wins: a kvmsplit bug, then a failure, then a missing
        witness, then a run that tested nothing."""
        verdicts = {s.verdict for s in self.scenarios}
        if self.internal_errors:
            return EXIT_INTERNAL
        if self.interrupted or verdicts & {FAIL, ERROR, MISS} or any(
                s.verdict is SKIP and not s.reasons for s in self.scenarios):
            return EXIT_FAILED
        if Verdict.UNCONFIRMED in verdicts and not allow_unchecked:
            return EXIT_UNCONFIRMED
        if not any(s.verdict.tested for s in self.scenarios):
            return EXIT_NOTHING_TESTED
        return EXIT_OK

    @property
    def ok(self) -> bool:
        return self.exit_code() == EXIT_OK

    def to_dict(self) -> dict:
        return asdict(self)

    def __post_init__(self) -> None:
        # results.json text of the scenarios that are done (see done()); not a field
        self._done_json: dict[int, tuple[ScenarioResult, str]] = {}

    def done(self, index: int) -> None:
        """Scenario `index` is final: its part of results.json is made once, now, and
        reused by every later write. results.json is rewritten after every scenario, so
        encoding all of them each time made a run quadratic: late in a 60-scenario suite
        under TCG, seconds per scenario. A scenario changed after done() is encoded again
        (the cache keys on the object)."""
        sr = self.scenarios[index]
        self._done_json[index] = (sr, _scenario_text(sr))

    def _scenario_json(self, index: int) -> str:
        sr = self.scenarios[index]
        cached = self._done_json.get(index)
        return cached[1] if cached is not None and cached[0] is sr else _scenario_text(sr)

    def json_text(self) -> str:
        """results.json's text: json.dumps(to_dict(), indent=1), from the done scenarios'
        cached parts and a fresh encoding of the rest."""
        head = {f.name: getattr(self, f.name) for f in fields(self)}
        head["scenarios"] = _SLOT
        parts = [self._scenario_json(i) for i in range(len(self.scenarios))]
        body = "[\n  " + ",\n  ".join(parts) + "\n ]" if parts else "[]"
        return _encode(head, depth=0).replace(json.dumps(_SLOT), body, 1)

    @classmethod
    def from_dict(cls, d: dict) -> RunResult:
        """The inverse of to_dict(); the caller validates d first (report.schema)."""
        return cls(**{**d, "scenarios": [ScenarioResult.from_dict(s) for s in d.get("scenarios", [])]})

    def write(self, directory: Path) -> Path:
        """Write results.json atomically: a reader (or a Ctrl-C) never sees half a file."""
        directory.mkdir(parents=True, exist_ok=True)
        path = directory / "results.json"
        fd, tmp = tempfile.mkstemp(dir=directory, prefix=".results-", suffix=".json")
        with os.fdopen(fd, "w") as f:
            f.write(self.json_text())
            f.write("\n")
        os.replace(tmp, path)
        return path


_SLOT = "\0scenarios\0"    # where the scenarios go in a run's text (no argument or host fact holds a NUL)


def _scenario_text(sr: ScenarioResult) -> str:
    """A scenario as it reads inside results.json (an item of the run's "scenarios")."""
    return _encode(sr._json_view(), depth=2)


def _encode(value, depth: int) -> str:
    """json.dumps(value, indent=1) as it reads `depth` levels down in a document (JSON
    strings never hold a raw newline, so re-indenting by lines is exact)."""
    text = json.dumps(value, indent=1, default=json_default)
    return text.replace("\n", "\n" + " " * depth) if depth else text


def json_default(o):
    if hasattr(o, "to_dict"):
        return o.to_dict()
    if is_dataclass(o) and not isinstance(o, type):
        return asdict(o)
    if hasattr(o, "item"):        # numpy scalars
        return o.item()
    if isinstance(o, (set, frozenset)):
        return sorted(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")
