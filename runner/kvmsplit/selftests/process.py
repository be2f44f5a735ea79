"""Running one selftest binary: its own process group, a wall-clock limit,
and both output streams kept (and logged, interleaved as they came).

Selftests fork (hardware_disable_test runs hundreds of children) and spawn
vCPU threads, so a timeout kills the whole process group, and after any exit
whatever is left of the group is killed too: a test must not outlive its
scenario and perturb the next one.
"""
from __future__ import annotations

import os
import selectors
import signal
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

STREAM_LIMIT = 8 << 20     # bytes kept in memory per stream; the log file has everything
DRAIN_AFTER_KILL_S = 5.0   # a killed group closes its pipes at once; don't wait forever for one that escaped
DRAIN_AFTER_EXIT_S = 1.0   # output still in flight when the test exits
REAP_WAIT_S = 2.0
POLL_S = 0.1               # how often to look whether the test itself has exited


@dataclass
class Completed:
    argv: list[str]
    returncode: int | None              # None when it was killed for the timeout, or would not die
    timed_out: bool
    duration_s: float
    stdout: str
    stderr: str
    truncated: bool = False             # a stream outgrew STREAM_LIMIT: its head was dropped
    leftover: list[int] = field(default_factory=list)    # group members alive after the test exited
    unkillable: list[int] = field(default_factory=list)  # still alive after SIGKILL (stuck in the kernel)

    @property
    def signal(self) -> str | None:
        if self.returncode is not None and self.returncode < 0:
            try:
                return signal.Signals(-self.returncode).name
            except ValueError:
                return f"signal {-self.returncode}"
        return None


def group_members(pgid: int) -> list[int]:
    """Live (non-zombie) processes in process group `pgid`."""
    out = []
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            stat = Path(f"/proc/{d}/stat").read_text()
        except OSError:
            continue
        # "pid (comm) state ppid pgrp ...": comm may hold spaces and parentheses
        fields = stat[stat.rindex(")") + 2:].split()
        if int(fields[2]) == pgid and fields[0] != "Z":
            out.append(int(d))
    return out


def _kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def _kill_and_wait(pgid: int) -> list[int]:
    """SIGKILL the group and wait for it to go; returns who would not."""
    _kill_group(pgid)
    end = time.monotonic() + REAP_WAIT_S
    while (alive := group_members(pgid)) and time.monotonic() < end:
        time.sleep(0.02)
    return alive


class _HeldSignals:
    """Holds Ctrl-C and SIGTERM while the test is being started, to raise them
    once the caller can clean up: a KeyboardInterrupt inside Popen, after the
    fork, would leave the test running with nobody left to kill it."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self):
        self.old: dict = {}
        self.got: int | None = None

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():    # only it may set handlers
            for sig in self.SIGNALS:
                old = signal.getsignal(sig)
                if old is not None:          # None: a handler Python cannot put back
                    self.old[sig] = signal.signal(sig, self._hold)
        return self

    def _hold(self, signum, frame):
        self.got = self.got or signum

    def __exit__(self, *exc):
        for sig, old in self.old.items():
            signal.signal(sig, old)

    def deliver(self) -> None:
        """Raise a held signal through the handler it was meant for."""
        if self.got is not None:
            signal.raise_signal(self.got)


def run(argv: list[str], timeout: float, log: Path | None = None, cwd: Path | None = None) -> Completed:
    t0 = time.monotonic()
    held, proc, sel, logf = _HeldSignals(), None, None, None
    try:
        with held:
            proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                    stderr=subprocess.PIPE, cwd=cwd, start_new_session=True)
        held.deliver()
        pgid = proc.pid
        out_fd, err_fd = proc.stdout.fileno(), proc.stderr.fileno()
        bufs = {out_fd: bytearray(), err_fd: bytearray()}
        truncated = timed_out = exited = False
        logf = open(log, "wb") if log else None
        sel = selectors.DefaultSelector()
        for f in (proc.stdout, proc.stderr):
            sel.register(f, selectors.EVENT_READ)
        deadline = t0 + timeout
        while sel.get_map():
            now = time.monotonic()
            if not exited and proc.poll() is not None:
                # the test is over; a child it left behind may hold the pipes open
                exited, deadline = True, min(deadline, now + DRAIN_AFTER_EXIT_S)
            if now >= deadline:
                if exited or timed_out:
                    break                   # what still holds a pipe is dealt with below
                timed_out = True
                _kill_group(pgid)
                deadline = now + DRAIN_AFTER_KILL_S
            for key, _ in sel.select(min(deadline - now, POLL_S)):
                chunk = os.read(key.fd, 65536)
                if not chunk:
                    sel.unregister(key.fileobj)
                    continue
                if logf:
                    logf.write(chunk)
                    logf.flush()
                buf = bufs[key.fd]
                buf += chunk
                if len(buf) > STREAM_LIMIT:
                    del buf[:len(buf) - STREAM_LIMIT]
                    truncated = True
        if not exited and not timed_out:
            try:                            # it closed its output but runs on
                proc.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                timed_out = True
        duration = time.monotonic() - t0
        # whatever of the group outlived the test (or the kill) goes now
        leftover = [] if timed_out else group_members(pgid)
        unkillable = _kill_and_wait(pgid) if timed_out or leftover else []
        try:
            rc = proc.wait(timeout=REAP_WAIT_S)
        except subprocess.TimeoutExpired:
            rc = None                       # in D state: reported through `unkillable`
    except BaseException:
        if proc is not None:                # Ctrl-C, SIGTERM: the test goes with us
            _kill_and_wait(proc.pid)
            try:
                proc.wait(timeout=REAP_WAIT_S)
            except subprocess.TimeoutExpired:
                pass
        raise
    finally:
        if sel:
            sel.close()
        if proc is not None:
            proc.stdout.close()
            proc.stderr.close()
        if logf:
            logf.close()
    return Completed(argv=list(argv), returncode=None if timed_out else rc,
                     timed_out=timed_out, duration_s=duration,
                     stdout=bufs[out_fd].decode(errors="replace"),
                     stderr=bufs[err_fd].decode(errors="replace"),
                     truncated=truncated, leftover=leftover, unkillable=unkillable)
