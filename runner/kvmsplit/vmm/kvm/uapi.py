"""The KVM userspace ABI for x86_64: the ioctls (each declared once as an
Ioctl: name, number, argument struct), capability numbers, exit reasons and
the ctypes structs they carry.

Everything the ioctl layers (system.py, vm.py, vcpu.py) pass to the kernel is
defined here and nowhere else, in the spirit of rust-vmm's kvm-bindings.
Layouts follow include/uapi/linux/kvm.h and arch/x86/include/uapi/asm/kvm.h;
tests/test_uapi.py pins their sizes, because a wrong size silently changes the
ioctl number the kernel sees.
"""
from __future__ import annotations

import ctypes as C
from dataclasses import dataclass

# --- ioctl number encoding (include/uapi/asm-generic/ioctl.h) -------------
_IOC_NONE, _IOC_WRITE, _IOC_READ = 0, 1, 2
_IOC_SIZEBITS = 14
KVMIO = 0xAE


def _ioc(direction: int, nr: int, size: int) -> int:
    return (direction << 30) | (size << 16) | (KVMIO << 8) | nr


def _IOC_SIZE(number: int) -> int:   # the kernel's macro, by its name
    return (number >> 16) & ((1 << _IOC_SIZEBITS) - 1)


@dataclass(frozen=True)
class Ioctl:
    """One ioctl, declared once: its name (for errors and fault injection),
    its number, and the struct whose size that number encodes.

    `arg` is None for _IO ioctls, which take an int or nothing. A `flexible`
    struct is only the header of what the kernel reads (struct kvm_cpuid2
    ends in entries[]), so a bigger buffer is allowed.
    """
    name: str
    number: int
    arg: type | None = None
    flexible: bool = False

    @property
    def size(self) -> int:
        return _IOC_SIZE(self.number)


def _io(name: str, nr: int) -> Ioctl:
    return Ioctl(name, _ioc(_IOC_NONE, nr, 0))


def _ior(name: str, nr: int, struct: type, flexible: bool = False) -> Ioctl:
    return Ioctl(name, _ioc(_IOC_READ, nr, C.sizeof(struct)), struct, flexible)


def _iow(name: str, nr: int, struct: type, flexible: bool = False) -> Ioctl:
    return Ioctl(name, _ioc(_IOC_WRITE, nr, C.sizeof(struct)), struct, flexible)


def _iowr(name: str, nr: int, struct: type, flexible: bool = False) -> Ioctl:
    return Ioctl(name, _ioc(_IOC_READ | _IOC_WRITE, nr, C.sizeof(struct)), struct, flexible)


# --- structs ----------------------------------------------------------------
class kvm_regs(C.Structure):
    _fields_ = [(n, C.c_uint64) for n in (
        "rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rsp", "rbp",
        "r8", "r9", "r10", "r11", "r12", "r13", "r14", "r15", "rip", "rflags")]


class kvm_segment(C.Structure):
    _fields_ = [("base", C.c_uint64), ("limit", C.c_uint32), ("selector", C.c_uint16),
                ("type", C.c_uint8), ("present", C.c_uint8), ("dpl", C.c_uint8),
                ("db", C.c_uint8), ("s", C.c_uint8), ("l", C.c_uint8), ("g", C.c_uint8),
                ("avl", C.c_uint8), ("unusable", C.c_uint8), ("padding", C.c_uint8)]


class kvm_dtable(C.Structure):
    _fields_ = [("base", C.c_uint64), ("limit", C.c_uint16), ("padding", C.c_uint16 * 3)]


class kvm_sregs(C.Structure):
    _fields_ = [("cs", kvm_segment), ("ds", kvm_segment), ("es", kvm_segment),
                ("fs", kvm_segment), ("gs", kvm_segment), ("ss", kvm_segment),
                ("tr", kvm_segment), ("ldt", kvm_segment),
                ("gdt", kvm_dtable), ("idt", kvm_dtable),
                ("cr0", C.c_uint64), ("cr2", C.c_uint64), ("cr3", C.c_uint64),
                ("cr4", C.c_uint64), ("cr8", C.c_uint64), ("efer", C.c_uint64),
                ("apic_base", C.c_uint64), ("interrupt_bitmap", C.c_uint64 * 4)]


class kvm_userspace_memory_region(C.Structure):
    _fields_ = [("slot", C.c_uint32), ("flags", C.c_uint32),
                ("guest_phys_addr", C.c_uint64), ("memory_size", C.c_uint64),
                ("userspace_addr", C.c_uint64)]


class kvm_userspace_memory_region2(C.Structure):
    _fields_ = [("slot", C.c_uint32), ("flags", C.c_uint32),
                ("guest_phys_addr", C.c_uint64), ("memory_size", C.c_uint64),
                ("userspace_addr", C.c_uint64), ("guest_memfd_offset", C.c_uint64),
                ("guest_memfd", C.c_uint32), ("pad1", C.c_uint32),
                ("pad2", C.c_uint64 * 14)]


