"""A thin typed layer over /dev/kvm: one class per file descriptor
(Kvm -> Vm -> Vcpu), with ioctl numbers and structs in uapi.py."""
from .fd import FaultInjector, KvmIoctlError, VmBugged
from .system import Kvm, KvmUnavailable
from .vm import Vm
from .vcpu import Vcpu, DirtyRing
from .stats import StatsFd

__all__ = ["Kvm", "KvmUnavailable", "Vm", "Vcpu", "DirtyRing", "StatsFd",
           "KvmIoctlError", "VmBugged", "FaultInjector"]
