"""The one place kvmsplit calls ioctl(2).

ioctls go through libc via ctypes rather than fcntl.ioctl: ctypes releases the
GIL for the duration of the call (so several vCPU threads can sit in KVM_RUN at
once), passes ctypes structs by reference without copying, and returns the
kernel's int result (KVM_CREATE_VM and friends return fds).

Every call names a uapi.Ioctl, and its argument is checked against that
declaration first, the way the selftests' vm_ioctl() checks _IOC_SIZE: a
struct of the wrong size would be a programming error the kernel might not
even notice.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import errno
import os
import threading
from typing import Any, Self

from kvmsplit.vmm.kvm import uapi
from kvmsplit.vmm.kvm.uapi import Ioctl

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_libc.ioctl.argtypes = (ctypes.c_int, ctypes.c_ulong, ctypes.c_void_p)
_libc.ioctl.restype = ctypes.c_int

IoctlArg = int | ctypes.Structure | ctypes.Union | ctypes.Array[Any] | None


class KvmIoctlError(OSError):
    """An ioctl failed. Carries the ioctl's name so a report can say which."""

    def __init__(self, err: int, name: str, what: str = "", detail: str = ""):
        super().__init__(err, f"{name}{' ' + what if what else ''}: {os.strerror(err)}"
                              f"{'; ' + detail if detail else ''}")
        self.ioctl = name


class VmBugged(KvmIoctlError):
    """EIO from a VM or vCPU fd, confirmed by a second ioctl on the VM fd also
    failing with EIO: KVM marked the VM dead (KVM_BUG_ON or kvm_vm_bugged())
    and every later ioctl on it fails the same way."""

    def __init__(self, err: int, name: str, what: str = "", confirmed_by: str = ""):
        super().__init__(err, name, what)
        self.confirmed_by = confirmed_by


class KvmInterrupted(KvmIoctlError, InterruptedError):
    """EINTR from KVM_RUN: a kick (signal or immediate_exit), not a failure."""


class FaultInjector:
    """Makes a named ioctl fail with an errno, once armed.

    Used where a real fault cannot be produced on demand: a dead VM's EIO
    needs a kernel bug. The ioctl still names itself, so the code path that
    handles it is the real one. With `dead_vm` (and EIO), once it has fired
    every later ioctl through this injector fails with EIO too, as on a VM
    KVM has really marked dead, so the confirming probe agrees; without it
    only the named ioctl fails and the probe finds the VM alive.
    """

    def __init__(self, ioctl: str | Ioctl, err: int = errno.EIO, after: int = 0,
                 dead_vm: bool = True):
        self.ioctl = ioctl.name if isinstance(ioctl, Ioctl) else ioctl
        self.err, self.after, self.dead_vm = err, after, dead_vm
        self.fired = 0
        self.dead = False
        self._lock = threading.Lock()   # shared by the controller and every vCPU thread

    def fail(self, name: str) -> int:
        """The errno this call of `name` must fail with, or 0 to let it through."""
        with self._lock:
            if self.dead:
                return errno.EIO
            if name != self.ioctl:
                return 0
            if self.after > 0:
                self.after -= 1
                return 0
            self.fired += 1
            self.dead = self.dead_vm and self.err == errno.EIO
            return self.err


def _check_arg(io: Ioctl, arg: IoctlArg) -> None:
    """Refuse an argument that does not fit the declaration, before the
    kernel sees it (vm_ioctl()'s static_assert on _IOC_SIZE, at run time)."""
    if arg is None or isinstance(arg, int):
        if io.arg is not None:
            raise TypeError(f"{io.name} takes a struct {io.arg.__name__}, not {arg!r}")
        return
    if io.arg is None:
        raise TypeError(f"{io.name} is declared without a struct (_IO); got {type(arg).__name__}")
    size = ctypes.sizeof(arg)
    fits = size >= io.size if io.flexible else size == io.size
    if not fits:
        want = f"at least {io.size}" if io.flexible else str(io.size)
        raise ValueError(f"{io.name} needs a {io.arg.__name__} of {want} bytes; "
                         f"got a {type(arg).__name__} of {size} bytes")


def _c_arg(arg: IoctlArg) -> ctypes.c_void_p | None:
    if arg is None:
        return None
    if isinstance(arg, int):
        return ctypes.c_void_p(arg)
    return ctypes.cast(ctypes.byref(arg), ctypes.c_void_p)


class KvmFd:
    """A file descriptor that speaks KVM ioctls; base of Kvm, Vm and Vcpu."""

    fault: FaultInjector | None = None
    fd = -1   # so close() is safe when __init__ failed before opening

    def __init__(self, fd: int):
        self.fd = fd

    def ioctl(self, io: Ioctl, arg: IoctlArg = None, *, retry_eintr: bool = True) -> int:
        _check_arg(io, arg)
        carg = _c_arg(arg)
        while True:
            ret, note = self._call(io, carg)
            if ret >= 0:
                return ret
            if ret == -errno.EINTR and retry_eintr:
                continue
            raise self._error(-ret, io.name, note)

    def _call(self, io: Ioctl, carg: ctypes.c_void_p | None) -> tuple[int, str]:
        """One ioctl(2), or the injector's fake failure: (result or -errno, note)."""
        if self.fault is not None:
            err = self.fault.fail(io.name)
            if err:
                return -err, "(injected)"
        ret = _libc.ioctl(self.fd, io.number, carg)
        return (ret, "") if ret >= 0 else (-ctypes.get_errno(), "")

    def _vm_fd(self) -> KvmFd | None:
        """The VM fd that answers for this fd's VM; None for the system fd."""
        return None

    def _error(self, err: int, name: str, note: str) -> KvmIoctlError:
        if err == errno.EINTR:
            return KvmInterrupted(err, name, note)
        vm = self._vm_fd()
        if err == errno.EIO and vm is not None:
            return vm._confirm_bugged(name, note)
        return KvmIoctlError(err, name, note)

    def _confirm_bugged(self, name: str, note: str) -> KvmIoctlError:
        """EIO from `name`: call the VM bugged only if it fails a harmless
        KVM_CHECK_EXTENSION too, as the selftests' __vm_ioctl() does; any
        other EIO (a driver's own) must not be reported as a dead VM."""
        probe = uapi.KVM_CHECK_EXTENSION
        while True:
            ret, pnote = self._call(probe, ctypes.c_void_p(uapi.CAP_USER_MEMORY))
            if ret != -errno.EINTR:
                break
        if ret == -errno.EIO:
            return VmBugged(errno.EIO, name, note, confirmed_by=(
                f"{probe.name} on the VM fd failed with EIO too{' ' + pnote if pnote else ''}"))
        answer = "still answers it" if ret >= 0 else f"fails it with {errno.errorcode.get(-ret, -ret)}, not EIO"
        return KvmIoctlError(errno.EIO, name, note, detail=(
            f"not a bugged VM: probed with {probe.name}, the VM {answer}"))

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self.close()
        except OSError:
            pass