class kvm_dirty_log(C.Structure):
    _fields_ = [("slot", C.c_uint32), ("padding1", C.c_uint32),
                ("dirty_bitmap", C.c_void_p)]


class kvm_clear_dirty_log(C.Structure):
    _fields_ = [("slot", C.c_uint32), ("num_pages", C.c_uint32),
                ("first_page", C.c_uint64), ("dirty_bitmap", C.c_void_p)]


class kvm_enable_cap(C.Structure):
    _fields_ = [("cap", C.c_uint32), ("flags", C.c_uint32),
                ("args", C.c_uint64 * 4), ("pad", C.c_uint8 * 64)]


class kvm_cpuid_entry2(C.Structure):
    _fields_ = [("function", C.c_uint32), ("index", C.c_uint32), ("flags", C.c_uint32),
                ("eax", C.c_uint32), ("ebx", C.c_uint32), ("ecx", C.c_uint32),
                ("edx", C.c_uint32), ("padding", C.c_uint32 * 3)]


class kvm_cpuid2_header(C.Structure):
    # struct kvm_cpuid2 ends in a flexible array; the ioctl number encodes the
    # header size only, and the entries follow it in one buffer.
    _fields_ = [("nent", C.c_uint32), ("padding", C.c_uint32)]


def kvm_cpuid2(nent: int) -> type[C.Structure]:
    """struct kvm_cpuid2 with room for `nent` entries (the header, then entries[])."""
    class _kvm_cpuid2(C.Structure):
        _fields_ = [("nent", C.c_uint32), ("padding", C.c_uint32),
                    ("entries", kvm_cpuid_entry2 * nent)]
    return _kvm_cpuid2


class kvm_dirty_gfn(C.Structure):
    _fields_ = [("flags", C.c_uint32), ("slot", C.c_uint32), ("offset", C.c_uint64)]


# struct kvm_run: only the fixed head and the exit union members kvmsplit reads.
class _run_io(C.Structure):
    _fields_ = [("direction", C.c_uint8), ("size", C.c_uint8), ("port", C.c_uint16),
                ("count", C.c_uint32), ("data_offset", C.c_uint64)]


class _run_mmio(C.Structure):
    _fields_ = [("phys_addr", C.c_uint64), ("data", C.c_uint8 * 8),
                ("len", C.c_uint32), ("is_write", C.c_uint8)]


class _run_fail_entry(C.Structure):
    _fields_ = [("hardware_entry_failure_reason", C.c_uint64), ("cpu", C.c_uint32)]


class _run_internal(C.Structure):
    _fields_ = [("suberror", C.c_uint32), ("ndata", C.c_uint32), ("data", C.c_uint64 * 16)]


class _run_system_event(C.Structure):
    _fields_ = [("type", C.c_uint32), ("ndata", C.c_uint32), ("data", C.c_uint64 * 16)]


class _run_exit(C.Union):
    _fields_ = [("io", _run_io), ("mmio", _run_mmio), ("fail_entry", _run_fail_entry),
                ("internal", _run_internal), ("system_event", _run_system_event),
                ("padding", C.c_char * 256)]


class kvm_run(C.Structure):
    _fields_ = [("request_interrupt_window", C.c_uint8), ("immediate_exit", C.c_uint8),
                ("padding1", C.c_uint8 * 6), ("exit_reason", C.c_uint32),
                ("ready_for_interrupt_injection", C.c_uint8), ("if_flag", C.c_uint8),
                ("flags", C.c_uint16), ("cr8", C.c_uint64), ("apic_base", C.c_uint64),
                ("exit", _run_exit)]


# Binary stats (Documentation/virt/kvm/api.rst, KVM_GET_STATS_FD)
class kvm_stats_header(C.Structure):
    _fields_ = [("flags", C.c_uint32), ("name_size", C.c_uint32), ("num_desc", C.c_uint32),
                ("id_offset", C.c_uint32), ("desc_offset", C.c_uint32),
                ("data_offset", C.c_uint32)]


class kvm_stats_desc(C.Structure):
    # followed by char name[name_size]
    _fields_ = [("flags", C.c_uint32), ("exponent", C.c_int16), ("size", C.c_uint16),
                ("offset", C.c_uint32), ("bucket_size", C.c_uint32)]


