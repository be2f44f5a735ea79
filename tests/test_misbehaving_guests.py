"""Guests that misbehave on purpose (the guest's `X <kind>` test hook, and `H`):
each must cost kvmsplit a GuestError or GuestTimeout that says what happened,
within the timeout it was given, and Machine.close() must leave no vCPU thread
and no fd behind, and memory bounded however much the guest writes."""
from __future__ import annotations

import os
import threading
import time

import pytest

from kvmsplit.vmm.guest import ucall
from kvmsplit.vmm.machine import CONSOLE_LINES, GuestError, GuestTimeout, Machine
from kvmsplit.vmm.memory import Backing, GuestMemory

pytestmark = pytest.mark.kvm
GPA = 1 << 32
TIMEOUT = 2.0          # what expect() is given; CPL0 is emulated on PVM hosts, so keep it short
SLACK = 1.0            # expect() may overrun its timeout by this much, not more
MB = 1 << 20


def fds() -> set[str]:
    return {f"{fd} -> {_readlink(fd)}" for fd in os.listdir("/proc/self/fd")}


def _readlink(fd: str) -> str:
    try:
        return os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        return "?"      # listdir's own fd, gone by now


def vcpu_threads() -> list[str]:
    return [t.name for t in threading.enumerate() if t.name.startswith("vcpu")]


def rss_kib() -> int:
    with open("/proc/self/status") as f:
        return next(int(ln.split()[1]) for ln in f if ln.startswith("VmRSS:"))


@pytest.fixture
def booted(kvm, guest_image):
    """A booted guest at READY (16 MiB of THP at 4 GiB, 2M pages); checks on
    the way out that closing it left no thread and no fd behind."""
    threads0, fds0 = vcpu_threads(), fds()
    m = Machine(kvm, nr_vcpus=1)
    mem = GuestMemory(Backing.THP, 16 * MB)
    m.add_slot(1, GPA, mem)
    m.load(guest_image)
    m.start()
    m.expect(0, "HELLO", 10)
    m.send(0, ucall.cmd_map(GPA, mem.size, 21))
    m.expect(0, "MAPPED", 10)
    m.expect(0, "READY", 10)
    yield m, mem
    t = time.monotonic()
    m.close()
    mem.close()
    assert time.monotonic() - t < 6, "close() must not wait on the guest"
    assert vcpu_threads() == threads0, "a vCPU thread outlived Machine.close()"
    assert fds() == fds0, "an fd outlived Machine.close()"


def misbehave(m: Machine, kind: str, exc: type[GuestError], match: str, timeout: float = TIMEOUT) -> str:
    """Send the misbehaviour, expect a DONE that never comes: the error, raised in time."""
    m.send(0, ucall.cmd_misbehave(kind))
    t = time.monotonic()
    with pytest.raises(exc, match=match) as e:
        m.expect(0, "DONE", timeout, "write pass")
    took = time.monotonic() - t
    assert took < timeout + SLACK, f"{kind}: {took:.1f}s for a {timeout}s timeout"
    if exc is GuestTimeout:
        assert took >= timeout - 0.1
    else:
        assert type(e.value) is GuestError, f"{kind} should be an error, not a timeout: {e.value}"
    return str(e.value)


def test_spin_at_cpl3_times_out_and_the_vcpu_is_kicked_out(booted):
    m, _ = booted
    misbehave(m, "cpl3-spin", GuestTimeout, r"did not answer write pass within 2s$")
    assert m.stop(timeout=5.0)


def test_spin_at_cpl0_times_out_and_the_vcpu_is_kicked_out(booted):
    m, _ = booted
    misbehave(m, "cpl0-spin", GuestTimeout, r"did not answer write pass within 2s$")
    t = time.monotonic()
    assert m.stop(timeout=5.0), "a vCPU spinning at CPL0 with IF=0 must be kickable out of KVM_RUN"
    assert time.monotonic() - t < 5


