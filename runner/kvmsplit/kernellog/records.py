"""Kernel log records: what /dev/kmsg returns, and the text forms dmesg and consoles print.

A /dev/kmsg record is `prio,seq,ts_us,flags[,more];message` followed by
continuation lines ` KEY=value`. The kernel escapes bytes below 0x20 (other than
the line end), above 0x7e, and the backslash itself as `\\xNN`, so one read()
returns exactly one record and the message itself holds no raw newline.
"""
from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field

from kvmsplit.errors import BadInputError

KERNEL_FACILITY = 0
USER_FACILITY = 1
# Bigger than any record the kernel returns (CONSOLE_EXT_LOG_MAX is 8 KiB):
# read() fails with EINVAL, not a short read, when the buffer is too small.
READ_SIZE = 16384
# A kernel that warns in a loop can refill the ring as fast as we drain it;
# stop there rather than read forever (the result says it was cut short).
MAX_RECORDS = 100_000


class KernelLogFormatError(BadInputError):
    """A kernel log that claims to be /dev/kmsg records but has a malformed one."""


@dataclass
class Record:
    """One kernel log record.

    seq is the kmsg sequence number; for text that carries none (dmesg, console)
    it is the record's 1-based line number in that text. prio is None for console
    text with no `<N>` prefix: such text is taken as the kernel's own output.
    """
    seq: int
    message: str
    prio: int | None = None
    ts_us: int | None = None
    flags: str = "-"
    fields: dict[str, str] = field(default_factory=dict)
    raw: str = ""
    caller: str | None = None      # the console's `[T123]`/`[C1]` tag: who printed it

    @property
    def facility(self) -> int:
        return KERNEL_FACILITY if self.prio is None else self.prio >> 3

    @property
    def level(self) -> int | None:
        return None if self.prio is None else self.prio & 7

    def lines(self) -> list[str]:
        """The message as printed lines (a record may hold several)."""
        return self.message.split("\n")

    def to_dict(self) -> dict:
        return asdict(self)


_MAX_DIGITS = 20       # a u64: priority, sequence number and timestamp all fit
_ESCAPE = re.compile(rb"\\x([0-9a-fA-F]{2})")
# The header's shape, loose enough to catch malformed numbers so that they can
# be reported instead of the line being mistaken for console text.
_KMSG_HEAD = re.compile(r"^([^,;\s]*),([^,;\s]*),([^,;\s]*),([^;,]*)(?:,[^;]*)?;")
_KMSG_CALLER = re.compile(r",caller=([TC]\d+)[,;]")     # CONFIG_PRINTK_CALLER


def _unescape(data: bytes) -> str:
    return _ESCAPE.sub(lambda m: bytes([int(m[1], 16)]), data).decode("utf-8", "replace")


def _encode(text: str) -> bytes:
    try:
        return text.encode("utf-8", "surrogateescape")     # the bytes a lossy decode stood for
    except UnicodeEncodeError:                             # other lone surrogates: no bytes behind them
        return text.encode("utf-8", "replace")


def looks_like_kmsg(line: str) -> bool:
    """Whether a line is a /dev/kmsg record's header line (`prio,seq,ts,flags;`)."""
    return _KMSG_HEAD.match(line) is not None


def parse_kmsg_record(data: bytes | str, where: str = "record") -> Record:
    """Parse one /dev/kmsg record (header line plus ` KEY=value` lines)."""
    raw = data if isinstance(data, bytes) else _encode(data)
    head, _, rest = raw.partition(b"\n")
    head_text = head.decode("utf-8", "replace")
    m = _KMSG_HEAD.match(head_text)
    if not m:
        raise KernelLogFormatError(f"{where}: malformed /dev/kmsg record (no 'prio,seq,ts,flags;'): "
                                   f"{head_text[:60]!r}")
    numbers = []
    for name, value in zip(("priority", "sequence number", "timestamp"), m.groups()[:3]):
        if not (value.isascii() and value.isdigit()):
            raise KernelLogFormatError(f"{where}: malformed /dev/kmsg record: {name} {value[:30]!r} "
                                       "is not a number")
        if len(value) > _MAX_DIGITS:
            raise KernelLogFormatError(f"{where}: malformed /dev/kmsg record: {name} {value[:30]!r}... "
                                       "is out of range")
        numbers.append(int(value))
    prio, seq, ts_us = numbers
    message = _unescape(head[head.index(b";") + 1:])
    fields = {}
    for cont in rest.decode("utf-8", "replace").splitlines():
        key, eq, value = cont.strip().partition("=")
        if not cont.startswith(" ") or not eq:
            raise KernelLogFormatError(f"{where}: malformed /dev/kmsg continuation line {cont[:60]!r} "
                                       "(expected ' KEY=value')")
        fields[key] = value
    caller = _KMSG_CALLER.search(m.group(0))
    return Record(seq=seq, message=message, prio=prio, ts_us=ts_us, flags=m.group(4) or "-",
                  fields=fields, raw=raw.decode("utf-8", "replace"), caller=caller and caller[1])