# --- ioctls -----------------------------------------------------------------
# system fd
KVM_GET_API_VERSION = _io("KVM_GET_API_VERSION", 0x00)
KVM_CREATE_VM = _io("KVM_CREATE_VM", 0x01)
KVM_CHECK_EXTENSION = _io("KVM_CHECK_EXTENSION", 0x03)   # also on a VM fd
KVM_GET_VCPU_MMAP_SIZE = _io("KVM_GET_VCPU_MMAP_SIZE", 0x04)
KVM_GET_SUPPORTED_CPUID = _iowr("KVM_GET_SUPPORTED_CPUID", 0x05, kvm_cpuid2_header, flexible=True)
# vm fd
KVM_CREATE_VCPU = _io("KVM_CREATE_VCPU", 0x41)
KVM_GET_DIRTY_LOG = _iow("KVM_GET_DIRTY_LOG", 0x42, kvm_dirty_log)
KVM_SET_USER_MEMORY_REGION = _iow("KVM_SET_USER_MEMORY_REGION", 0x46, kvm_userspace_memory_region)
KVM_SET_TSS_ADDR = _io("KVM_SET_TSS_ADDR", 0x47)
KVM_SET_USER_MEMORY_REGION2 = _iow("KVM_SET_USER_MEMORY_REGION2", 0x49, kvm_userspace_memory_region2)
KVM_ENABLE_CAP = _iow("KVM_ENABLE_CAP", 0xA3, kvm_enable_cap)
KVM_CLEAR_DIRTY_LOG = _iowr("KVM_CLEAR_DIRTY_LOG", 0xC0, kvm_clear_dirty_log)
KVM_RESET_DIRTY_RINGS = _io("KVM_RESET_DIRTY_RINGS", 0xC7)
KVM_GET_STATS_FD = _io("KVM_GET_STATS_FD", 0xCE)
# vcpu fd
KVM_RUN = _io("KVM_RUN", 0x80)
KVM_GET_REGS = _ior("KVM_GET_REGS", 0x81, kvm_regs)
KVM_SET_REGS = _iow("KVM_SET_REGS", 0x82, kvm_regs)
KVM_GET_SREGS = _ior("KVM_GET_SREGS", 0x83, kvm_sregs)
KVM_SET_SREGS = _iow("KVM_SET_SREGS", 0x84, kvm_sregs)
KVM_SET_CPUID2 = _iow("KVM_SET_CPUID2", 0x90, kvm_cpuid2_header, flexible=True)

# every ioctl above by name: what `--inject-eio NAME` may name
IOCTLS: dict[str, Ioctl] = {v.name: v for v in dict(globals()).values() if isinstance(v, Ioctl)}

KVM_API_VERSION = 12

# --- capabilities -------------------------------------------------------------
CAP_USER_MEMORY = 3     # always there: what the "is the VM bugged?" probe asks
CAP_NR_VCPUS = 9
CAP_MAX_VCPUS = 66
CAP_READONLY_MEM = 81
CAP_MANUAL_DIRTY_LOG_PROTECT2 = 168
CAP_DIRTY_LOG_RING = 192
CAP_BINARY_STATS_FD = 203
CAP_DIRTY_LOG_RING_ACQ_REL = 223
CAP_USER_MEMORY2 = 231
CAP_GUEST_MEMFD = 234

CAPABILITIES = {
    "MANUAL_DIRTY_LOG_PROTECT2": CAP_MANUAL_DIRTY_LOG_PROTECT2,
    "DIRTY_LOG_RING": CAP_DIRTY_LOG_RING,
    "DIRTY_LOG_RING_ACQ_REL": CAP_DIRTY_LOG_RING_ACQ_REL,
    "BINARY_STATS_FD": CAP_BINARY_STATS_FD,
    "USER_MEMORY2": CAP_USER_MEMORY2,
    "GUEST_MEMFD": CAP_GUEST_MEMFD,
    "READONLY_MEM": CAP_READONLY_MEM,
    "NR_VCPUS": CAP_NR_VCPUS,
    "MAX_VCPUS": CAP_MAX_VCPUS,
}

# KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2 flags
DIRTY_LOG_MANUAL_PROTECT_ENABLE = 1 << 0
DIRTY_LOG_INITIALLY_SET = 1 << 1

# memslot flags
MEM_LOG_DIRTY_PAGES = 1 << 0
MEM_READONLY = 1 << 1

# dirty ring
DIRTY_LOG_PAGE_OFFSET = 64  # x86: pages into the vcpu fd
DIRTY_GFN_F_DIRTY = 1 << 0
DIRTY_GFN_F_RESET = 1 << 1

# --- exit reasons -------------------------------------------------------------
EXIT_UNKNOWN = 0
EXIT_EXCEPTION = 1
EXIT_IO = 2
EXIT_HYPERCALL = 3
EXIT_DEBUG = 4
EXIT_HLT = 5
EXIT_MMIO = 6
EXIT_SHUTDOWN = 8
EXIT_FAIL_ENTRY = 9
EXIT_INTR = 10
EXIT_INTERNAL_ERROR = 17
EXIT_SYSTEM_EVENT = 24
EXIT_DIRTY_RING_FULL = 31

EXIT_NAMES = {v: k[5:] for k, v in dict(globals()).items()
              if k.startswith("EXIT_") and isinstance(v, int)}

EXIT_IO_IN, EXIT_IO_OUT = 0, 1
