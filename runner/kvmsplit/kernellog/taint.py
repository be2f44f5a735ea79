"""The kernel taint mask (/proc/sys/kernel/tainted) and its letters.

Bits and letters per Documentation/admin-guide/tainted-kernels.rst. Only set
bits get a letter here, so an untainted kernel decodes to "" (the kernel's own
`Tainted:` line prints a G for a clear bit 0).
"""
from __future__ import annotations

TAINT_PATH = "/proc/sys/kernel/tainted"

# (bit, letter, what setting it means)
TAINT_FLAGS: tuple[tuple[int, str, str], ...] = (
    (0, "P", "proprietary module was loaded"),
    (1, "F", "module was force loaded"),
    (2, "S", "kernel running on an out of specification system"),
    (3, "R", "module was force unloaded"),
    (4, "M", "processor reported a Machine Check Exception (MCE)"),
    (5, "B", "bad page referenced or some unexpected page flags"),
    (6, "U", "taint requested by userspace application"),
    (7, "D", "kernel died recently, i.e. there was an OOPS or BUG"),
    (8, "A", "ACPI table overridden by user"),
    (9, "W", "kernel issued warning"),
    (10, "C", "staging driver was loaded"),
    (11, "I", "workaround for bug in platform firmware applied"),
    (12, "O", "externally-built (\"out-of-tree\") module was loaded"),
    (13, "E", "unsigned module was loaded"),
    (14, "L", "soft lockup occurred"),
    (15, "K", "kernel has been live patched"),
    (16, "X", "auxiliary taint, defined for and used by distros"),
    (17, "T", "kernel was built with the struct randomization plugin"),
    (18, "N", "an in-kernel test has been run"),
    (19, "J", "userspace used a mutating debug operation in fwctl"),
)
_KNOWN = {bit for bit, _, _ in TAINT_FLAGS}


def read_taint(path: str = TAINT_PATH) -> int:
    """The current taint mask. Raises OSError if it cannot be read."""
    with open(path) as f:
        return int(f.read().strip())


def decode_taint(mask: int) -> str:
    """Letters of the set bits, in bit order: 512 -> "W", 0 -> ""."""
    return "".join(letter for bit, letter, _ in TAINT_FLAGS if mask >> bit & 1)


def describe_taint(mask: int) -> list[tuple[str, str]]:
    """(letter, description) for each set bit; bits the table lacks show as `bitN`."""
    out = [(letter, what) for bit, letter, what in TAINT_FLAGS if mask >> bit & 1]
    out += [(f"bit{bit}", "taint flag unknown to kvmsplit")
            for bit in range(mask.bit_length()) if mask >> bit & 1 and bit not in _KNOWN]
    return out
