"""Bracket a unit of work with the kernel log: what did the kernel report meanwhile?

start() opens /dev/kmsg and seeks to its end; stop() reads every record logged
since, turns them into reports and compares the taint mask. A log that cannot
be read is never taken as clean: the result says `unchecked` and why.
"""
from __future__ import annotations

import os
import subprocess
from dataclasses import dataclass, field

from kvmsplit.kernellog.records import (
    KERNEL_FACILITY,
    READ_SIZE,
    USER_FACILITY,
    KernelLogFormatError,
    Record,
    drain,
    parse_log_text,
)
from kvmsplit.kernellog.reports import Report, parse_reports
from kvmsplit.kernellog.taint import TAINT_PATH, decode_taint, read_taint

KMSG_PATH = "/dev/kmsg"
DMESG = "dmesg"
DMESG_TIMEOUT_S = 30


@dataclass
class GuardResult:
    """What the kernel logged during the unit of work.

    checked is False when the log could not be read, or not to its end
    (status "unchecked" unless reports were found before that). records are
    the records counted (kernel facility, plus user facility with
    accept_user); lost_records those overwritten before they
    could be read (a lower bound when lost_exact is False). source is where the
    records came from: "/dev/kmsg", "dmesg", or None.
    """
    checked: bool
    reports: list[Report] = field(default_factory=list)
    records: list[Record] = field(default_factory=list)
    lost_records: int = 0
    lost_exact: bool = True
    taint_before: int | None = None
    taint_after: int | None = None
    note: str | None = None
    source: str | None = None

    @property
    def status(self) -> str:
        if self.reports:
            return "reports"
        return "clean" if self.checked else "unchecked"

    @property
    def taint_before_letters(self) -> str:
        return decode_taint(self.taint_before or 0)

    @property
    def taint_after_letters(self) -> str:
        return decode_taint(self.taint_after or 0)

    @property
    def new_taint(self) -> str:
        """Letters set after the work that were clear before it."""
        before = self.taint_before or 0
        return decode_taint((self.taint_after or 0) & ~before)

    @property
    def taint_unchanged(self) -> bool:
        return self.taint_before is not None and self.taint_before == self.taint_after

    @property
    def ok(self) -> bool:
        return self.checked and not self.reports and self.taint_unchanged

    def to_dict(self) -> dict:
        """For results.json. Records are summarised by count: the reports carry their text."""
        return {
            "status": self.status, "ok": self.ok, "checked": self.checked, "note": self.note,
            "source": self.source, "reports": [r.to_dict() for r in self.reports],
            "record_count": len(self.records), "lost_records": self.lost_records,
            "lost_exact": self.lost_exact,
            "taint_before": self.taint_before, "taint_after": self.taint_after,
            "taint_before_letters": self.taint_before_letters,
            "taint_after_letters": self.taint_after_letters, "new_taint": self.new_taint,
        }


