"""Follow a process, its threads and its children with ptrace (python-ptrace)
and hand each KVM ioctl to a decode.Recorder.

Every tracee runs under PTRACE_SYSCALL, so it stops at each syscall's entry
and exit; PTRACE_O_TRACEFORK/VFORK/CLONE attach new threads and processes
before they run, PTRACE_O_TRACEEXEC keeps tracing across execve. At each
stop one PTRACE_GET_SYSCALL_INFO (Linux 5.3+) says entry or exit, the number
and the arguments; anything but ioctl() on an fd whose /proc link is
/dev/kvm, kvm-vm or kvm-vcpu is resumed at once. A KVM ioctl's struct argument
is read from /proc/TID/mem at entry; its duration is the monotonic_ns() gap
between the entry and exit stops.

Overhead: every syscall of every thread costs two stops and two trips
through this Python loop, about 80-100 us per syscall in all (measured: a
16M one-pass `kvmsplit run`, ~11.8k syscalls, takes 2.0-2.6 s traced against
0.9-1.4 s untraced). A call's time runs from just before the tracee is
resumed at its entry stop to the tracer's wake-up at its exit stop, so it
still carries one stop's latency (~10-20 us): compare durations with each
other, not with the kernel's own stats. KVM_RUN time includes the guest's.

Started by the tracer (`run`), the command gets a seccomp filter before its
execve that returns SECCOMP_RET_TRACE for ioctl()s of KVM's type (0xAE) and
lets every other syscall run untraced; its threads and children inherit it.
Then only those ioctls stop (a seccomp stop at entry, a syscall stop at exit):
"stop only on the syscalls that matter". A process joined with `attach` can
not be given a filter, so it stops at every syscall as described above.

The tracer is the only waiter on its tracees: it calls waitpid(-1, __WALL).
"""
from __future__ import annotations

import ctypes as C
import errno
import os
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ptrace import PtraceError
from ptrace.binding import func as pt
from ptrace.debugger import PtraceDebugger, PtraceProcess

from kvmsplit.errors import UnavailableError, UsageError
from kvmsplit.syscalls import decode
from kvmsplit.vmm.kvm import uapi

SYS_ioctl = 16                 # x86_64
PTRACE_GET_SYSCALL_INFO = 0x420E
SYSCALL_INFO_ENTRY, SYSCALL_INFO_EXIT, SYSCALL_INFO_SECCOMP = 1, 2, 3
PTRACE_O_EXITKILL = 0x100000
PTRACE_O_TRACESECCOMP = 0x80
PTRACE_EVENT_SECCOMP = 7
WALL = 0x40000000             # __WALL: threads too
SYSGOOD_TRAP = signal.SIGTRAP | 0x80
STOP_SIGNALS = {signal.SIGSTOP, signal.SIGTSTP, signal.SIGTTIN, signal.SIGTTOU}
_libc = C.CDLL(None, use_errno=True)
SYS_tgkill = 234


class _SockFilter(C.Structure):
    _fields_ = [("code", C.c_uint16), ("jt", C.c_uint8), ("jf", C.c_uint8), ("k", C.c_uint32)]


class _SockFprog(C.Structure):
    _fields_ = [("len", C.c_uint16), ("filter", C.POINTER(_SockFilter))]


AUDIT_ARCH_X86_64 = 0xC000003E
SECCOMP_RET_TRACE, SECCOMP_RET_ALLOW = 0x7FF00000, 0x7FFF0000
# struct seccomp_data: nr @0, arch @4, instruction_pointer @8, args[6] @16 (args[1]'s low word @24)
KVM_IOCTL_FILTER = (
    (0x20, 0, 0, 4),                    # A = arch
    (0x15, 0, 7, AUDIT_ARCH_X86_64),    # not x86_64: allow
    (0x20, 0, 0, 0),                    # A = nr
    (0x15, 0, 5, SYS_ioctl),            # not ioctl: allow
    (0x20, 0, 0, 24),                   # A = request (low 32 bits)
    (0x74, 0, 0, 8),                    # A >>= 8
    (0x54, 0, 0, 0xFF),                 # A &= 0xff: the ioctl type
    (0x15, 0, 1, 0xAE),                 # KVMIO?
    (0x06, 0, 0, SECCOMP_RET_TRACE),
    (0x06, 0, 0, SECCOMP_RET_ALLOW),
)


