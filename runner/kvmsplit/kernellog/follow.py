"""Following a live kernel log: each report handed on as soon as it is complete.

    follower = ReportFollower(show)       # show(report) for each complete report
    follower.feed_text(chunk)             # console text, in pieces of any size
    follower.feed_record(record)          # or /dev/kmsg records
    follower.idle()                       # the log has been quiet for a while
    follower.finish()                     # end of the log: the rest, cut short or not

The reports are the batch parser's (parse_reports over the lines so far), so a
followed log gives what `kvmsplit kernellog FILE` gives for the same text. A
report is complete when its printer (CPU or task, where the console tags lines)
starts another report; when an end marker or closing ruler ended it and
SETTLE_LINES more of its printer's lines came (time for the `Kernel panic - not
syncing: Fatal exception` that rejoins an oops); when the log goes quiet; or at
the end. Reports without an end marker (hung tasks, lockdep) are complete at
the next report, on quiet, or at the end.

follow() reads a source to its end or until Ctrl-C/SIGTERM, whichever comes
first: /dev/kmsg (new records only), a FIFO, pty or stdin (until EOF), or a
regular file (from its start, then as it grows, like tail -f).
"""
from __future__ import annotations

import codecs
import errno
import os
import select
import stat
import time
from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum

from kvmsplit.errors import NoInputError
from kvmsplit.kernellog.records import (
    READ_SIZE,
    KernelLogFormatError,
    Record,
    looks_like_kmsg,
    parse_console_line,
    parse_kmsg_record,
)
from kvmsplit.kernellog.reports import Found, Report, find_reports, is_boundary

SETTLE_LINES = 5        # lines after an end marker before a report is final
QUIET_S = 2.0           # a log quiet this long has finished printing what it started
MAX_LINES = 20_000      # a report still open after this many lines is handed on as it is
_KEEP = 8               # lines kept once nothing is pending: a WARN's `cut here` preamble
_REJOIN_REACH = 200     # lines after a report within which `Kernel panic ... Fatal exception` rejoins it
_MAX_KEEP = 2_000       # but no more lines than this are kept for it
_POLL_S = 0.25          # how often a regular file is checked for growth
_KMSG_DEVICE = (1, 11)  # major, minor of /dev/kmsg


class ReportFollower:
    """Reports of a log that is still being written, each handed to `show` once."""

    def __init__(self, show: Callable[[Report], None] | None = None,
                 settle_lines: int = SETTLE_LINES) -> None:
        self.show = show
        self.settle_lines = settle_lines
        self.reports: list[Report] = []      # handed on so far, in order
        self._records: list[Record] = []
        self._lines = 0                       # lines in self._records
        self._base = 0                        # line number (in the whole log) of the first one kept
        self._seen: set[int] = set()          # header line numbers of the reports handed on
        self._numbered = 0                    # console lines numbered so far
        self._partial = ""
        self._decoder = codecs.getincrementaldecoder("utf-8")("replace")
        self._settling = False                # a closed report waits for its settle lines
        self._since_event = 0
        self._in_kmsg = False                 # the last line was a /dev/kmsg dump's record

    # input
    def feed_bytes(self, data: bytes) -> list[Report]:
        return self.feed_text(self._decoder.decode(data))

    def feed_text(self, chunk: str) -> list[Report]:
        """Console or dmesg text; a line is taken once its newline has come."""
        *lines, self._partial = (self._partial + chunk).split("\n")
        out: list[Report] = []
        for line in lines:
            out += self.feed_line(line)
        return out

    def feed_line(self, line: str) -> list[Report]:
        """One line of console, dmesg or /dev/kmsg-dump text."""
        line = line.rstrip("\r")
        if self._in_kmsg and line.startswith(" ") and "=" in line:
            return []       # a /dev/kmsg dump's ` KEY=value` continuation
        self._numbered += 1
        try:
            rec = parse_kmsg_record(line) if looks_like_kmsg(line) else None
        except KernelLogFormatError:
            rec = None
        self._in_kmsg = rec is not None
        return self.feed_record(rec or parse_console_line(self._numbered, line))

    def feed_record(self, rec: Record) -> list[Report]:
        self._records.append(rec)
        new_lines = rec.lines()
        self._lines += len(new_lines)
        event = any(is_boundary(text) for text in new_lines)
        self._since_event = 0 if event else self._since_event + len(new_lines)
        if event or (self._settling and self._since_event >= self.settle_lines) or self._lines > MAX_LINES:
            return self._hand_on(final=self._lines > MAX_LINES)
        return []

    def idle(self) -> list[Report]:
        """The log has been quiet for a while: what it started printing is done."""
        return self._hand_on(final=True)

    def finish(self) -> list[Report]:
        """The end of the log: every report not yet handed on, cut short or not."""
        if self._partial:
            self.feed_line(self._partial)
            self._partial = ""
        return self._hand_on(final=True)

    # output
    def _hand_on(self, final: bool) -> list[Report]:
        found = find_reports(self._records)
        out: list[Report] = []
        self._settling, self._since_event = False, 0      # look again after another SETTLE_LINES
        last = {f.printer: f.header for f in found}     # each printer's last report may still grow
        for f in found:
            if f.header + self._base in self._seen:
                continue
            if final or f.header != last[f.printer] or (f.closed and f.after >= self.settle_lines):
                self._seen.add(f.header + self._base)
                out.append(f.report)
            elif f.closed:
                self._settling = True
        self.reports += out
        for rep in out:
            if self.show:
                self.show(rep)
        if all(f.header + self._base in self._seen for f in found):
            self._trim(found)
        return out

    def _trim(self, found: list[Found]) -> None:
        """Nothing pending: keep the reports a fatal panic may still rejoin (its
        printer wrote little since), else only the last few lines (a `cut here`
        preamble)."""
        recent = [self._lines - f.at for f in found if f.after < _REJOIN_REACH]
        keep_lines = max(max(recent), _KEEP) if recent and max(recent) <= _MAX_KEEP else _KEEP
        keep, lines = [], 0
        for rec in reversed(self._records):
            if lines >= keep_lines:
                break
            keep.append(rec)
            lines += len(rec.lines())
        self._base += self._lines - lines
        self._records, self._lines = keep[::-1], lines


