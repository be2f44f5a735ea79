"""The ioctl numbers and struct sizes in uapi.py against the kernel's own
headers, compiled by the system C compiler: a wrong size silently changes an
ioctl number, and this is where it would show."""
import shutil
import subprocess

import pytest

from kvmsplit.vmm.kvm import uapi

C_PROBE = r"""
#include <stdio.h>
#include <linux/kvm.h>
#define P(x) printf(#x " %llu\n", (unsigned long long)(x));
int main(void) {
  P(KVM_GET_API_VERSION) P(KVM_CREATE_VM) P(KVM_CHECK_EXTENSION) P(KVM_GET_VCPU_MMAP_SIZE)
  P(KVM_GET_SUPPORTED_CPUID) P(KVM_CREATE_VCPU) P(KVM_GET_DIRTY_LOG)
  P(KVM_SET_USER_MEMORY_REGION) P(KVM_SET_TSS_ADDR) P(KVM_ENABLE_CAP) P(KVM_CLEAR_DIRTY_LOG)
  P(KVM_RESET_DIRTY_RINGS) P(KVM_GET_STATS_FD) P(KVM_RUN) P(KVM_GET_REGS) P(KVM_SET_REGS)
  P(KVM_GET_SREGS) P(KVM_SET_SREGS) P(KVM_SET_CPUID2)
  P(sizeof(struct kvm_cpuid2))
  P(sizeof(struct kvm_regs)) P(sizeof(struct kvm_sregs)) P(sizeof(struct kvm_segment))
  P(sizeof(struct kvm_userspace_memory_region)) P(sizeof(struct kvm_dirty_log))
  P(sizeof(struct kvm_clear_dirty_log)) P(sizeof(struct kvm_enable_cap))
  P(sizeof(struct kvm_cpuid_entry2)) P(sizeof(struct kvm_dirty_gfn))
  P(sizeof(struct kvm_stats_header)) P(sizeof(struct kvm_stats_desc))
  P(KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2) P(KVM_CAP_DIRTY_LOG_RING) P(KVM_CAP_DIRTY_LOG_RING_ACQ_REL)
  P(KVM_CAP_BINARY_STATS_FD) P(KVM_CAP_USER_MEMORY)
  P(KVM_EXIT_IO) P(KVM_EXIT_HLT) P(KVM_EXIT_MMIO) P(KVM_EXIT_DIRTY_RING_FULL) P(KVM_EXIT_SHUTDOWN)
  P(KVM_EXIT_INTERNAL_ERROR) P(KVM_EXIT_FAIL_ENTRY) P(KVM_DIRTY_LOG_PAGE_OFFSET)
  return 0;
}
"""

PY = {
    "sizeof(struct kvm_regs)": uapi.kvm_regs, "sizeof(struct kvm_sregs)": uapi.kvm_sregs,
    "sizeof(struct kvm_segment)": uapi.kvm_segment,
    "sizeof(struct kvm_userspace_memory_region)": uapi.kvm_userspace_memory_region,
    "sizeof(struct kvm_dirty_log)": uapi.kvm_dirty_log,
    "sizeof(struct kvm_clear_dirty_log)": uapi.kvm_clear_dirty_log,
    "sizeof(struct kvm_enable_cap)": uapi.kvm_enable_cap,
    "sizeof(struct kvm_cpuid_entry2)": uapi.kvm_cpuid_entry2,
    "sizeof(struct kvm_dirty_gfn)": uapi.kvm_dirty_gfn,
    "sizeof(struct kvm_stats_header)": uapi.kvm_stats_header,
    "sizeof(struct kvm_stats_desc)": uapi.kvm_stats_desc,
    "sizeof(struct kvm_cpuid2)": uapi.kvm_cpuid2_header,
}


@pytest.fixture(scope="module")
def header_values(tmp_path_factory):
    if not shutil.which("gcc"):
        pytest.skip("gcc not installed")
    d = tmp_path_factory.mktemp("uapi")
    (d / "p.c").write_text(C_PROBE)
    r = subprocess.run(["gcc", "-o", str(d / "p"), str(d / "p.c")], capture_output=True, text=True, check=False)
    if r.returncode:
        pytest.skip(f"kernel uapi headers unusable: {r.stderr.strip().splitlines()[0]}")
    out = subprocess.run([str(d / "p")], capture_output=True, text=True, check=True).stdout
    return {k: int(v) for k, v in (line.rsplit(" ", 1) for line in out.splitlines())}


def test_ioctl_numbers_match_headers(header_values):
    import ctypes
    for name, value in header_values.items():
        if name.startswith("sizeof"):
            assert ctypes.sizeof(PY[name]) == value, name
        elif name.startswith(("KVM_CAP_", "KVM_EXIT_")):
            assert getattr(uapi, name[4:]) == value, name
        elif name == "KVM_DIRTY_LOG_PAGE_OFFSET":
            assert uapi.DIRTY_LOG_PAGE_OFFSET == value
        else:
            assert getattr(uapi, name).number == value, name


def test_kvm_run_exit_union_offset():
    # the exit union starts at byte 32 of struct kvm_run on x86_64
    assert uapi.kvm_run.exit.offset == 32


def test_each_ioctl_is_declared_once_with_its_struct():
    """Name, number and argument struct agree: the attribute is the ioctl's
    name, and a struct's size is the size its number encodes."""
    import ctypes
    assert len(uapi.IOCTLS) == len({io.number for io in uapi.IOCTLS.values()})
    for name, io in uapi.IOCTLS.items():
        assert getattr(uapi, name) is io and io.name == name
        assert io.number >> 8 & 0xFF == uapi.KVMIO, name
        if io.arg is None:
            assert io.size == 0 and not io.flexible, name
        else:
            assert io.size == ctypes.sizeof(io.arg), name
    assert uapi.KVM_SET_CPUID2.flexible and uapi.KVM_GET_SUPPORTED_CPUID.flexible