@pytest.mark.parametrize("kind, last", [
    ("garbage", r".+"),
    ("stray-lines", r"'this is not the protocol'"),
    ("long-line", r"'A{90}.*"),
])
def test_garbage_on_the_protocol_times_out_saying_so(booted, kind, last):
    m, _ = booted
    msg = misbehave(m, kind, GuestTimeout, r"did not answer write pass within 2s; it wrote \d+ lines "
                    rf"outside the protocol meanwhile, the last \(cpu 0\): {last}")
    assert m.stray_lines() > 0, msg
    assert all(len(line) < ucall.MAX_LINE + 100 for line in m.console), "a line must end at MAX_LINE bytes"
    if kind == "long-line":
        assert m.console[3].endswith("[cut: over 4096 bytes without a newline]")     # after HELLO, MAPPED, READY


def test_triple_fault_is_a_shutdown(booted):
    m, _ = booted
    misbehave(m, "triple-fault", GuestError, r"vcpu 0: (SHUTDOWN exit \(triple fault\)|INTERNAL_ERROR)")


def test_exit_in_the_middle_of_a_pass(booted):
    m, mem = booted
    msg = misbehave(m, "exit-mid-pass", GuestError,
                    rf"vcpu 0: guest exited with code {ucall.MISBEHAVE_EXIT:#x} after half a line: '@0 DONE W'")
    q = mem.qwords()[::512]
    half = len(q) // 2
    assert (q[:half] >> 48 == ucall.MARKER_TAG).all() and not q[half:].any(), msg
    del q


def test_flood_of_lines_keeps_memory_bounded_and_still_times_out(booted):
    m, _ = booted
    rss0, boot_lines = rss_kib(), len(m.console)
    msg = misbehave(m, "flood", GuestTimeout, r"outside the protocol meanwhile, the last \(cpu 0\): 'flood [0-9a-f]+'",
                    timeout=3.0)
    assert m.stop(timeout=5.0)
    written = m.stray_lines()
    assert written > 4 * CONSOLE_LINES, msg
    assert len(m.console) < 2 * CONSOLE_LINES and m.console_dropped + len(m.console) == boot_lines + written
    assert m.console[-1].startswith("flood ")
    assert m.events.qsize() == 0 and not m._backlog
    assert rss_kib() - rss0 < 32 * 1024, f"{written} lines grew RSS by {rss_kib() - rss0} KiB"


def test_flood_of_unasked_for_protocol_lines_is_an_error(booted):
    m, _ = booted
    misbehave(m, "flood-protocol", GuestError, r"guest cpu 0 sent 17 lines nobody asked for "
              r"\(waiting for cpu 0's write pass\), the last: '@0 READY'")
    # nobody takes the events now: the flood fills the queue and then waits on it (however slow
    # the guest is on a loaded host: no timing is asserted, only that the queue stops it)
    deadline = time.monotonic() + 60
    while not m.events.full() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert m.events.full()
    boot_lines = 3
    assert len(m.console) <= boot_lines + 17 + m.events.maxsize + 1


def test_unknown_misbehaviour_is_refused(booted):
    m, _ = booted
    with pytest.raises(ValueError, match="unknown misbehaviour"):
        ucall.cmd_misbehave("sulk")
    m.send(0, "X 63\n")
    with pytest.raises(GuestError, match="bad command: X 63"):
        m.expect(0, "DONE", 5)


@pytest.mark.kvm
@pytest.mark.parametrize("kind", sorted(ucall.MISBEHAVIOURS))
def test_each_misbehaviour_is_an_error_naming_the_phase_through_the_engine(run_scenario, kind):
    """The same misbehaviours, driven by the engine as `kvmsplit run --inject-misbehave KIND:PHASE` does."""
    import time as _time

    from kvmsplit.scenario.model import Scenario
    from kvmsplit.vmm.memory import Backing
    t0 = _time.monotonic()
    res = run_scenario(Scenario("misbehave", backing=Backing.ANON, guest_page="4k", size=16 << 20, passes=1),
                       inject_misbehave=(kind, "dirty-1"), phase_timeout=2)
    assert res.verdict == "ERROR" and res.error_phase == "dirty-1", res.reasons
    assert _time.monotonic() - t0 < 30
