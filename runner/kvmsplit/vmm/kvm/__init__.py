"""A thin typed layer over /dev/kvm: one class per file descriptor
(Kvm -> Vm -> Vcpu), with each ioctl declared once (name, number, argument
struct) in uapi.py, and KVM_RUN's exits as typed values (exits.py)."""
from kvmsplit.vmm.kvm import uapi
from kvmsplit.vmm.kvm.exits import (
    DirtyRingFullExit,
    FailEntryExit,
    HltExit,
    InternalErrorExit,
    IoExit,
    MmioExit,
    ShutdownExit,
    SystemEventExit,
    UnknownExit,
    VcpuExit,
)
from kvmsplit.vmm.kvm.fd import FaultInjector, KvmInterrupted, KvmIoctlError, VmBugged
from kvmsplit.vmm.kvm.stats import StatsFd
from kvmsplit.vmm.kvm.system import Kvm, KvmUnavailable
from kvmsplit.vmm.kvm.vcpu import DirtyRing, Vcpu
from kvmsplit.vmm.kvm.vm import Vm

__all__ = [
    "DirtyRing", "DirtyRingFullExit", "FailEntryExit", "FaultInjector", "HltExit",
    "InternalErrorExit", "IoExit", "Kvm", "KvmInterrupted", "KvmIoctlError", "KvmUnavailable",
    "MmioExit", "ShutdownExit", "StatsFd", "SystemEventExit", "UnknownExit", "Vcpu", "VcpuExit",
    "Vm", "VmBugged", "uapi",
]
