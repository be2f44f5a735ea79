"""The VM fd: memslots, dirty logging (bitmap, manual protect, ring), stats
and vCPU creation. Verbs follow the selftests' kvm_util.c naming."""
from __future__ import annotations

import ctypes as C
from typing import TYPE_CHECKING

from kvmsplit.vmm.kvm import uapi
from kvmsplit.vmm.kvm.fd import KvmFd
from kvmsplit.vmm.kvm.stats import StatsFd
from kvmsplit.vmm.kvm.vcpu import Vcpu

if TYPE_CHECKING:
    from kvmsplit.vmm.kvm.system import Kvm


class Vm(KvmFd):
    def __init__(self, kvm: Kvm, fd: int):
        super().__init__(fd)
        self.kvm = kvm
        self.vcpus: list[Vcpu] = []
        self.dirty_ring_bytes = 0
        self._stats: StatsFd | None = None
        self._use_region2 = kvm.check_extension(uapi.CAP_USER_MEMORY2) > 0

    def _vm_fd(self) -> KvmFd:
        return self

    def check_extension(self, cap: int) -> int:
        """KVM_CHECK_EXTENSION on the VM fd (vm_check_cap()): what this VM offers."""
        return self.ioctl(uapi.KVM_CHECK_EXTENSION, cap)

    # -- set-up ---------------------------------------------------------------
    def enable_cap(self, cap: int, *args: int) -> None:
        ec = uapi.kvm_enable_cap(cap=cap)
        for i, a in enumerate(args):
            ec.args[i] = a
        self.ioctl(uapi.KVM_ENABLE_CAP, ec)

    def set_tss_addr(self, addr: int = 0xFFFBD000) -> None:
        self.ioctl(uapi.KVM_SET_TSS_ADDR, addr)

    def enable_manual_dirty_log_protect(self, initially_set: bool) -> None:
        flags = uapi.DIRTY_LOG_MANUAL_PROTECT_ENABLE
        if initially_set:
            flags |= uapi.DIRTY_LOG_INITIALLY_SET
        self.enable_cap(uapi.CAP_MANUAL_DIRTY_LOG_PROTECT2, flags)

    def enable_dirty_ring(self, nbytes: int, acq_rel: bool) -> None:
        """Must come before the first vCPU is created (KVM's rule)."""
        cap = uapi.CAP_DIRTY_LOG_RING_ACQ_REL if acq_rel else uapi.CAP_DIRTY_LOG_RING
        self.enable_cap(cap, nbytes)
        self.dirty_ring_bytes = nbytes

    def userspace_mem_region_add(self, slot: int, gpa: int, size: int, hva: int,
                                 flags: int = 0) -> None:
        """KVM_SET_USER_MEMORY_REGION(2); also used to change a slot's flags
        (same slot, gpa and size) and, with size 0, to delete it."""
        fields = {"slot": slot, "flags": flags, "guest_phys_addr": gpa, "memory_size": size,
                  "userspace_addr": hva}
        if self._use_region2:
            self.ioctl(uapi.KVM_SET_USER_MEMORY_REGION2, uapi.kvm_userspace_memory_region2(**fields))
        else:
            self.ioctl(uapi.KVM_SET_USER_MEMORY_REGION, uapi.kvm_userspace_memory_region(**fields))

    # -- dirty logging ---------------------------------------------------------
    def get_dirty_log(self, slot: int, bitmap: bytearray | memoryview) -> None:
        """Fill `bitmap` (a writable buffer of ceil(npages/64)*8 bytes) with the
        slot's dirty bits. Without manual protect this also re-protects."""
        buf = (C.c_char * len(bitmap)).from_buffer(bitmap)
        dl = uapi.kvm_dirty_log(slot=slot, dirty_bitmap=C.addressof(buf))
        self.ioctl(uapi.KVM_GET_DIRTY_LOG, dl)

    def clear_dirty_log(self, slot: int, first_page: int, num_pages: int,
                        bitmap: bytearray | memoryview) -> None:
        """KVM_CLEAR_DIRTY_LOG: re-protect the pages whose bits are set in
        `bitmap` (bit 0 = first_page). first_page must be a multiple of 64."""
        buf = (C.c_char * len(bitmap)).from_buffer(bitmap)
        cl = uapi.kvm_clear_dirty_log(slot=slot, num_pages=num_pages, first_page=first_page,
                                      dirty_bitmap=C.addressof(buf))
        self.ioctl(uapi.KVM_CLEAR_DIRTY_LOG, cl)

    def reset_dirty_rings(self) -> int:
        return self.ioctl(uapi.KVM_RESET_DIRTY_RINGS)

    # -- stats -----------------------------------------------------------------
    @property
    def stats(self) -> StatsFd:
        if self._stats is None:
            self._stats = StatsFd(self.ioctl(uapi.KVM_GET_STATS_FD))
        return self._stats

    # -- vCPUs -----------------------------------------------------------------
    def vcpu_add(self, vcpu_id: int) -> Vcpu:
        v = Vcpu(self, vcpu_id, self.ioctl(uapi.KVM_CREATE_VCPU, vcpu_id))
        v.fault = self.fault
        self.vcpus.append(v)
        return v

    def close(self) -> None:
        for v in self.vcpus:
            v.close()
        self.vcpus = []
        if self._stats is not None:
            self._stats.close()
            self._stats = None
        super().close()
