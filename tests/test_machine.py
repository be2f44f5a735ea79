"""The VMM layer on the real /dev/kvm: ioctls, stats, the multiboot guest and
the ucall protocol, and what happens when a guest stops answering."""
import time

import numpy as np
import pytest

from kvmsplit.errors import BadInputError
from kvmsplit.vmm.guest import ucall
from kvmsplit.vmm.guest.loader import load_multiboot
from kvmsplit.vmm.kvm import uapi
from kvmsplit.vmm.machine import GuestError, GuestTimeout, Machine
from kvmsplit.vmm.memory import Backing, GuestMemory

pytestmark = pytest.mark.kvm
GPA = 1 << 32


@pytest.fixture
def machine(kvm, guest_image):
    """A booted guest with 16 MiB of THP at 4 GiB mapped with 2M pages."""
    m = Machine(kvm, nr_vcpus=1)
    mem = GuestMemory(Backing.THP, 16 << 20)
    m.add_slot(1, GPA, mem)
    m.load(guest_image)
    m.start()
    assert m.expect(0, "HELLO", 10).ints() == [ucall.PROTO_VERSION, 64]
    m.send(0, ucall.cmd_map(GPA, mem.size, 21))
    m.expect(0, "MAPPED", 10)
    m.expect(0, "READY", 10)
    yield m, mem
    m.close()
    mem.close()


def test_system_fd_reports_api_and_caps(kvm):
    assert kvm.api_version() == uapi.KVM_API_VERSION
    assert kvm.check_extension(uapi.CAP_BINARY_STATS_FD) > 0
    assert any(e.function == 0 for e in kvm.supported_cpuid())


def test_binary_stats_by_name(kvm):
    vm = kvm.create_vm()
    try:
        assert {"pages_4k", "pages_2m", "pages_1g"} <= set(vm.stats.names())
        assert vm.stats.read(["pages_2m"]) == {"pages_2m": 0}
        v = vm.vcpu_add(0)
        assert "pf_taken" in v.stats.descs
    finally:
        vm.close()


def test_write_pass_lands_in_host_memory_and_stats(machine):
    m, mem = machine
    m.send(0, ucall.cmd_write(3, "random", 40, 99, 0, mem.size >> 12))
    done = m.expect(0, "DONE", 10)
    pages = ucall.written_pages(3, "random", 40, 99, 0, mem.size >> 12)
    assert int(done.args[2], 16) == len(pages) > 0
    q = mem.qwords()
    assert np.array_equal(q[pages.astype(np.int64) * 512], ucall.marker(3, pages))
    assert m.vm.stats.read(["pages_2m"])["pages_2m"] > 0


def test_read_pass_xor_matches_host(machine):
    m, mem = machine
    m.send(0, ucall.cmd_write(1, "seq", 100, 0, 0, mem.size >> 12))
    m.expect(0, "DONE", 10)
    m.send(0, ucall.cmd_read(0, mem.size >> 12))
    guest = int(m.expect(0, "DONE", 10).args[1], 16)
    assert guest == int(np.bitwise_xor.reduce(mem.qwords()[::512]))


def test_hung_guest_times_out_and_stops_promptly(machine):
    m, _ = machine
    m.send(0, ucall.CMD_HANG)
    t = time.monotonic()
    with pytest.raises(GuestTimeout):
        m.expect(0, "DONE", 1.0)
    assert m.stop(timeout=5.0), "a vCPU spinning at CPL3 must be kickable out of KVM_RUN"
    assert time.monotonic() - t < 6


def test_bad_command_is_an_error_line(machine):
    m, _ = machine
    m.send(0, "W 1 2\n")
    with pytest.raises(GuestError, match="bad command"):
        m.expect(0, "DONE", 5)


def test_guest_exit_port_ends_the_vcpu(machine):
    m, _ = machine
    m.send(0, ucall.CMD_QUIT)
    with pytest.raises(GuestError, match="exited with code 0x0"):
        m.expect(0, "DONE", 5)


def test_loader_rejects_non_multiboot(tmp_path):
    f = tmp_path / "x.elf"
    f.write_bytes(b"\x7fELF" + bytes(8188))
    with pytest.raises(BadInputError, match="no multiboot header"):
        load_multiboot(f, bytearray(1 << 20), 0, 1 << 20)
