"""KVM_RUN's exits as small typed values, decoded from the kvm_run union.

Only this module and vcpu.py read struct kvm_run; the machine matches on
these types (`match exit:`). Everything is copied out of the shared page
except an IoExit's `data`, which is a view into it so that an IN can be
answered in place: it is valid only while that exit is being handled, and
Vcpu.run() releases it before the next KVM_RUN.
"""
from __future__ import annotations

import mmap
from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar

from kvmsplit.vmm.kvm import uapi


@dataclass(frozen=True)
class IoExit:
    name: ClassVar[str] = "IO"
    port: int
    is_out: bool
    size: int            # bytes per access
    count: int           # accesses (rep ins/outs)
    data: memoryview     # size*count bytes inside kvm_run; an IN's answer goes here


@dataclass(frozen=True)
class MmioExit:
    name: ClassVar[str] = "MMIO"
    phys_addr: int
    data: bytes          # a copy: kvmsplit has no MMIO device to answer a read
    length: int
    is_write: bool


@dataclass(frozen=True)
class HltExit:
    name: ClassVar[str] = "HLT"


@dataclass(frozen=True)
class ShutdownExit:
    name: ClassVar[str] = "SHUTDOWN"


@dataclass(frozen=True)
class DirtyRingFullExit:
    name: ClassVar[str] = "DIRTY_RING_FULL"


@dataclass(frozen=True)
class InternalErrorExit:
    name: ClassVar[str] = "INTERNAL_ERROR"
    suberror: int
    data: tuple[int, ...]


@dataclass(frozen=True)
class FailEntryExit:
    name: ClassVar[str] = "FAIL_ENTRY"
    reason: int          # hardware_entry_failure_reason
    cpu: int


@dataclass(frozen=True)
class SystemEventExit:
    name: ClassVar[str] = "SYSTEM_EVENT"
    type: int
    data: tuple[int, ...]


@dataclass(frozen=True)
class UnknownExit:
    """Any exit kvmsplit has no type for; `name` is KVM's, or the number."""
    reason: int
    name: str


VcpuExit = (IoExit | MmioExit | HltExit | ShutdownExit | DirtyRingFullExit | InternalErrorExit
            | FailEntryExit | SystemEventExit | UnknownExit)


def _io(run: uapi.kvm_run, page: mmap.mmap) -> IoExit:
    io = run.exit.io
    off, n = io.data_offset, io.size * io.count
    return IoExit(io.port, io.direction == uapi.EXIT_IO_OUT, io.size, io.count,
                  memoryview(page)[off:off + n])


def _mmio(run: uapi.kvm_run, page: mmap.mmap) -> MmioExit:
    m = run.exit.mmio
    return MmioExit(m.phys_addr, bytes(m.data[:min(m.len, 8)]), m.len, bool(m.is_write))


def _internal(run: uapi.kvm_run, page: mmap.mmap) -> InternalErrorExit:
    ie = run.exit.internal
    return InternalErrorExit(ie.suberror, tuple(ie.data[:min(ie.ndata, len(ie.data))]))


def _fail_entry(run: uapi.kvm_run, page: mmap.mmap) -> FailEntryExit:
    fe = run.exit.fail_entry
    return FailEntryExit(fe.hardware_entry_failure_reason, fe.cpu)


def _system_event(run: uapi.kvm_run, page: mmap.mmap) -> SystemEventExit:
    se = run.exit.system_event
    return SystemEventExit(se.type, tuple(se.data[:min(se.ndata, len(se.data))]))


_DECODE: dict[int, Callable[[uapi.kvm_run, mmap.mmap], VcpuExit]] = {
    uapi.EXIT_IO: _io,
    uapi.EXIT_MMIO: _mmio,
    uapi.EXIT_HLT: lambda run, page: HltExit(),
    uapi.EXIT_SHUTDOWN: lambda run, page: ShutdownExit(),
    uapi.EXIT_DIRTY_RING_FULL: lambda run, page: DirtyRingFullExit(),
    uapi.EXIT_INTERNAL_ERROR: _internal,
    uapi.EXIT_FAIL_ENTRY: _fail_entry,
    uapi.EXIT_SYSTEM_EVENT: _system_event,
}


def decode(run: uapi.kvm_run, page: mmap.mmap) -> VcpuExit:
    """The exit KVM_RUN just reported in `run`, which lives in `page`."""
    reason = run.exit_reason
    dec = _DECODE.get(reason)
    if dec is None:
        return UnknownExit(reason, uapi.EXIT_NAMES.get(reason, str(reason)))
    return dec(run, page)
