"""The KVM system fd (/dev/kvm): API version, capabilities, supported CPUID,
and VM creation."""
from __future__ import annotations

import errno
import os

from kvmsplit.vmm.kvm import uapi
from kvmsplit.vmm.kvm.fd import KvmFd, KvmIoctlError
from kvmsplit.vmm.kvm.vm import Vm

DEV_KVM = os.environ.get("KVMSPLIT_DEV_KVM", "/dev/kvm")  # overridable for tests


class KvmUnavailable(Exception):
    """/dev/kvm is missing or cannot be opened; the message says which."""


class Kvm(KvmFd):
    def __init__(self, path: str = DEV_KVM):
        try:
            fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        except FileNotFoundError:
            raise KvmUnavailable(f"{path} does not exist (is the kvm module loaded?)") from None
        except PermissionError:
            raise KvmUnavailable(f"{path} is not accessible to this user (uid {os.getuid()}); "
                                 "join the kvm group or run as root") from None
        except OSError as e:
            raise KvmUnavailable(f"cannot open {path}: {e.strerror}") from None
        super().__init__(fd)
        self.path = path

    def api_version(self) -> int:
        return self.ioctl(uapi.KVM_GET_API_VERSION)

    def check_extension(self, cap: int) -> int:
        return self.ioctl(uapi.KVM_CHECK_EXTENSION, cap)

    def vcpu_mmap_size(self) -> int:
        return self.ioctl(uapi.KVM_GET_VCPU_MMAP_SIZE)

    def supported_cpuid(self) -> list[uapi.kvm_cpuid_entry2]:
        """KVM_GET_SUPPORTED_CPUID, growing the buffer until it fits."""
        nent = 64
        while True:
            buf = uapi.kvm_cpuid2(nent)()
            buf.nent = nent
            try:
                self.ioctl(uapi.KVM_GET_SUPPORTED_CPUID, buf)
            except KvmIoctlError as e:
                if e.errno == errno.E2BIG and nent < 4096:
                    nent *= 2
                    continue
                raise
            return list(buf.entries[:buf.nent])

    def create_vm(self, vm_type: int = 0) -> Vm:
        return Vm(self, self.ioctl(uapi.KVM_CREATE_VM, vm_type))
