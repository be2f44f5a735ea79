"""The vCPU fd: the mmap'd kvm_run, registers, CPUID, KVM_RUN and the
per-vCPU dirty ring."""
from __future__ import annotations

import ctypes as C
import errno
import mmap
from collections.abc import Sequence
from typing import TYPE_CHECKING

from kvmsplit.vmm.kvm import exits, uapi
from kvmsplit.vmm.kvm.fd import KvmFd, KvmIoctlError
from kvmsplit.vmm.kvm.stats import StatsFd

if TYPE_CHECKING:
    from kvmsplit.vmm.kvm.vm import Vm


class Vcpu(KvmFd):
    # class defaults, so close() is safe when __init__ failed half-way
    _run_map: mmap.mmap | None = None
    _kvm_run: uapi.kvm_run | None = None
    _io_view: memoryview | None = None       # the last IoExit's data, released by the next run()
    _stats: StatsFd | None = None
    ring: DirtyRing | None = None

    def __init__(self, vm: Vm, vcpu_id: int, fd: int):
        super().__init__(fd)
        self.vm = vm
        self.id = vcpu_id
        self._run_map = mmap.mmap(fd, vm.kvm.vcpu_mmap_size(), mmap.MAP_SHARED,
                                  mmap.PROT_READ | mmap.PROT_WRITE)
        self._kvm_run = uapi.kvm_run.from_buffer(self._run_map)
        self.ring = DirtyRing(fd, vm.dirty_ring_bytes) if vm.dirty_ring_bytes else None

    def _vm_fd(self) -> KvmFd:
        return self.vm     # an EIO here is confirmed (or not) on the VM fd

    # -- registers ---------------------------------------------------------------
    def get_regs(self) -> uapi.kvm_regs:
        r = uapi.kvm_regs()
        self.ioctl(uapi.KVM_GET_REGS, r)
        return r

    def set_regs(self, r: uapi.kvm_regs) -> None:
        self.ioctl(uapi.KVM_SET_REGS, r)

    def get_sregs(self) -> uapi.kvm_sregs:
        s = uapi.kvm_sregs()
        self.ioctl(uapi.KVM_GET_SREGS, s)
        return s

    def set_sregs(self, s: uapi.kvm_sregs) -> None:
        self.ioctl(uapi.KVM_SET_SREGS, s)

    def set_cpuid(self, entries: Sequence[uapi.kvm_cpuid_entry2]) -> None:
        buf = uapi.kvm_cpuid2(len(entries))()
        buf.nent = len(entries)
        for i, e in enumerate(entries):
            buf.entries[i] = e
        self.ioctl(uapi.KVM_SET_CPUID2, buf)

    # -- running ------------------------------------------------------------------
    def run(self) -> exits.VcpuExit:
        """One KVM_RUN (GIL released), returning the exit it reported. Raises
        InterruptedError (KvmInterrupted) on EINTR so the caller can look at
        its stop flag."""
        # locals: a close() racing with a stop() that timed out must not pull
        # the page from under the decoding (it cannot unmap while they live)
        run, page = self._kvm_run, self._run_map
        if run is None or page is None:
            raise KvmIoctlError(errno.EBADF, uapi.KVM_RUN.name, f"(vcpu {self.id} is closed)")
        self._release_io_view()
        self.ioctl(uapi.KVM_RUN, retry_eintr=False)
        ex = exits.decode(run, page)
        if isinstance(ex, exits.IoExit):
            self._io_view = ex.data
        return ex

    def _release_io_view(self) -> None:
        # An IoExit's data is a view of the kvm_run page, valid only until the
        # next KVM_RUN; released here, a view kept by mistake (a traceback, a
        # handler's frame) can no longer pin the mapping past close().
        if self._io_view is not None:
            self._io_view.release()
            self._io_view = None

    def kick_prepare(self) -> None:
        """Make the next (or current, once signalled) KVM_RUN return EINTR."""
        if self._kvm_run is not None:
            self._kvm_run.immediate_exit = 1

    @property
    def stats(self) -> StatsFd:
        if self._stats is None:
            self._stats = StatsFd(self.ioctl(uapi.KVM_GET_STATS_FD))
        return self._stats

    def close(self) -> None:
        if self._stats is not None:
            self._stats.close()
            self._stats = None
        if self.ring is not None:
            self.ring.close()
            self.ring = None
        if self._run_map is not None:
            self._release_io_view()
            self._kvm_run = None
            _unmap(self._run_map)
            self._run_map = None
        super().close()


def _unmap(m: mmap.mmap) -> None:
    try:
        m.close()
    except BufferError:
        pass    # a view is still alive somewhere; the mapping goes with it


class DirtyRing:
    """A vCPU's dirty ring: an array of kvm_dirty_gfn shared with KVM.

    KVM publishes an entry by setting DIRTY; userspace collects it and sets
    RESET; KVM_RESET_DIRTY_RINGS then re-protects those pages and recycles the
    entries. `fetch_index` is ours alone (KVM keeps its own copy).
    """

    def __init__(self, vcpu_fd: int, nbytes: int):
        self._map: mmap.mmap | None = mmap.mmap(vcpu_fd, nbytes, mmap.MAP_SHARED,
                                                mmap.PROT_READ | mmap.PROT_WRITE,
                                                offset=uapi.DIRTY_LOG_PAGE_OFFSET * mmap.PAGESIZE)
        self.size = nbytes // C.sizeof(uapi.kvm_dirty_gfn)
        self.entries: C.Array[uapi.kvm_dirty_gfn] | None = \
            (uapi.kvm_dirty_gfn * self.size).from_buffer(self._map)
        self.fetch_index = 0

    def harvest(self) -> list[tuple[int, int]]:
        """Collect every published entry as (slot, offset), marking each for reset."""
        out: list[tuple[int, int]] = []
        ents, size = self.entries, self.size
        if ents is None:
            raise ValueError("dirty ring is closed")
        while True:
            e = ents[self.fetch_index % size]
            if not (e.flags & uapi.DIRTY_GFN_F_DIRTY):
                break
            out.append((e.slot, e.offset))
            e.flags = uapi.DIRTY_GFN_F_RESET  # the ACQ_REL handshake: written after the read
            self.fetch_index += 1
        return out

    def close(self) -> None:
        if self._map is not None:
            self.entries = None
            _unmap(self._map)
            self._map = None
