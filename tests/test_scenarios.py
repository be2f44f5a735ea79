"""Real scenarios on this host's /dev/kvm, judged by the real verdict code.

On this development host (PVM, shadow paging, tdp_mmu=N) the right verdict
is "lazy split, clean". On a TDP host the same tests expect eager: the
expectation comes from the probed facts, never from the test.
"""
import os
import threading

import pytest

from kvmsplit.runs.results import ERROR, FAIL, PASS
from kvmsplit.scenario.model import DirtyMode, Scenario
from kvmsplit.vmm.memory import Backing

pytestmark = pytest.mark.kvm
MB = 1 << 20


def assert_clean(res, split):
    assert res.verdict == PASS, res.reasons
    want = split if split != "eager" else f"eager@{res.expectation['when']}"
    assert res.observed_split == want
    for name in ("huge-before", "split", "dirty-log", "memory", "recovery", "alive", "witness", "stats"):
        assert res.check(name).status == "pass", (name, res.check(name).summary)


@pytest.mark.parametrize("mode", list(DirtyMode), ids=lambda m: m.value)
@pytest.mark.parametrize("backing", [Backing.THP, Backing.HUGETLB_2M], ids=lambda b: b.value)
def test_every_dirty_mode_splits_as_expected_and_recovers(run_scenario, facts, mode, backing):
    from kvmsplit.scenario.expectation import expect
    s = Scenario(f"{backing.value}/2m/{mode.value}", backing=backing, size=64 * MB, dirty_mode=mode,
                 ring_size=16384)
    res = run_scenario(s)
    assert_clean(res, expect(s, facts).split)
    # the dirty set is exact in every pass, and ring mode really went through ring-full exits
    for p in res.dirty["passes"]:
        assert p["harvested"] == p["written"] == 16384 and p["missing"] == p["extra"] == 0
        if mode.ring:
            assert p["ring_full_exits"] > 0
    assert res.check("kernel-log").status == "pass"


def test_lazy_split_counts_on_this_host(run_scenario, facts):
    if facts.paging != "shadow":
        pytest.skip("the numbers below are those of a shadow-paging host")
    res = run_scenario(Scenario("thp/2m/bitmap", size=64 * MB))
    pop, en, d1 = (res.phase(n) for n in ("populate", "enable", "dirty-1"))
    assert pop.vm_stats["pages_2m"] == 32 and en.vm_stats["pages_2m"] == 32
    assert d1.vm_stats["pages_2m"] == 0 and d1.vm_stats["pages_4k"] >= 16384
    assert d1.vcpu_delta["pf_taken"] >= 16384      # one write fault per 4K page
    assert res.phase("recovery").vm_stats["pages_2m"] == 32


def test_partial_writes_leave_exactly_the_untouched_huge_pages(run_scenario, facts):
    """25% of each vCPU's partition written: under a lazy split exactly the
    other 3/4 of the 2M regions must still be mapped huge after the pass."""
    s = Scenario("partial", backing=Backing.HUGETLB_2M, size=64 * MB, percent=25, vcpus=2, memslots=2)
    res = run_scenario(s)
    assert res.verdict == PASS, res.reasons
    split = res.check("split").details
    assert split["predicted_after_lazy"] == 24
    if res.observed_split == "lazy":
        assert res.phase("dirty-1").vm_stats["pages_2m"] == 24


def test_guest_4k_pages_give_nothing_to_split_under_shadow_paging(run_scenario, facts):
    res = run_scenario(Scenario("thp/4k", guest_page="4k", size=32 * MB))
    assert res.verdict == PASS, res.reasons
    if facts.paging == "shadow":
        assert res.observed_split == "none" and res.phase("populate").vm_stats["pages_2m"] == 0


def test_hung_guest_is_an_error_naming_the_phase(run_scenario):
    res = run_scenario(Scenario("hang", size=16 * MB), inject_hang="dirty-1", phase_timeout=2)
    assert res.verdict == ERROR and res.error_phase == "dirty-1"
    assert "hung in phase dirty-1" in res.reasons[0]
    assert not [t for t in threading.enumerate() if t.name.startswith("vcpu")], "vCPU threads must be gone"


def test_eio_from_the_vm_is_reported_as_vm_bugged(run_scenario):
    res = run_scenario(Scenario("eio", size=16 * MB), inject_eio="KVM_GET_DIRTY_LOG")
    assert res.verdict == FAIL
    assert res.reasons[0] == "VM bugged (KVM_BUG_ON?): KVM_GET_DIRTY_LOG returned EIO in phase dirty-1"
    assert res.check("alive").status == "fail"


def test_kernel_warning_during_a_scenario_fails_it_and_names_the_report(run_scenario):
    """A real WARNING report, written into the real /dev/kmsg while the
    scenario is in its first dirty pass, must fail that scenario."""
    def inject(name, phase):
        if phase == "dirty-1":
            fd = os.open("/dev/kmsg", os.O_WRONLY)
            try:
                for line in ("------------[ cut here ]------------",
                             "WARNING: CPU: 1 PID: 4242 at arch/x86/kvm/mmu/mmu.c:2045 "
                             "kvm_mmu_find_shadow_page+0x9a/0x1c0 [kvm]",
                             "Call Trace:", " <TASK>",
                             " kvm_mmu_get_shadow_page+0x52/0x80 [kvm]",
                             " kvm_vm_ioctl+0x7c/0xe0 [kvm]",
                             " </TASK>", "---[ end trace 0000000000000000 ]---"):
                    os.write(fd, f"<4>{line}\n".encode())
            finally:
                os.close(fd)
    try:
        res = run_scenario(Scenario("warn", size=16 * MB), accept_user_log=True, on_phase=inject)
    except PermissionError:
        pytest.fail("/dev/kmsg must be writable for this test (run as root)")
    assert res.verdict == FAIL
    kl = res.check("kernel-log")
    assert kl.status == "fail" and "WARNING in kvm_mmu_find_shadow_page" in kl.summary


def test_user_lines_do_not_count_by_default(run_scenario):
    def inject(name, phase):
        if phase == "dirty-1":
            fd = os.open("/dev/kmsg", os.O_WRONLY)
            os.write(fd, b"<4>WARNING: CPU: 0 PID: 1 at mm/foo.c:1 bar+0x1/0x2\n")
            os.close(fd)
    res = run_scenario(Scenario("user", size=16 * MB), on_phase=inject)
    assert res.verdict == PASS and res.check("kernel-log").status == "pass"