def _install_kvm_filter() -> None:
    """In the child, before execve: trace KVM ioctls only (raises OSError)."""
    prog = (_SockFilter * len(KVM_IOCTL_FILTER))(*[_SockFilter(*f) for f in KVM_IOCTL_FILTER])
    fprog = _SockFprog(len(KVM_IOCTL_FILTER), prog)
    if os.geteuid() != 0 and _libc.prctl(38, 1, 0, 0, 0) != 0:         # PR_SET_NO_NEW_PRIVS
        raise OSError(C.get_errno(), "PR_SET_NO_NEW_PRIVS")
    if _libc.prctl(22, 2, C.byref(fprog), 0, 0) != 0:                   # PR_SET_SECCOMP, SECCOMP_MODE_FILTER
        raise OSError(C.get_errno(), "seccomp filter")


def _spawn_filtered(argv: list[str]) -> tuple[int, int]:
    """fork; the child stops for its tracer, installs the filter and execs argv. Returns the pid
    and the read end of a pipe on which a failed execve (or filter) leaves its errno."""
    r, w = os.pipe2(os.O_CLOEXEC)
    pid = os.fork()
    if pid == 0:
        try:
            os.close(r)
            pt.ptrace_traceme()
            os.kill(os.getpid(), signal.SIGSTOP)        # the tracer sets its options now
            _install_kvm_filter()
            os.execvp(argv[0], argv)
        except OSError as e:
            os.write(w, str(e.errno or errno.ENOSYS).encode())
        finally:
            os._exit(127)
    os.close(w)
    return pid, r


class _SyscallInfo(C.Structure):
    # struct ptrace_syscall_info (include/uapi/linux/ptrace.h); u: entry {nr, args[6]} or exit {rval, is_error}
    _fields_ = [("op", C.c_uint8), ("pad", C.c_uint8 * 3), ("arch", C.c_uint32),
                ("instruction_pointer", C.c_uint64), ("stack_pointer", C.c_uint64),
                ("u", C.c_uint64 * 8)]


@dataclass
class _Thread:
    tid: int
    tgid: int
    proc: PtraceProcess
    pending: decode.Call | None = None
    stopped: bool = True
    starting: bool = False      # auto-attached: its first stop is a SIGSTOP not to deliver


@dataclass
class TraceResult:
    recorder: decode.Recorder
    exit_code: int | None          # the traced command's (or attached process's): code, or 128+signal
    signal: str | None
    wall_ns: int
    syscalls: int                  # syscall-entry stops seen: the tracing overhead's unit
    kvm_ioctls: int
    interrupted: bool = False
    attached: bool = False

    def to_dict(self) -> dict[str, Any]:
        return {"exit_code": self.exit_code, "signal": self.signal, "wall_s": round(self.wall_ns / 1e9, 3),
                # CLOCK_MONOTONIC is system-wide: another process's times line up with the events' ms
                "t0_monotonic_s": self.recorder.t0 / 1e9,
                "syscalls_seen": self.syscalls, "kvm_ioctls": self.kvm_ioctls, "interrupted": self.interrupted,
                "attached": self.attached, **self.recorder.to_dict()}


