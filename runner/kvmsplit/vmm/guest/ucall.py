"""The ucall protocol, host side: format commands, parse guest lines, and
compute what a write pass writes. guests/protocol.h is the guest side."""
from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum
from typing import TYPE_CHECKING

from kvmsplit.lazy import lazy

if TYPE_CHECKING:
    import numpy as np
else:
    np = lazy("numpy")     # not needed before the guest's first line (start-up goal: 0.2 s)


PROTO_VERSION = 3
COM1 = 0x3F8
COM1_LSR = COM1 + 5
EXIT_PORT = 0xF4
MARKER_TAG = 0x4B56
PAGE_SHIFT = 12
PAGE_SHIFTS = {"4k": 12, "2m": 21, "1g": 30}
PATTERNS = {"seq": 0, "random": 1}
# every KIND a guest line can have; a line with another is not the protocol (stray output)
KINDS = frozenset({"HELLO", "MAPPED", "READY", "DONE", "ERR", "EXC", "NESTED", "L2EXIT"})
# the guest's line buffer is 160 bytes: anything this long without a newline is not the protocol
MAX_LINE = 4096


@dataclass(frozen=True)
class GuestLine:
    cpu: int
    kind: str          # HELLO, MAPPED, READY, DONE, ERR, EXC; nested: NESTED, L2EXIT
    args: tuple[str, ...]
    text: str

    def ints(self, start: int = 0) -> list[int]:
        return [int(a, 16) for a in self.args[start:]]


def parse_line(text: str) -> GuestLine | None:
    """Parse '@<cpu> KIND args...' with a KIND of KINDS; None for anything
    else (stray output)."""
    if not text.startswith("@"):
        return None
    parts = text.split()
    try:
        cpu = int(parts[0][1:], 16)
    except ValueError:
        return None
    if len(parts) < 2 or parts[1] not in KINDS:
        return None
    return GuestLine(cpu, parts[1], tuple(parts[2:]), text)


def _hex(*vals: int) -> str:
    return " ".join(f"{v:x}" for v in vals)


def cmd_map(gpa: int, size: int, page_shift: int) -> str:
    return f"M {_hex(gpa, size, page_shift)}\n"


class WriteRoute(IntEnum):
    """How a write pass's stores reach memory: W's <how> bits 0-1 (protocol.h WV_*)."""
    NATIVE = 0       # plain stores at CPL3: real page faults, KVM's MMU
    CPL0 = 1         # the pass runs at CPL0: KVM's instruction emulator where the host emulates
                     # guest kernel code (PVM)
    FEP = 2          # each store behind the forced-emulation prefix (kvm.force_emulation_prefix)

    @property
    def emulated(self) -> bool:
        return self is not WriteRoute.NATIVE


WV_STRING = 4        # W's <how> bit 2: rep stosq / rep movsq over runs of consecutive pages
STRING_PAGES = 4     # at most this many pages per rep-string instruction (protocol.h)


def string_fill(pass_no: int) -> int:
    """What a string pass's rep stosq/movsq writes (STRING_FILL in protocol.h):
    a page this pass has touched starts with this or with its marker()."""
    return MARKER_TAG << 48 | pass_no << 32 | 0xFFFFFFFF


def cmd_write(pass_no: int, pattern: str, pct: int, seed: int, first: int, npages: int,
              route: WriteRoute = WriteRoute.NATIVE, string: bool = False) -> str:
    """W; a native pass without strings is the 6-field line every guest version knows."""
    how = int(route) | (WV_STRING if string else 0)
    extra = (how,) if how else ()
    return f"W {_hex(pass_no, PATTERNS[pattern], pct, seed, first, npages, *extra)}\n"


def cmd_read(first: int, npages: int) -> str:
    return f"R {_hex(first, npages)}\n"


CMD_HANG = "H\n"       # nested: L2 spins
CMD_QUIT = "Q\n"

# -- X: a test hook, the guest misbehaving on purpose (protocol.h) -----------------------
MISBEHAVIOURS = {
    "cpl3-spin": None,          # H: spins at CPL3
    "cpl0-spin": 0,             # spins at CPL0 with interrupts off (emulated on PVM)
    "garbage": 1,               # random bytes on COM1
    "stray-lines": 2,           # lines that are not the protocol
    "long-line": 3,             # one endless line, no newline
    "triple-fault": 4,          # null IDT at CPL0, then ud2: KVM exits SHUTDOWN
    "exit-mid-pass": 5,         # writes half the region and half a DONE line, then exits MISBEHAVE_EXIT
    "flood": 6,                 # megabytes of non-protocol lines
    "flood-protocol": 7,        # READY lines nobody asked for, without end
}
MISBEHAVE_EXIT = 0x7E


