"""A thin typed layer over /dev/kvm: one class per file descriptor
(Kvm -> Vm -> Vcpu), with ioctl numbers and structs in uapi.py."""
from kvmsplit.vmm.kvm.fd import FaultInjector, KvmIoctlError, VmBugged
from kvmsplit.vmm.kvm.system import Kvm, KvmUnavailable
from kvmsplit.vmm.kvm.vm import Vm
from kvmsplit.vmm.kvm.vcpu import Vcpu, DirtyRing
from kvmsplit.vmm.kvm.stats import StatsFd

__all__ = ["Kvm", "KvmUnavailable", "Vm", "Vcpu", "DirtyRing", "StatsFd",
           "KvmIoctlError", "VmBugged", "FaultInjector"]