class KernelLogGuard:
    """Reports what the kernel logged between start() and stop().

    Counts kernel-facility records only; accept_user=True also counts
    user-facility ones, which is what lines written to /dev/kmsg get (tests
    use that to drive the guard end to end). The paths and the dmesg program
    are parameters so that the fallbacks can be exercised.

        with KernelLogGuard() as g:
            work()
        g.result.status   # "clean", "reports" or "unchecked"
    """

    def __init__(self, accept_user: bool = False, *, kmsg_path: str = KMSG_PATH,
                 dmesg: str = DMESG, taint_path: str = TAINT_PATH):
        self.accept_user = accept_user
        self.kmsg_path = kmsg_path
        # dmesg filters by facility itself: util-linux 2.38's --raw prints the
        # facility unshifted (<5> for user.warn), so its <N> cannot be trusted.
        self.dmesg_cmd = (dmesg, "--raw", "--facility=" + ("kern,user" if accept_user else "kern"))
        self.taint_path = taint_path
        self.result: GuardResult | None = None
        self._started = False
        self._fd: int | None = None
        self._dmesg_after_us: int | None = None   # fallback: records newer than this
        self._notes: list[str] = []
        self._taint_before: int | None = None

    def __enter__(self) -> KernelLogGuard:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def start(self) -> KernelLogGuard:
        """Mark the log's current end: one open and one lseek."""
        if self._started:
            raise RuntimeError("KernelLogGuard.start() called twice")
        self._started = True
        self._taint_before = self._read_taint()
        fd = None
        try:
            fd = os.open(self.kmsg_path, os.O_RDONLY | os.O_NONBLOCK)
            os.lseek(fd, 0, os.SEEK_END)
        except OSError as e:
            if fd is not None:
                os.close(fd)
            self._note(f"cannot read {self.kmsg_path}: {e.strerror or e}")
            self._dmesg_after_us = self._dmesg_mark()
        else:
            self._fd = fd
        return self

    def stop(self) -> GuardResult:
        """Read what was logged since start(). Calling it again returns the same result."""
        if self.result is not None:
            return self.result
        if not self._started:
            raise RuntimeError("KernelLogGuard.stop() called before start()")
        try:
            res = self._collect()
        finally:
            if self._fd is not None:
                os.close(self._fd)
                self._fd = None
        res.reports = parse_reports(res.records)
        res.taint_before, res.taint_after = self._taint_before, self._read_taint()
        res.note = "; ".join(self._notes) or None
        self.result = res
        return res

    def _counted(self, rec: Record) -> bool:
        return rec.facility == KERNEL_FACILITY or (self.accept_user and rec.facility == USER_FACILITY)

    def _collect(self) -> GuardResult:
        if self._fd is not None:
            fd = self._fd
            got = drain(lambda: os.read(fd, READ_SIZE))
            if got.lost:
                self._note(f"{'' if got.lost_exact else 'at least '}{got.lost} record(s) overwritten "
                           "before they could be read")
            if got.truncated:
                self._note(f"stopped reading after {len(got.records)} records")
            if got.error:
                self._note(f"{self.kmsg_path}: {got.error}; kernel log only partly checked")
            # a record lost to overrun, or one past the cap, may have been the
            # WARNING that matters: such a log is not a clean one
            complete = got.error is None and not got.lost and not got.truncated
            return GuardResult(checked=complete, lost_records=got.lost,
                               records=[r for r in got.records if self._counted(r)],
                               lost_exact=got.lost_exact, source=self.kmsg_path)
        if self._dmesg_after_us is not None:
            try:
                records = self._dmesg_records()
            except (OSError, subprocess.SubprocessError, KernelLogFormatError) as e:
                self._note(f"dmesg failed: {e}; kernel log unchecked")
                return GuardResult(checked=False)
            # Timestamps, not line counts: the ring may have dropped old lines since start().
            new = [r for r in records if r.ts_us is not None and r.ts_us > self._dmesg_after_us]
            self._note("read with dmesg instead")
            return GuardResult(checked=True, records=new, source="dmesg")
        self._note("kernel log unchecked")
        return GuardResult(checked=False)

    def _dmesg_records(self) -> list[Record]:
        out = subprocess.run(self.dmesg_cmd, capture_output=True, text=True, check=True,
                             timeout=DMESG_TIMEOUT_S, errors="replace")
        return parse_log_text(out.stdout)

    def _dmesg_mark(self) -> int | None:
        try:
            stamps = [r.ts_us for r in self._dmesg_records() if r.ts_us is not None]
        except (OSError, subprocess.SubprocessError, KernelLogFormatError) as e:
            self._note(f"dmesg failed: {e}")
            return None
        return max(stamps, default=0)

    def _read_taint(self) -> int | None:
        try:
            return read_taint(self.taint_path)
        except (OSError, ValueError) as e:
            self._note(f"cannot read {self.taint_path}: {e}")
            return None

    def _note(self, text: str) -> None:
        if text not in self._notes:
            self._notes.append(text)