@dataclass
class Drained:
    """What one pass over /dev/kmsg returned.

    lost counts records overwritten before they could be read. The kernel says
    only that some were (EPIPE); the count comes from the gap in sequence
    numbers, which is unknown when the overrun hit before the first record we
    read: then lost is the lower bound 1 and lost_exact is False. error says why
    reading stopped early; the records before it are kept.
    """
    records: list[Record]
    lost: int = 0
    lost_exact: bool = True
    truncated: bool = False
    error: str | None = None


def drain(read: Callable[[], bytes]) -> Drained:
    """Read records until the log is empty (EAGAIN). `read` is one read() of the fd."""
    out = Drained(records=[])
    last_seq: int | None = None
    overrun = False
    while len(out.records) < MAX_RECORDS:
        try:
            data = read()
        except BlockingIOError:
            break
        except BrokenPipeError:
            # Our position was overwritten; the kernel has moved it to the
            # oldest record still held, which the next read returns.
            overrun = True
            continue
        except OSError as e:
            out.error = f"read failed: {e.strerror or e}"
            break
        if not data:
            break
        try:
            rec = parse_kmsg_record(data, where=f"/dev/kmsg record {len(out.records) + 1}")
        except KernelLogFormatError as e:
            out.error = str(e)
            break
        if overrun:
            _count_gap(out, last_seq, rec.seq)
            overrun = False
        last_seq = rec.seq
        out.records.append(rec)
    else:
        out.truncated = True
    if overrun:             # an overrun with no record read after it
        _count_gap(out, None, None)
    return out


def _count_gap(out: Drained, last_seq: int | None, next_seq: int | None) -> None:
    if last_seq is None or next_seq is None or next_seq <= last_seq:
        out.lost += 1
        out.lost_exact = False
    else:
        out.lost += next_seq - last_seq - 1


# `[  12.345678]`, `[12.3][T123]`, `[ 2352.930426] [  T53909]` and dmesg -r's `<4>` before it,
# after whatever a console put first (`syzkaller login: `, a shell prompt, a date).
_CONSOLE_PREFIX = re.compile(
    r"(?:^|(?<=\s))(?:<(?P<prio>\d{1,9})>)?\[\s*(?P<sec>\d{1,20})\.(?P<frac>\d+)\]"
    r"(?:\s?\[\s*(?P<caller>[TC]\d+)\])?\s?")


def parse_console_line(number: int, line: str) -> Record:
    """One line of console or dmesg text as a record (its prefix, if any, taken off)."""
    m = _CONSOLE_PREFIX.match(line) or _CONSOLE_PREFIX.search(line, 0, _PROMPT_REACH)
    if not m:
        return Record(seq=number, message=line, raw=line)
    frac = (m["frac"] + "000000")[:6]
    return Record(seq=number, message=line[m.end():], raw=line,
                  prio=int(m["prio"]) if m["prio"] else None,
                  ts_us=int(m["sec"]) * 1_000_000 + int(frac), caller=m["caller"])


_PROMPT_REACH = 80      # how far into a line a console prompt may push the timestamp


def _parse_kmsg_lines(lines: list[str]) -> Iterator[Record]:
    pending: list[str] = []
    start = 0
    for number, line in enumerate(lines, 1):
        if line.startswith(" ") and pending:
            pending.append(line)
            continue
        if pending:
            yield parse_kmsg_record("\n".join(pending), where=f"line {start}")
            pending = []
        if line.strip():
            pending, start = [line], number
    if pending:
        yield parse_kmsg_record("\n".join(pending), where=f"line {start}")


def parse_log_text(text: str) -> list[Record]:
    """Records from a saved kernel log.

    Accepted: a /dev/kmsg dump (`prio,seq,ts,flags;msg`, with ` KEY=value`
    lines), `dmesg -r` (`<4>[  12.3] msg`), plain dmesg (`[  12.345678] msg`) and
    raw console text. The first non-blank line decides: if it is a kmsg record,
    every line must be one (KernelLogFormatError names the first bad line);
    otherwise each line is a record and prefixes are taken where present.
    """
    lines = text.splitlines()
    first = next((ln for ln in lines if ln.strip()), "")
    if looks_like_kmsg(first):
        return list(_parse_kmsg_lines(lines))
    return [parse_console_line(n, ln) for n, ln in enumerate(lines, 1)]
