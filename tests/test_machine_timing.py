"""Machine.kvm_run_seconds(): the time vCPU threads spend inside KVM_RUN, which
bench/ divides the harness's wall time by. It must grow while the guest runs,
never exceed the wall time it was read over, and leave out the vCPU thread's
exit handling in Python (the UART, the wait for controller input).

Only coarse inequalities with wide margins: these check what is counted, not
how fast anything is."""
import time

import pytest

from kvmsplit.vmm.guest import ucall
from kvmsplit.vmm.machine import Machine
from kvmsplit.vmm.memory import Backing, GuestMemory

pytestmark = pytest.mark.kvm
GPA = 1 << 32
IDLE = 0.5          # a deliberate Python-side delay, in seconds
MARGIN = 0.3        # of which at least this much must be left out of KVM_RUN time
EPS = 1e-6          # float rounding in the sums


def _boot(m: Machine, mem: GuestMemory, image) -> None:
    m.add_slot(1, GPA, mem)
    m.load(image)
    m.start([0])
    m.expect(0, "HELLO", 10)
    m.send(0, ucall.cmd_map(GPA, mem.size, 21))
    m.expect(0, "MAPPED", 10)
    m.expect(0, "READY", 10)


@pytest.fixture
def booted(kvm, guest_image):
    """A booted guest, waiting for a command, with 16 MiB of THP at 4 GiB."""
    made: list = []

    def boot(cls: type[Machine] = Machine, nr_vcpus: int = 1) -> tuple[Machine, GuestMemory]:
        m = cls(kvm, nr_vcpus=nr_vcpus)
        made.append(m)
        mem = GuestMemory(Backing.THP, 16 << 20)
        made.append(mem)
        _boot(m, mem, guest_image)
        return m, mem
    yield boot
    for x in reversed(made):
        x.close()


def _interval(m: Machine, body) -> tuple[float, float]:
    """(wall seconds, KVM_RUN seconds) over body(); the wall interval encloses
    both readings of the counter."""
    t0 = time.monotonic()
    k0 = m.kvm_run_seconds()
    body()
    k1 = m.kvm_run_seconds()
    return time.monotonic() - t0, k1 - k0


def _write(m: Machine, mem: GuestMemory, pass_no: int) -> None:
    m.send(0, ucall.cmd_write(pass_no, "seq", 100, 0, 0, mem.size >> 12))
    m.expect(0, "DONE", 10)


def test_grows_while_the_guest_runs_and_stays_within_wall_time(booted):
    m, mem = booted()
    assert m.kvm_run_seconds() > 0, "the boot ran the guest"
    for p in range(1, 4):
        wall, kvm = _interval(m, lambda p=p: _write(m, mem, p))
        assert 0 < kvm <= wall + EPS


def test_a_run_in_flight_counts(booted):
    """A guest spinning at CPL3 makes no exits: one long KVM_RUN, which
    counts before it returns."""
    m, _ = booted()
    wall, kvm = _interval(m, lambda: (m.send(0, ucall.CMD_HANG), time.sleep(IDLE)))
    assert IDLE - MARGIN < kvm <= wall + EPS
    assert m.stop(timeout=5.0)


def test_waiting_for_the_controller_is_not_kvm_time(booted):
    """Between two commands the guest polls the UART LSR; the vCPU thread sits
    in that exit's handler waiting for input. The controller's delay is
    harness time."""
    m, mem = booted()

    def two_commands_with_a_pause() -> None:
        _write(m, mem, 1)
        time.sleep(IDLE)
        _write(m, mem, 2)
    wall, kvm = _interval(m, two_commands_with_a_pause)
    assert 0 < kvm < wall - MARGIN


class _SlowConsole(Machine):
    """Handles each line the guest prints slowly, on the vCPU thread."""
    def _uart_out(self, st, data: bytes) -> None:
        if b"\n" in data:
            time.sleep(IDLE)
        super()._uart_out(st, data)


def test_slow_exit_handling_is_not_kvm_time(booted):
    m, mem = booted(_SlowConsole)
    wall, kvm = _interval(m, lambda: _write(m, mem, 1))
    assert 0 < kvm < wall - MARGIN


def test_per_vcpu_counters(booted):
    m, _ = booted(nr_vcpus=2)          # only the BSP started
    by_cpu = m.kvm_run_seconds_by_cpu()
    assert len(by_cpu) == 2 and by_cpu[0] > 0 and by_cpu[1] == 0.0
    assert m.kvm_run_seconds() >= by_cpu[0]
