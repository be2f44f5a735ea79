"""The typed boundaries of the VMM: ioctl arguments checked against their
declaration before the kernel sees them, KVM_RUN's exits as typed values,
and EIO called "VM bugged" only once a probe on the VM fd confirms it."""
import ctypes
import errno
import mmap

import pytest

from kvmsplit.vmm.guest import ucall
from kvmsplit.vmm.kvm import (
    FaultInjector,
    HltExit,
    InternalErrorExit,
    IoExit,
    KvmIoctlError,
    UnknownExit,
    VmBugged,
    exits,
    uapi,
)
from kvmsplit.vmm.kvm.fd import KvmFd
from kvmsplit.vmm.machine import GuestError, Machine


# -- argument checks: programming errors, caught before the kernel ----------------
class _FailAll(FaultInjector):
    def fail(self, name):
        return errno.ENOTTY


@pytest.fixture
def fd():
    """A KvmFd on which every ioctl that gets past the checks fails with ENOTTY."""
    f = KvmFd(-1)
    f.fault = _FailAll("any", err=errno.ENOTTY)
    return f


@pytest.mark.parametrize("io, arg, exc, text", [
    (uapi.KVM_SET_REGS, uapi.kvm_sregs(), ValueError, "KVM_SET_REGS needs a kvm_regs of 144 bytes; got a kvm_sregs"),
    (uapi.KVM_SET_REGS, 5, TypeError, "KVM_SET_REGS takes a struct kvm_regs"),
    (uapi.KVM_GET_SREGS, None, TypeError, "KVM_GET_SREGS takes a struct kvm_sregs"),
    (uapi.KVM_RUN, uapi.kvm_regs(), TypeError, "KVM_RUN is declared without a struct"),
    (uapi.KVM_SET_CPUID2, ctypes.c_uint32(), ValueError,
     "KVM_SET_CPUID2 needs a kvm_cpuid2_header of at least 8 bytes"),
])
def test_wrong_argument_is_refused_before_the_ioctl(fd, io, arg, exc, text):
    with pytest.raises(exc, match=text):
        fd.ioctl(io, arg)


@pytest.mark.parametrize("io, arg", [
    (uapi.KVM_SET_REGS, uapi.kvm_regs()),
    (uapi.KVM_SET_CPUID2, uapi.kvm_cpuid2(3)()),       # flexible: header plus entries
    (uapi.KVM_CHECK_EXTENSION, 3),
    (uapi.KVM_RUN, None),
])
def test_fitting_argument_reaches_the_ioctl(fd, io, arg):
    with pytest.raises(KvmIoctlError) as e:
        fd.ioctl(io, arg)
    assert e.value.errno == errno.ENOTTY and e.value.ioctl == io.name


# -- exits decoded from kvm_run --------------------------------------------------
@pytest.fixture
def run_page():
    """A kvm_run in an anonymous page, as KVM would have filled it in."""
    page = mmap.mmap(-1, 4096)
    return uapi.kvm_run.from_buffer(page), page


def test_io_exit_is_a_view_into_the_run_page(run_page):
    run, page = run_page
    run.exit_reason = uapi.EXIT_IO
    io = run.exit.io
    io.direction, io.size, io.port, io.count, io.data_offset = uapi.EXIT_IO_IN, 1, ucall.COM1_LSR, 2, 512
    ex = exits.decode(run, page)
    assert isinstance(ex, IoExit)
    assert (ex.port, ex.is_out, ex.size, ex.count) == (ucall.COM1_LSR, False, 1, 2)
    ex.data[:] = b"\x61\x60"      # an IN is answered in place
    assert page[512:514] == b"\x61\x60"
    ex.data.release()


def test_other_exits_are_copied_out(run_page):
    run, page = run_page
    run.exit_reason = uapi.EXIT_INTERNAL_ERROR
    run.exit.internal.suberror, run.exit.internal.ndata = 1, 2
    run.exit.internal.data[0], run.exit.internal.data[1] = 0xAB, 0xCD
    assert exits.decode(run, page) == InternalErrorExit(1, (0xAB, 0xCD))
    run.exit_reason = uapi.EXIT_HLT
    assert exits.decode(run, page) == HltExit()
    run.exit_reason = uapi.EXIT_EXCEPTION
    assert exits.decode(run, page) == UnknownExit(uapi.EXIT_EXCEPTION, "EXCEPTION")
    run.exit_reason = 999
    assert exits.decode(run, page) == UnknownExit(999, "999")


