"""The taint mask and its letters (Documentation/admin-guide/tainted-kernels.rst)."""
from __future__ import annotations

from kvmsplit.kernellog import decode_taint, describe_taint, read_taint


def test_decode_taint():
    assert decode_taint(0) == ""
    assert decode_taint(512) == "W"
    assert decode_taint(1) == "P"
    assert decode_taint(1 << 19) == "J"
    # bit order: D (7), W (9), O (12), L (14)
    assert decode_taint((1 << 14) | (1 << 12) | (1 << 9) | (1 << 7)) == "DWOL"


def test_describe_taint_lists_unknown_bits_too():
    assert describe_taint(512) == [("W", "kernel issued warning")]
    assert describe_taint((1 << 24) | 1) == [("P", "proprietary module was loaded"),
                                             ("bit24", "taint flag unknown to kvmsplit")]
    assert decode_taint(1 << 24) == ""


def test_read_taint(tmp_path):
    assert read_taint() >= 0                      # the real /proc/sys/kernel/tainted
    path = tmp_path / "tainted"
    path.write_text("12800\n")
    assert read_taint(str(path)) == 12800
    assert decode_taint(12800) == "WOE"