def _tgid(tid: int) -> int:
    try:
        with open(f"/proc/{tid}/status") as f:
            for line in f:
                if line.startswith("Tgid:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return tid


def _tgkill(tgid: int, tid: int, sig: int) -> None:
    _libc.syscall(SYS_tgkill, tgid, tid, sig)


class Tracer:
    """One trace session: `run(argv)` or `attach(pid)`, then the loop until
    every tracee is gone."""

    def __init__(self, on_event: Callable[[dict[str, Any]], None] | None = None,
                 events_cap: int = decode.EVENTS_CAP):
        self.debugger = PtraceDebugger()
        self.debugger.traceFork()
        self.debugger.traceClone()
        self.debugger.traceExec()
        self.on_event = on_event
        self.threads: dict[int, _Thread] = {}
        self.t0 = time.monotonic_ns()
        self.rec = decode.Recorder(self.t0, events_cap)
        self.root = 0
        self.exit_code: int | None = None
        self.exit_signal: str | None = None
        self.syscalls = 0
        self.seccomp = False          # run(): a filter makes only KVM ioctls stop
        self.kvm_ioctls = 0
        self._info = _SyscallInfo()
        self._info_addr = C.addressof(self._info)
        self._run_page: dict[tuple[int, str], int] = {}     # (tgid, vcpu link) -> kvm_run address
        self._mem: dict[int, int] = {}                       # tgid -> /proc/TGID/mem fd

    # -- starting ------------------------------------------------------------
    def run(self, argv: list[str]) -> TraceResult:
        """Start `argv` under ptrace and trace it to its end."""
        self.debugger.options |= PTRACE_O_EXITKILL | PTRACE_O_TRACESECCOMP
        self.seccomp = True
        pid, err = _spawn_filtered(argv)
        try:
            proc = self.debugger.addProcess(pid, is_attached=True)     # waits for its SIGSTOP, sets options
        except Exception:
            os.close(err)
            raise
        self._exec_or_fail(pid, err, argv[0])
        self.root = pid
        self.t0 = self.rec.t0 = time.monotonic_ns()
        self.threads[pid] = _Thread(pid, pid, proc)
        self._resume(self.threads[pid], 0)
        old_int = signal.signal(signal.SIGINT, signal.SIG_IGN)      # the terminal's ^C reaches the command too
        old_term = signal.signal(signal.SIGTERM, lambda s, f: os.kill(pid, signal.SIGTERM))
        try:
            self._loop()
        finally:
            signal.signal(signal.SIGINT, old_int)
            signal.signal(signal.SIGTERM, old_term)
        return self._result(attached=False)

    def _exec_or_fail(self, pid: int, err: int, name: str) -> None:
        """Let the child install its filter and exec; a UsageError if it could not."""
        try:
            pt.ptrace_cont(pid, 0)
            while True:
                _, status = os.waitpid(pid, WALL)
                if os.WIFSTOPPED(status) and status >> 16 == pt.PTRACE_EVENT_EXEC:
                    return                          # the command runs: the loop resumes it
                if os.WIFEXITED(status) or os.WIFSIGNALED(status):
                    code = os.read(err, 16).decode() or str(errno.ENOEXEC)
                    raise UsageError(f"cannot run {name}: {os.strerror(int(code))}")
                pt.ptrace_cont(pid, 0)               # anything else before the exec: go on
        finally:
            os.close(err)

    def attach(self, pid: int) -> TraceResult:
        """Attach every thread of a running process and trace it until it
        ends, or until ^C/SIGTERM, which detach it and leave it running."""
        if pid <= 0:
            raise UsageError(f"--pid {pid}: not a process id")
        if pid == os.getpid():
            raise UsageError("--pid: kvmsplit cannot trace itself")
        if not os.path.isdir(f"/proc/{pid}/task"):
            raise UnavailableError(f"cannot attach to pid {pid}: no such process")
        self.root = pid
        try:
            while True:
                try:
                    tids = sorted(int(t) for t in os.listdir(f"/proc/{pid}/task"))
                except OSError:
                    tids = []
                new = [t for t in tids if t not in self.threads]
                if not new:
                    break
                for tid in new:
                    try:
                        proc = self.debugger.addProcess(tid, is_attached=False, is_thread=tid != pid)
                    except PtraceError as e:
                        if e.errno == errno.ESRCH and tid != pid:
                            continue                 # a thread that ended meanwhile
                        why = os.strerror(e.errno) if e.errno else str(e)
                        raise UnavailableError(f"cannot attach to pid {pid}: {why}") from None
                    self.threads[tid] = _Thread(tid, pid, proc)
        except BaseException:
            self._detach_all()
            raise
        if not self.threads:
            raise UnavailableError(f"cannot attach to pid {pid}: it has no threads left")
        self.t0 = self.rec.t0 = time.monotonic_ns()
        for th in list(self.threads.values()):
            self._resume(th, 0)
        interrupted = False
        try:
            self._loop()
        except KeyboardInterrupt:
            interrupted = True
            self._detach_all()
        r = self._result(attached=True)
        r.interrupted = interrupted
        return r

    def _result(self, attached: bool) -> TraceResult:
        for fd in self._mem.values():
            os.close(fd)
        self._mem.clear()
        return TraceResult(self.rec, self.exit_code, self.exit_signal, time.monotonic_ns() - self.t0,
                           self.syscalls, self.kvm_ioctls, attached=attached)

    # -- the loop --------------------------------------------------------------
    def _resume(self, th: _Thread, sig: int) -> None:
        """On to the next stop: every syscall's (attached), or under the filter the next KVM ioctl,
        except right after its seccomp stop, where its exit is the next stop wanted."""
        try:
            if self.seccomp and th.pending is None:
                pt.ptrace_cont(th.tid, sig)
            else:
                pt.ptrace_syscall(th.tid, sig)
            th.stopped = False
        except PtraceError as e:
            if e.errno != errno.ESRCH:      # killed meanwhile (another thread's exit_group): its exit comes next
                raise

    def _new(self, tid: int, parent: _Thread | None) -> _Thread:
        proc = PtraceProcess(self.debugger, tid, is_attached=True, parent=parent.proc if parent else None,
                             is_thread=True)
        self.debugger.dict[tid] = proc
        self.debugger.list.append(proc)
        th = self.threads[tid] = _Thread(tid, _tgid(tid), proc)
        return th

    def _loop(self) -> None:
        while self.threads:
            try:
                tid, status = os.waitpid(-1, WALL)
            except ChildProcessError:
                break
            now = time.monotonic_ns()
            if os.WIFEXITED(status) or os.WIFSIGNALED(status):
                self._gone(tid, status, now)
                continue
            if not os.WIFSTOPPED(status):
                continue
            sig, event = os.WSTOPSIG(status), status >> 16
            th = self.threads.get(tid)
            if th is None:
                # a new thread or child reporting before its parent's fork/clone event
                th = self._new(tid, None)
                if sig == signal.SIGSTOP and not event:
                    self._resume(th, 0)
                    continue
            th.stopped = True
            if th.starting and sig == signal.SIGSTOP and not event:
                th.starting = False
                self._resume(th, 0)
            elif sig == SYSGOOD_TRAP:
                self._syscall_stop(th, now)
                if th.pending is not None and th.pending.t_exit is None:
                    th.pending.t_entry = time.monotonic_ns()    # after decoding: the clock runs in the kernel
                self._resume(th, 0)
            elif event == PTRACE_EVENT_SECCOMP:
                self._syscall_stop(th, now)         # a KVM ioctl's entry (the filter chose it)
                if th.pending is not None:
                    th.pending.t_entry = time.monotonic_ns()
                self._resume(th, 0)
            elif event:
                self._ptrace_event(th, event)
                self._resume(th, 0)
            elif sig in STOP_SIGNALS and self._group_stop(tid):
                self._resume(th, 0)
            else:
                self._resume(th, 0 if sig == signal.SIGTRAP else sig)

    def _group_stop(self, tid: int) -> bool:
        try:
            pt.ptrace_getsiginfo(tid)
            return False
        except PtraceError as e:
            return e.errno == errno.EINVAL

    def _ptrace_event(self, th: _Thread, event: int) -> None:
        if event in (pt.PTRACE_EVENT_FORK, pt.PTRACE_EVENT_VFORK, pt.PTRACE_EVENT_CLONE):
            new = pt.ptrace_geteventmsg(th.tid)
            if new not in self.threads:
                self._new(new, th).starting = True    # its first stop, a SIGSTOP, is still to come
        elif event == pt.PTRACE_EVENT_EXEC:
            former = pt.ptrace_geteventmsg(th.tid)
            if former != th.tid and former in self.threads:
                self._forget(former)
            th.pending = None
            th.tgid = _tgid(th.tid)
            self._drop_process_caches(th.tgid)

    def _forget(self, tid: int) -> None:
        th = self.threads.pop(tid, None)
        if th is not None:
            th.proc.running = False
            th.proc.is_attached = False
            self.debugger.deleteProcess(pid=tid)

    def _drop_process_caches(self, tgid: int) -> None:
        fd = self._mem.pop(tgid, None)
        if fd is not None:
            os.close(fd)
        for k in [k for k in self._run_page if k[0] == tgid]:
            del self._run_page[k]

    def _gone(self, tid: int, status: int, now: int) -> None:
        th = self.threads.get(tid)
        if th is not None:
            th.proc.processStatus(status)        # python-ptrace's bookkeeping: not running, detached
            self.threads.pop(tid, None)
            self.debugger.deleteProcess(pid=tid)
            if tid == th.tgid:
                self.rec.process_gone(th.tgid, now)
                self._drop_process_caches(th.tgid)
        if tid == self.root:
            if os.WIFEXITED(status):
                self.exit_code = os.WEXITSTATUS(status)
            else:
                sig = os.WTERMSIG(status)
                self.exit_code = 128 + sig
                self.exit_signal = signal.Signals(sig).name

    # -- one syscall stop ----------------------------------------------------
    def _syscall_stop(self, th: _Thread, now: int) -> None:
        info = self._info
        try:
            pt.ptrace(PTRACE_GET_SYSCALL_INFO, th.tid, C.sizeof(info), self._info_addr)
        except PtraceError:
            return
        if info.op in (SYSCALL_INFO_ENTRY, SYSCALL_INFO_SECCOMP):     # same layout: nr, args[6]
            self.syscalls += 1
            th.pending = None
            if info.u[0] == SYS_ioctl and decode.is_kvm_request(info.u[2]):
                self._ioctl_entry(th, int(info.u[1]) & 0xFFFFFFFF, int(info.u[2]) & 0xFFFFFFFF, int(info.u[3]), now)
        elif info.op == SYSCALL_INFO_EXIT and th.pending is not None:
            c, th.pending = th.pending, None
            c.t_exit = now
            c.ret = C.c_int64(info.u[0]).value
            if c.name == "KVM_RUN" and c.ret == 0:
                c.run_exit = self._run_exit(c)
            self.kvm_ioctls += 1
            ev = self.rec.finish(c)
            if ev is not None and self.on_event is not None:
                self.on_event(ev)

    def _ioctl_entry(self, th: _Thread, fd: int, request: int, arg: int, now: int) -> None:
        try:
            link = os.readlink(f"/proc/{th.tid}/fd/{fd}")
        except OSError:
            return
        kind = decode.fd_kind(link)
        if kind is None:
            return
        name = decode.ioctl_name(request)
        data = None
        size = decode.READ_SIZE.get(name)
        if size:
            data = self._read(th, arg, size)
        th.pending = decode.Call(th.tgid, th.tid, fd, kind, link, name, request, arg, now,
                                 decode.decode_args(name, arg, data))

    def _read(self, th: _Thread, addr: int, size: int) -> bytes | None:
        try:
            data = th.proc.readBytes(addr, size)
        except Exception:      # python-ptrace's ProcessError/PtraceError: unreadable address
            return None
        return data if len(data) == size else None

    def _run_exit(self, c: decode.Call) -> str | None:
        """kvm_run.exit_reason from the vCPU's mmap'd page (its mapping in
        /proc/PID/maps carries the fd's name), or None."""
        key = (c.tgid, c.link)
        addr = self._run_page.get(key)
        if addr is None:
            addr = self._find_run_page(c.tgid, c.link)
            if addr is None:
                return None
            self._run_page[key] = addr
        fd = self._mem.get(c.tgid)
        try:
            if fd is None:
                fd = self._mem[c.tgid] = os.open(f"/proc/{c.tgid}/mem", os.O_RDONLY)
            raw = os.pread(fd, 4, addr + decode.KVM_RUN_EXIT_REASON)
        except OSError:
            self._run_page.pop(key, None)
            return None
        if len(raw) != 4:
            return None
        reason = int.from_bytes(raw, "little")
        return uapi.EXIT_NAMES.get(reason, str(reason))

    def _find_run_page(self, tgid: int, link: str) -> int | None:
        try:
            with open(f"/proc/{tgid}/maps") as f:
                for line in f:
                    cols = line.split(None, 5)
                    if len(cols) == 6 and cols[5].rstrip("\n") == link and int(cols[2], 16) == 0:
                        return int(cols[0].split("-")[0], 16)
        except OSError:
            pass
        return None

    # -- detaching (--pid, on ^C) --------------------------------------------------
    def _detach_all(self, timeout_s: float = 3.0) -> None:
        """Leave every tracee running untraced: stop each with its own
        SIGSTOP, and detach it at that signal's delivery stop, suppressing it."""
        for th in list(self.threads.values()):
            if th.stopped:
                try:
                    pt.ptrace_detach(th.tid, 0)
                except PtraceError:
                    pass
                self._forget(th.tid)
            else:
                _tgkill(th.tgid, th.tid, signal.SIGSTOP)
        deadline = time.monotonic() + timeout_s
        while self.threads and time.monotonic() < deadline:
            try:
                tid, status = os.waitpid(-1, WALL | os.WNOHANG)
            except ChildProcessError:
                break
            if tid == 0:
                time.sleep(0.001)
                continue
            if not os.WIFSTOPPED(status):
                self._forget(tid)
                continue
            sig, event = os.WSTOPSIG(status), status >> 16
            try:
                if tid not in self.threads:                 # a child born meanwhile: at its first stop
                    pt.ptrace_detach(tid, 0)
                elif sig == signal.SIGSTOP and not event:
                    pt.ptrace_detach(tid, 0)
                    self._forget(tid)
                else:
                    deliver = sig if sig != SYSGOOD_TRAP and not event and sig != signal.SIGTRAP else 0
                    pt.ptrace_cont(tid, deliver)
            except PtraceError:
                self._forget(tid)
        for tid in list(self.threads):
            self._forget(tid)
