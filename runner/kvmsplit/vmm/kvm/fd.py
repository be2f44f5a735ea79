"""The one place kvmsplit calls ioctl(2).

ioctls go through libc via ctypes rather than fcntl.ioctl: ctypes releases the
GIL for the duration of the call (so several vCPU threads can sit in KVM_RUN at
once), passes ctypes structs by reference without copying, and returns the
kernel's int result (KVM_CREATE_VM and friends return fds).
"""
from __future__ import annotations

import ctypes
import ctypes.util
import errno
import os

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_libc.ioctl.argtypes = (ctypes.c_int, ctypes.c_ulong, ctypes.c_void_p)
_libc.ioctl.restype = ctypes.c_int


class KvmIoctlError(OSError):
    """An ioctl failed. Carries the ioctl's name so a report can say which."""

    def __init__(self, err: int, name: str, what: str = ""):
        super().__init__(err, f"{name}{' ' + what if what else ''}: {os.strerror(err)}")
        self.ioctl = name


class VmBugged(KvmIoctlError):
    """EIO from a VM or vCPU fd: KVM marked the VM dead (KVM_BUG_ON or
    kvm_vm_bugged()); every later ioctl on it fails the same way."""


class FaultInjector:
    """Makes a named ioctl fail with an errno, once armed.

    Used where a real fault cannot be produced on demand: a dead VM's EIO
    needs a kernel bug. The ioctl still names itself, so the code path that
    handles it is the real one.
    """

    def __init__(self, ioctl: str, err: int = errno.EIO, after: int = 0):
        self.ioctl, self.err, self.after = ioctl, err, after
        self.fired = 0

    def check(self, name: str) -> None:
        if name != self.ioctl:
            return
        if self.after > 0:
            self.after -= 1
            return
        self.fired += 1
        raise _error(self.err, name, "(injected)")


class KvmInterrupted(KvmIoctlError, InterruptedError):
    """EINTR from KVM_RUN: a kick (signal or immediate_exit), not a failure."""


def _error(err: int, name: str, what: str = "") -> KvmIoctlError:
    cls = {errno.EIO: VmBugged, errno.EINTR: KvmInterrupted}.get(err, KvmIoctlError)
    return cls(err, name, what)


class KvmFd:
    """A file descriptor that speaks KVM ioctls; base of System, Vm and Vcpu."""

    fault: FaultInjector | None = None
    fd = -1   # so close() is safe when __init__ failed before opening

    def __init__(self, fd: int):
        self.fd = fd

    def ioctl(self, name: str, request: int, arg=None, *, retry_eintr: bool = True) -> int:
        if self.fault is not None:
            self.fault.check(name)
        if arg is None:
            carg = None
        elif isinstance(arg, int):
            carg = ctypes.c_void_p(arg)
        else:
            carg = ctypes.cast(ctypes.byref(arg), ctypes.c_void_p)
        while True:
            ret = _libc.ioctl(self.fd, request, carg)
            if ret >= 0:
                return ret
            err = ctypes.get_errno()
            if err == errno.EINTR and retry_eintr:
                continue
            raise _error(err, name)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self):
        try:
            self.close()
        except OSError:
            pass
