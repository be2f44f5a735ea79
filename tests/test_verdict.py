"""The verdict as a pure function: recorded Observations in, checks and a
verdict out, no VM. Each case is a way a real run can end."""
from dataclasses import replace

from kvmsplit.runs.results import Phase
from kvmsplit.scenario.expectation import Expectation
from kvmsplit.scenario.observations import Observations
from kvmsplit.scenario.verdict import judge

MB = 1 << 20
LAZY = Expectation("lazy", None, "shadow paging splits on write faults")
EAGER = Expectation("eager", "enable", "TDP MMU with eager_page_split=Y")
CLEAN_LOG = {"checked": True, "reports": [], "taint_before": 0, "taint_after": 0}


def stats(k4, m2):
    return {"pages_4k": k4, "pages_2m": m2, "pages_1g": 0}


def lazy_run(**kw) -> Observations:
    """A 256 MiB THP scenario on a shadow-paging host, as it really goes."""
    phases = (Phase("boot", 0.1, vm_stats=stats(1, 0)), Phase("populate", 0.6, vm_stats=stats(1, 128)),
              Phase("enable", 0.0, vm_stats=stats(1, 128)),
              Phase("dirty-1", 1.3, vm_stats=stats(65537, 0), vcpu_delta={"pf_taken": 65536}),
              Phase("dirty-2", 0.1, vm_stats=stats(65537, 0)), Phase("disable", 0.0, vm_stats=stats(1, 0)),
              Phase("recovery", 0.1, vm_stats=stats(1, 128)), Phase("verify", 0.1, vm_stats=stats(1, 128)))
    base = Observations(size=256 * MB, backing="thp", phases=phases, last_phase="verify",
                        dirty_passes=({"pass": 1, "written": 65536, "harvested": 65536, "missing": 0,
                                       "extra": 0, "missing_sample": []},),
                        verify={"vcpus": 1, "mismatch": []}, host_huge_bytes=256 * MB,
                        pass1_regions={"pages_2m": 128, "pages_1g": 1}, kernel_log=CLEAN_LOG)
    return replace(base, **kw)


def test_a_clean_lazy_run_passes():
    j = judge(lazy_run(), LAZY)
    assert (j.verdict, j.observed_split, j.reasons) == ("PASS", "lazy", [])
    assert {c.name: c.status for c in j.checks} == {
        "huge-before": "pass", "split": "pass", "dirty-log": "pass", "memory": "pass", "recovery": "pass",
        "kernel-log": "pass", "alive": "pass"}


def test_an_unreadable_kernel_log_is_unconfirmed_not_pass():
    j = judge(lazy_run(kernel_log={"checked": False, "note": "cannot read /dev/kmsg: Operation not permitted"}),
              LAZY)
    assert j.verdict == "UNCONFIRMED"
    assert j.reasons == ["kernel log unchecked: cannot read /dev/kmsg: Operation not permitted"]


def test_a_kernel_report_fails_even_when_records_were_lost():
    kl = {"checked": False, "lost_records": 3, "reports": [{"title": "WARNING in kvm_mmu_find_shadow_page"}],
          "taint_before": 512, "taint_after": 512}
    j = judge(lazy_run(kernel_log=kl), LAZY)
    assert j.verdict == "FAIL" and j.reasons == ["kernel report: WARNING in kvm_mmu_find_shadow_page"]


def test_passes_that_wrote_nothing_test_nothing():
    nothing = ({"pass": 1, "written": 0, "harvested": 0, "missing": 0, "extra": 0, "missing_sample": []},)
    j = judge(lazy_run(dirty_passes=nothing), LAZY)
    assert j.verdict == "SKIP" and "wrote no page" in j.reasons[0]


def test_eager_expected_but_lazy_observed_fails_naming_both():
    j = judge(lazy_run(), EAGER)
    assert j.verdict == "FAIL" and j.observed_split == "lazy"
    assert j.reasons == ["split was lazy, expected eager@enable (TDP MMU with eager_page_split=Y)"]


def test_a_dead_vm_names_the_ioctl_and_the_phase():
    j = judge(lazy_run(vm_bugged="KVM_RUN returned EIO in phase dirty-1", last_phase="dirty-1", verify=None),
              LAZY)
    assert j.verdict == "FAIL" and j.error_phase == "dirty-1"
    assert j.reasons[0] == "VM bugged (KVM_BUG_ON?): KVM_RUN returned EIO in phase dirty-1"