def cmd_misbehave(kind: str) -> str:
    """The command that makes the guest misbehave as `kind` (a MISBEHAVIOURS key).
    Not in nested mode, where L1 answers X with ERR."""
    if kind not in MISBEHAVIOURS:
        raise ValueError(f"unknown misbehaviour {kind!r}: one of {', '.join(MISBEHAVIOURS)}")
    code = MISBEHAVIOURS[kind]
    return CMD_HANG if code is None else f"X {code:x}\n"


# -- nested mode: the guest becomes an SVM L1 and L2 runs W/R/F/H under NPT ------------
SVM_UNAVAILABLE = "svm unavailable: "   # ERR text after N when the vCPU can't do nested SVM
SVM_EXIT_NPF = 0x400
SVM_EXIT_SHUTDOWN = 0x7F
SVM_EXIT_EXCP_BASE = 0x40
SVM_EXIT_VMMCALL = 0x81
SVM_EXIT_INVALID = (1 << 64) - 1         # VMRUN refused the VMCB


def cmd_nested(l2_page_shift: int) -> str:
    """Become L1 (BSP only, after READY); answered by NESTED or ERR."""
    return f"N {l2_page_shift:x}\n"


def cmd_l2_peek(gpa: int) -> str:
    """Test hook, nested only: L2 reads the qword at gpa (DONE F <qword>, or
    L2EXIT when the NPT or L1's page tables leave gpa out)."""
    return f"F {gpa:x}\n"


def svm_unavailable(line: GuestLine) -> str | None:
    """The reason, if this ERR line says the guest cannot do nested SVM (a SKIP)."""
    text = line.text.split(" ERR ", 1)[-1]
    return text[len(SVM_UNAVAILABLE):] if line.kind == "ERR" and text.startswith(SVM_UNAVAILABLE) else None


def svm_exit_name(code: int) -> str:
    if code == SVM_EXIT_NPF:
        return "NPF"
    if code == SVM_EXIT_SHUTDOWN:
        return "SHUTDOWN"
    if SVM_EXIT_EXCP_BASE <= code < SVM_EXIT_EXCP_BASE + 32:
        return f"exception {code - SVM_EXIT_EXCP_BASE}"
    if code == SVM_EXIT_INVALID:
        return "VMEXIT_INVALID"
    return f"exit {code:#x}"


@dataclass(frozen=True)
class L2Exit:
    """An L2EXIT line: L2 left by something other than its VMMCALL."""
    code: int
    info1: int
    info2: int
    rip: int

    @classmethod
    def parse(cls, line: GuestLine) -> L2Exit:
        return cls(*line.ints())

    def __str__(self) -> str:
        return (f"L2 #VMEXIT {self.code:#x} ({svm_exit_name(self.code)}), exitinfo1 {self.info1:#x}, "
                f"exitinfo2 {self.info2:#x}, L2 rip {self.rip:#x}")


def _mix64(z: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser, vectorised; the guest's mix64() in guest.c."""
    with np.errstate(over="ignore"):
        z = z + np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


def written_pages(pass_no: int, pattern: str, pct: int, seed: int, first: int, npages: int) -> np.ndarray:
    """Page indices (into the test region) that the guest writes in this pass,
    whatever the route: a string pass's rep stosq/movsq over a run a..b writes
    pages a..b-1 whole and b's first qword, i.e. the same selected pages, and
    each selected page's first qword ends as its marker()."""
    idx = np.arange(first, first + npages, dtype=np.uint64)
    if pattern == "seq":
        return idx[: (npages * pct + 99) // 100]
    r = _mix64(np.uint64(seed) ^ (np.uint64(pass_no) << np.uint64(40)) ^ idx)
    return idx[(r % np.uint64(100)) < np.uint64(pct)]


def marker(pass_no: int, pages: np.ndarray) -> np.ndarray:
    """The qword the guest stores at the start of each page it writes."""
    return (np.uint64(MARKER_TAG << 48) | np.uint64(pass_no << 32)) | pages.astype(np.uint64)
