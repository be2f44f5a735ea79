"""The vCPU fd: the mmap'd kvm_run, registers, CPUID, KVM_RUN and the
per-vCPU dirty ring."""
from __future__ import annotations

import ctypes as C
import mmap

from kvmsplit.vmm.kvm import uapi
from kvmsplit.vmm.kvm.fd import KvmFd
from kvmsplit.vmm.kvm.stats import StatsFd


class Vcpu(KvmFd):
    def __init__(self, vm, vcpu_id: int, fd: int):
        super().__init__(fd)
        self.vm = vm
        self.id = vcpu_id
        self._run_map = mmap.mmap(fd, vm.kvm.vcpu_mmap_size(), mmap.MAP_SHARED,
                                  mmap.PROT_READ | mmap.PROT_WRITE)
        self.run_struct = uapi.kvm_run.from_buffer(self._run_map)
        self._run_addr = C.addressof(self.run_struct)
        self._stats: StatsFd | None = None
        self.ring = None
        if vm.dirty_ring_bytes:
            self.ring = DirtyRing(fd, vm.dirty_ring_bytes)

    # -- registers ---------------------------------------------------------------
    def get_regs(self) -> uapi.kvm_regs:
        r = uapi.kvm_regs()
        self.ioctl("KVM_GET_REGS", uapi.KVM_GET_REGS, r)
        return r

    def set_regs(self, r: uapi.kvm_regs) -> None:
        self.ioctl("KVM_SET_REGS", uapi.KVM_SET_REGS, r)

    def get_sregs(self) -> uapi.kvm_sregs:
        s = uapi.kvm_sregs()
        self.ioctl("KVM_GET_SREGS", uapi.KVM_GET_SREGS, s)
        return s

    def set_sregs(self, s: uapi.kvm_sregs) -> None:
        self.ioctl("KVM_SET_SREGS", uapi.KVM_SET_SREGS, s)

    def set_cpuid(self, entries) -> None:
        buf = uapi.kvm_cpuid2(len(entries))()
        buf.nent = len(entries)
        for i, e in enumerate(entries):
            buf.entries[i] = e
        self.ioctl("KVM_SET_CPUID2", uapi.KVM_SET_CPUID2, buf)

    # -- running ------------------------------------------------------------------
    def run(self) -> int:
        """One KVM_RUN (GIL released). Returns the exit reason; raises
        InterruptedError on EINTR so the caller can look at its stop flag."""
        self.ioctl("KVM_RUN", uapi.KVM_RUN, retry_eintr=False)
        return self.run_struct.exit_reason

    def io_data(self) -> memoryview:
        """The data bytes of the current KVM_EXIT_IO (size*count bytes)."""
        io = self.run_struct.exit.io
        off = io.data_offset
        return memoryview(self._run_map)[off:off + io.size * io.count]

    def kick_prepare(self) -> None:
        """Make the next (or current, once signalled) KVM_RUN return EINTR."""
        self.run_struct.immediate_exit = 1

    @property
    def stats(self) -> StatsFd:
        if self._stats is None:
            self._stats = StatsFd(self.ioctl("KVM_GET_STATS_FD", uapi.KVM_GET_STATS_FD))
        return self._stats

    def close(self) -> None:
        if getattr(self, "_stats", None) is not None:
            self._stats.close()
            self._stats = None
        if getattr(self, "ring", None) is not None:
            self.ring.close()
            self.ring = None
        if getattr(self, "_run_map", None) is not None:
            self.run_struct = None
            try:
                self._run_map.close()
            except BufferError:
                pass    # a view is still alive somewhere; the mapping goes with it
            self._run_map = None
        super().close()


class DirtyRing:
    """A vCPU's dirty ring: an array of kvm_dirty_gfn shared with KVM.

    KVM publishes an entry by setting DIRTY; userspace collects it and sets
    RESET; KVM_RESET_DIRTY_RINGS then re-protects those pages and recycles the
    entries. `fetch_index` is ours alone (KVM keeps its own copy).
    """

    def __init__(self, vcpu_fd: int, nbytes: int):
        self._map = mmap.mmap(vcpu_fd, nbytes, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE,
                              offset=uapi.DIRTY_LOG_PAGE_OFFSET * mmap.PAGESIZE)
        self.size = nbytes // C.sizeof(uapi.kvm_dirty_gfn)
        self.entries = (uapi.kvm_dirty_gfn * self.size).from_buffer(self._map)
        self.fetch_index = 0

    def harvest(self) -> list[tuple[int, int]]:
        """Collect every published entry as (slot, offset), marking each for reset."""
        out = []
        ents, size = self.entries, self.size
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
            try:
                self._map.close()
            except BufferError:
                pass    # see Vcpu.close()
            self._map = None