class End(StrEnum):
    """Why following stopped."""
    EOF = "end of input"
    INTERRUPTED = "interrupted"


@dataclass
class _Source:
    fd: int
    kmsg: bool        # one read() is one /dev/kmsg record
    tail: bool        # a regular file: wait for it to grow instead of stopping at its end


def _open(path: str) -> _Source:
    if path == "-":
        return _Source(0, kmsg=False, tail=False)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    except FileNotFoundError:
        raise NoInputError(f"{path}: no such file") from None
    except OSError as e:
        raise NoInputError(f"{path}: {e.strerror}") from None
    st = os.fstat(fd)
    if stat.S_ISDIR(st.st_mode):
        os.close(fd)
        raise NoInputError(f"{path}: is a directory, not a kernel log")
    if stat.S_ISCHR(st.st_mode) and (os.major(st.st_rdev), os.minor(st.st_rdev)) == _KMSG_DEVICE:
        os.lseek(fd, 0, os.SEEK_END)          # only what the kernel logs from now on
        return _Source(fd, kmsg=True, tail=False)
    return _Source(fd, kmsg=False, tail=stat.S_ISREG(st.st_mode))


def follow(path: str, show: Callable[[Report], None], quiet_s: float = QUIET_S) -> End:
    """Hand each report in `path` to `show` as it completes, until the input ends
    or Ctrl-C/SIGTERM (a KeyboardInterrupt); pending reports are handed on either way."""
    src = _open(path)
    follower = ReportFollower(show)
    failed = None
    end = End.EOF
    try:
        _read(src, follower, quiet_s)
    except KeyboardInterrupt:
        end = End.INTERRUPTED
    except OSError as e:
        failed = f"{path}: read failed: {e.strerror or e}"
    finally:
        if src.fd != 0:
            os.close(src.fd)
    follower.finish()                         # what was read is reported even when reading failed
    if failed:
        raise NoInputError(failed)
    return end


def _read(src: _Source, follower: ReportFollower, quiet_s: float) -> None:
    quiet_since = time.monotonic()
    while True:
        if src.tail:                          # select() says a regular file is always ready
            data = _read_once(src)
            if data is None:
                time.sleep(_POLL_S)
        else:
            ready, _, _ = select.select([src.fd], [], [], min(quiet_s, _POLL_S * 4))
            data = _read_once(src) if ready else None
        if data is None:                      # nothing to read just now
            if time.monotonic() - quiet_since >= quiet_s:
                follower.idle()
                quiet_since = float("inf")    # once per quiet spell
            continue
        if data == b"":
            return
        quiet_since = time.monotonic()
        if src.kmsg:
            try:
                follower.feed_record(parse_kmsg_record(data))
            except KernelLogFormatError:
                continue
        else:
            follower.feed_bytes(data)


def _read_once(src: _Source) -> bytes | None:
    """One read: bytes, b"" at the end of the input, None when there is nothing yet."""
    try:
        data = os.read(src.fd, READ_SIZE)
    except BlockingIOError:
        return None
    except BrokenPipeError:                   # /dev/kmsg: records overwritten before we read them
        return None
    except OSError as e:
        if e.errno == errno.EIO:              # a pty whose other side closed
            return b""
        raise
    if data == b"" and src.tail:
        return None                           # a regular file: wait for more
    return data
