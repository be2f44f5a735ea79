"""What a KVM selftest prints besides KTAP: the `==== Test Assertion Failure ====`
block of TEST_ASSERT() (tools/testing/selftests/kvm/lib/assert.c) and the
phase timings of the perf tests (`Populate memory time: 0.263290186s`).

Both are free text, so nothing here raises: what does not match is kept raw.
"""
from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field

from kvmsplit.runs.results import Phase

ASSERT_HEADER = "==== Test Assertion Failure ===="
# Numbers are bounded: int() refuses thousands of digits, and no real one has more than ten.
_WHERE_RE = re.compile(r"\s+(?P<file>[^\s:]+):(?P<line>\d{1,10}): (?P<expr>.*)$")
_PID_RE = re.compile(r"\s+pid=(?P<pid>\d{1,10}) tid=(?P<tid>\d{1,10}) errno=(?P<errno>-?\d{1,10}) - (?P<text>.*)$")
# "     3\t0x0000000000402f9a: run_test at dirty_log_perf_test.c:289",
# "     6\t0x00007f124543a249: ?? ??:0" where addr2line knows nothing, and
# "     2\t (inlined by) run_test at dirty_log_test.c:803" with no address
_FRAME_RE = re.compile(r"\s+(?P<n>\d{1,10})\s+(?:(?P<addr>0x[0-9a-fA-F]+):|(?P<inl>\(inlined by\)))"
                       r" (?P<func>\S+)(?: at | )(?P<loc>.*)$")

# "Populate memory time: 0.263s", "Total guest execution time:\t0.5s",
# "KVM_CREATE_MAPPINGS: total execution time: 0.187s",
# access_tracking_perf_test's "%-30s: %ld.%09lds"
_TIMING_RE = re.compile(r"(?P<label>[A-Za-z].*?)\s*:\s*(?P<s>\d+\.\d+)s")
_ITERATION_RE = re.compile(r"Iteration (?P<n>\d+) (?P<what>.+)$")
# dirty_log_perf_test's labels, named like kvmsplit's own phases so the two
# read the same in results.json and in the table
_PHASE_NAMES = {
    "Populate memory": "populate",
    "Enabling dirty logging": "enable",
    "Disabling dirty logging": "disable",
    "dirty memory": "dirty",
    "get dirty log": "get-dirty-log",
    "clear dirty log": "clear-dirty-log",
}


@dataclass
class Frame:
    n: int
    address: str | None     # None for a function inlined into the frame before
    function: str           # "??" when the binary has no symbol for it
    location: str           # "kvm_util.c:729 (discriminator 7)", "??:0"


@dataclass
class AssertionFailure:
    file: str | None = None
    line: int | None = None
    expression: str | None = None
    pid: int | None = None
    tid: int | None = None
    errno: int | None = None
    errno_text: str | None = None
    backtrace: list[Frame] = field(default_factory=list)
    message: str = ""       # the test's own explanation, after the backtrace
    raw: list[str] = field(default_factory=list)

    @property
    def function(self) -> str | None:
        """The innermost function with a name: where the assertion fired."""
        return next((f.function for f in self.backtrace if f.function != "??"), None)

    def summary(self) -> str:
        if self.file is None:
            return "test assertion failure: " + (" / ".join(self.raw[1:3]) or "(no details)")
        s = f"assertion failed at {self.file}:{self.line}: {self.expression}"
        if self.function:
            s += f" in {self.function}()"
        if self.errno:
            s += f", errno {self.errno} ({self.errno_text})"
        if self.message:
            s += f": {self.message.splitlines()[0]}"
        return s

    def to_dict(self) -> dict:
        return asdict(self)


def parse_assertion(text: str) -> AssertionFailure | None:
    """The first assertion-failure block in `text`, or None."""
    lines = text.splitlines()
    start = next((i for i, ln in enumerate(lines) if ln.strip() == ASSERT_HEADER), None)
    if start is None:
        return None
    block: list[str] = []
    for ln in lines[start:]:
        if block and ln.strip() == ASSERT_HEADER:
            break                       # a second thread's assertion: keep the first
        block.append(ln)
    a = AssertionFailure(raw=block)
    rest = iter(block[1:])
    for ln in rest:
        if a.file is None and (m := _WHERE_RE.match(ln)):
            a.file, a.line, a.expression = m["file"], int(m["line"]), m["expr"]
        elif a.pid is None and (m := _PID_RE.match(ln)):
            a.pid, a.tid, a.errno, a.errno_text = int(m["pid"]), int(m["tid"]), int(m["errno"]), m["text"]
        elif m := _FRAME_RE.match(ln):
            a.backtrace.append(Frame(int(m["n"]), m["addr"], m["func"], m["loc"].strip()))
        elif a.file is not None and ln.strip():
            # the message: printed last, its first line indented, the rest as the test wrote it
            a.message = "\n".join([ln.strip(), *(x.rstrip() for x in rest)]).strip()
    return a


def _phase_name(label: str) -> str:
    label = label.removesuffix(" time").strip()
    if m := _ITERATION_RE.match(label):
        base = _PHASE_NAMES.get(m["what"], _slug(m["what"]))
        return f"{base}-{m['n']}"
    return _PHASE_NAMES.get(label, _slug(label))


def _slug(label: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", label.lower()).strip("-")


def parse_timings(text: str) -> list[Phase]:
    """`<label> time: <seconds>s` lines as Phases, in the order printed."""
    out = []
    for ln in text.splitlines():
        if m := _TIMING_RE.fullmatch(ln.strip()):
            out.append(Phase(name=_phase_name(m["label"]), duration_s=float(m["s"])))
    return out
