"""Kernel log records: /dev/kmsg records, saved log text, and the read loop."""
from __future__ import annotations

import errno
import os

import pytest

from kvmsplit.errors import EXIT_BAD_INPUT, BadInputError
from kvmsplit.kernellog import KernelLogFormatError, parse_log_text, parse_reports
from kvmsplit.kernellog.records import MAX_RECORDS, drain, parse_kmsg_record


def test_kmsg_record_fields_escapes_and_continuations():
    rec = parse_kmsg_record(b"6,194,320154,-,caller=T1;acpi PNP0A08:00: \\x09_OSC \\x5c ok\n"
                            b" SUBSYSTEM=acpi\n DEVICE=+acpi:PNP0A08:00\n")
    assert (rec.prio, rec.seq, rec.ts_us, rec.flags) == (6, 194, 320154, "-")
    assert (rec.facility, rec.level) == (0, 6)
    assert rec.message == "acpi PNP0A08:00: \t_OSC \\ ok"
    assert rec.fields == {"SUBSYSTEM": "acpi", "DEVICE": "+acpi:PNP0A08:00"}


def test_kmsg_record_with_escaped_newline_has_two_lines():
    rec = parse_kmsg_record(b"12,7,1,-;first\\x0asecond\n")
    assert rec.facility == 1 and rec.lines() == ["first", "second"]


def test_log_text_formats():
    kmsg = parse_log_text("4,120,269758,-;Speculative Return Stack Overflow: WARNING: See x\n"
                          " SUBSYSTEM=cpu\n6,121,269760,c;next\n")
    assert [(r.seq, r.prio, r.fields) for r in kmsg] == [(120, 4, {"SUBSYSTEM": "cpu"}), (121, 6, {})]

    raw_dmesg = parse_log_text("<4>[   12.345678] hello\n<12>[   12.5] from user\n")
    assert [(r.prio, r.ts_us, r.message) for r in raw_dmesg] == [
        (4, 12_345_678, "hello"), (12, 12_500_000, "from user")]
    assert raw_dmesg[1].facility == 1

    dmesg = parse_log_text("[  554.863972][T11919] WARNING: x\n[ 2352.930426] [  T53909] Oops: y\n")
    assert [(r.seq, r.prio, r.message) for r in dmesg] == [(1, None, "WARNING: x"), (2, None, "Oops: y")]
    assert dmesg[0].facility == 0       # console text is taken as the kernel's own

    console = parse_log_text("  Call Trace:\n   <TASK>\n")
    assert [r.message for r in console] == ["  Call Trace:", "   <TASK>"]


@pytest.mark.parametrize("text, line, what", [
    ("6,1,100,-;ok\n6,x,200,-;bad seq\n", 2, "sequence number 'x'"),
    ("6,1,100,-;ok\n\nprio,2,200,-;bad prio\n", 3, "priority 'prio'"),
    ("6,1,1.5,-;bad ts\n", 1, "timestamp '1.5'"),
    ("6,1,100,-;ok\nplain console line\n", 2, "no 'prio,seq,ts,flags;'"),
    ("6,1,100,-;ok\n SUBSYSTEM\n", 1, "continuation line"),
])
def test_malformed_kmsg_text_names_the_line(text, line, what):
    with pytest.raises(KernelLogFormatError) as exc:
        parse_log_text(text)
    msg = str(exc.value)
    assert msg.startswith(f"line {line}: ") and what in msg and "\n" not in msg
    assert isinstance(exc.value, BadInputError) and exc.value.exit_code == EXIT_BAD_INPUT


class FakeKmsg:
    """Plays back what successive read()s of /dev/kmsg do: return a record or fail with an errno."""

    def __init__(self, *events: bytes | int):
        self.events = list(events)

    def __call__(self) -> bytes:
        ev = self.events.pop(0) if self.events else errno.EAGAIN
        if isinstance(ev, int):
            raise OSError(ev, os.strerror(ev))    # OSError picks the subclass: BrokenPipeError...
        return ev


def rec(seq: int, msg: str = "x") -> bytes:
    return f"4,{seq},{seq * 10},-;{msg}\n".encode()


def test_drain_stops_at_eagain():
    got = drain(FakeKmsg(rec(5), rec(6)))
    assert [r.seq for r in got.records] == [5, 6]
    assert (got.lost, got.lost_exact, got.truncated, got.error) == (0, True, False, None)


def test_drain_counts_overwritten_records_from_the_sequence_gap():
    got = drain(FakeKmsg(rec(5), errno.EPIPE, rec(42), rec(43)))
    assert [r.seq for r in got.records] == [5, 42, 43]
    assert (got.lost, got.lost_exact) == (36, True)


def test_drain_overrun_before_any_record_is_a_lower_bound():
    got = drain(FakeKmsg(errno.EPIPE, rec(900)))
    assert [r.seq for r in got.records] == [900]
    assert (got.lost, got.lost_exact) == (1, False)


def test_drain_keeps_records_read_before_an_error():
    got = drain(FakeKmsg(rec(1), errno.EIO, rec(2)))
    assert [r.seq for r in got.records] == [1] and "read failed" in got.error

    got = drain(FakeKmsg(rec(1), b"garbage\n", rec(3)))
    assert [r.seq for r in got.records] == [1] and "malformed /dev/kmsg record" in got.error


def test_drain_stops_at_the_cap():
    seqs = iter(range(MAX_RECORDS + 10))
    got = drain(lambda: rec(next(seqs)))
    assert got.truncated and len(got.records) == MAX_RECORDS


def test_reports_span_multi_line_records():
    """A report printed as one record with embedded newlines still parses."""
    text = ("4,10,1,-;------------[ cut here ]------------\n"
            "4,11,2,-;WARNING: CPU: 0 PID: 1 at arch/x86/kvm/x86.c:99 kvm_foo+0x1/0x2\\x0aCall Trace:"
            "\\x0a <TASK>\\x0a kvm_bar+0x1/0x2\\x0a </TASK>\n"
            "4,12,3,-;---[ end trace 0000000000000000 ]---\n")
    [rep] = parse_reports(parse_log_text(text))
    assert (rep.title, rep.frames, rep.seqs) == ("WARNING in kvm_foo", ["kvm_bar"], [10, 11, 12])
