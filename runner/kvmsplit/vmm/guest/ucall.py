"""The ucall protocol, host side: format commands, parse guest lines, and
compute what a write pass writes. guests/protocol.h is the guest side."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

PROTO_VERSION = 1
COM1 = 0x3F8
COM1_LSR = COM1 + 5
EXIT_PORT = 0xF4
MARKER_TAG = 0x4B56
PAGE_SHIFT = 12
PAGE_SHIFTS = {"4k": 12, "2m": 21, "1g": 30}
PATTERNS = {"seq": 0, "random": 1}


@dataclass(frozen=True)
class GuestLine:
    cpu: int
    kind: str          # HELLO, MAPPED, READY, DONE, ERR, EXC
    args: tuple[str, ...]
    text: str

    def ints(self, start: int = 0) -> list[int]:
        return [int(a, 16) for a in self.args[start:]]


def parse_line(text: str) -> GuestLine | None:
    """Parse '@<cpu> KIND args...'; None for anything else (stray output)."""
    if not text.startswith("@"):
        return None
    parts = text.split()
    try:
        cpu = int(parts[0][1:], 16)
    except ValueError:
        return None
    if len(parts) < 2:
        return None
    return GuestLine(cpu, parts[1], tuple(parts[2:]), text)


def _hex(*vals: int) -> str:
    return " ".join(f"{v:x}" for v in vals)


def cmd_map(gpa: int, size: int, page_shift: int) -> str:
    return f"M {_hex(gpa, size, page_shift)}\n"


def cmd_write(pass_no: int, pattern: str, pct: int, seed: int, first: int, npages: int) -> str:
    return f"W {_hex(pass_no, PATTERNS[pattern], pct, seed, first, npages)}\n"


def cmd_read(first: int, npages: int) -> str:
    return f"R {_hex(first, npages)}\n"


CMD_HANG = "H\n"
CMD_QUIT = "Q\n"


def _mix64(z: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser, vectorised; the guest's mix64() in guest.c."""
    with np.errstate(over="ignore"):
        z = z + np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


def written_pages(pass_no: int, pattern: str, pct: int, seed: int, first: int, npages: int) -> np.ndarray:
    """Page indices (into the test region) that the guest writes in this pass."""
    idx = np.arange(first, first + npages, dtype=np.uint64)
    if pattern == "seq":
        return idx[: (npages * pct + 99) // 100]
    r = _mix64(np.uint64(seed) ^ (np.uint64(pass_no) << np.uint64(40)) ^ idx)
    return idx[(r % np.uint64(100)) < np.uint64(pct)]


def marker(pass_no: int, pages: np.ndarray) -> np.ndarray:
    """The qword the guest stores at the start of each page it writes."""
    return (np.uint64(MARKER_TAG << 48) | np.uint64(pass_no << 32)) | pages.astype(np.uint64)