# -- EIO: VM bugged only when the VM fd confirms it --------------------------------
@pytest.fixture
def vm(kvm):
    v = kvm.create_vm()
    yield v
    v.close()


@pytest.mark.kvm
def test_injected_eio_on_a_dead_vm_is_confirmed_as_bugged(vm):
    vm.fault = FaultInjector("KVM_GET_DIRTY_LOG")          # dead_vm=True: a real bugged VM
    vcpu = vm.vcpu_add(0)
    with pytest.raises(VmBugged) as e:
        vm.get_dirty_log(0, bytearray(8))
    assert e.value.errno == errno.EIO and e.value.ioctl == "KVM_GET_DIRTY_LOG"
    assert "KVM_CHECK_EXTENSION" in e.value.confirmed_by
    # like KVM's dead VM, every later ioctl on it, VM or vCPU fd, fails the same way
    with pytest.raises(VmBugged, match="KVM_GET_REGS"):
        vcpu.get_regs()
    with pytest.raises(VmBugged):
        vm.check_extension(uapi.CAP_USER_MEMORY)


@pytest.mark.kvm
def test_eio_from_a_vm_that_still_answers_is_not_bugged(vm):
    vm.fault = FaultInjector("KVM_GET_REGS", dead_vm=False)
    vcpu = vm.vcpu_add(0)
    with pytest.raises(KvmIoctlError) as e:
        vcpu.get_regs()
    assert type(e.value) is KvmIoctlError and e.value.errno == errno.EIO
    assert e.value.ioctl == "KVM_GET_REGS" and "still answers" in str(e.value)
    assert vm.check_extension(uapi.CAP_USER_MEMORY) == 1   # the probe really went to KVM
    vcpu.get_sregs()


@pytest.mark.kvm
def test_system_fd_eio_is_never_called_vm_bugged(kvm):
    kvm.fault = FaultInjector("KVM_GET_VCPU_MMAP_SIZE")
    try:
        with pytest.raises(KvmIoctlError) as e:
            kvm.vcpu_mmap_size()
        assert type(e.value) is KvmIoctlError
    finally:
        kvm.fault = None


# -- the machine dispatches on exit types and lets go of kvm_run ----------------------
def _boot_with(kvm, guest_image, fault):
    m = Machine(kvm, nr_vcpus=1, fault=fault)
    m.load(guest_image)
    return m


@pytest.mark.kvm
def test_machine_reports_a_dead_vm_from_the_vcpu_thread(kvm, guest_image):
    m = _boot_with(kvm, guest_image, FaultInjector("KVM_RUN", after=5))
    page = m.cpus[0].vcpu._run_map
    m.start()
    with pytest.raises(VmBugged, match="KVM_RUN"):
        m.expect(0, "HELLO", 10)
    m.close()
    assert page.closed, "nothing may keep a view of kvm_run past close()"


@pytest.mark.kvm
def test_machine_eio_on_a_live_vm_is_a_guest_error(kvm, guest_image):
    m = _boot_with(kvm, guest_image, FaultInjector("KVM_RUN", after=5, dead_vm=False))
    m.start()
    with pytest.raises(GuestError, match="KVM_RUN .*still answers"):
        m.expect(0, "HELLO", 10)
    m.close()


@pytest.mark.kvm
def test_an_io_exit_kept_past_its_handling_is_released(kvm, guest_image):
    m = _boot_with(kvm, guest_image, None)
    kept = []
    handle = m._handle_exit
    m._handle_exit = lambda st, ex: kept.append(ex) or handle(st, ex)
    page = m.cpus[0].vcpu._run_map
    m.start()
    m.expect(0, "HELLO", 10)
    m.close()
    ios = [ex for ex in kept if isinstance(ex, IoExit)]
    assert ios and page.closed
    with pytest.raises(ValueError, match="released"):
        bytes(ios[-1].data)
