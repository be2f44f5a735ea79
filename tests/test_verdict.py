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


def trace(**kw):
    """A phase's PhaseTrace.to_dict(), as the tracing package records it."""
    return {"splits_by_level": {}, "split_errnos": [], "regions_dismantled": 0, "new_direct_l1": 0,
            "huge_mapped_by_level": {}, "lost": 0, **kw}


def lazy_run(**kw) -> Observations:
    """A 256 MiB THP scenario on this shadow-paging host, as it really goes
    (numbers from a real run: 128 huge mappings, 128 new 4K shadow tables on
    the first write pass, 128 huge mappings back in recovery)."""
    phases = (Phase("boot", 0.1, vm_stats=stats(16, 0), trace=trace(new_direct_l1=1, regions_dismantled=1)),
              Phase("populate", 0.6, vm_stats=stats(24, 128), trace=trace(huge_mapped_by_level={"2": 128})),
              Phase("enable", 0.0, vm_stats=stats(24, 128), trace=trace()),
              Phase("dirty-1", 1.3, vm_stats=stats(65560, 0), vcpu_delta={"pf_taken": 65536},
                    trace=trace(new_direct_l1=128, regions_dismantled=128)),
              Phase("dirty-2", 0.1, vm_stats=stats(65560, 0), trace=trace()),
              Phase("disable", 0.0, vm_stats=stats(24, 0), trace=trace()),
              Phase("recovery", 0.1, vm_stats=stats(24, 128), trace=trace(huge_mapped_by_level={"2": 128})),
              Phase("verify", 0.1, vm_stats=stats(24, 128), trace=trace()))
    base = Observations(size=256 * MB, backing="thp", phases=phases, last_phase="verify",
                        dirty_passes=({"pass": 1, "written": 65536, "harvested": 65536, "missing": 0,
                                       "extra": 0, "missing_sample": []},),
                        verify={"vcpus": 1, "mismatch": []}, host_huge_bytes=256 * MB,
                        pass1_regions={"pages_2m": 128, "pages_1g": 1}, kernel_log=CLEAN_LOG,
                        memory_bytes=264 * MB)
    return replace(base, **kw)


def eager_run(**kw) -> Observations:
    """64 MiB of hugetlb 2M on a TDP MMU host (as measured in `kvmsplit vm`):
    32 huge mappings split at enable into 16384 4K ones."""
    phases = (Phase("boot", 0.1, vm_stats=stats(5, 0), trace=trace()),
              Phase("populate", 0.2, vm_stats=stats(5, 32), trace=trace(huge_mapped_by_level={"2": 32})),
              Phase("enable", 0.0, vm_stats=stats(16389, 0),
                    trace=trace(splits_by_level={"2": 32}, regions_dismantled=32)),
              Phase("dirty-1", 0.4, vm_stats=stats(16389, 0), trace=trace()),
              Phase("disable", 0.0, vm_stats=stats(5, 0), trace=trace()),
              Phase("recovery", 0.1, vm_stats=stats(5, 32), trace=trace(huge_mapped_by_level={"2": 32})),
              Phase("verify", 0.1, vm_stats=stats(5, 32), trace=trace()))
    return replace(lazy_run(size=64 * MB, backing="hugetlb-2m", phases=phases, memory_bytes=72 * MB,
                            pass1_regions={"pages_2m": 32, "pages_1g": 1}), **kw)


def with_phase(obs, name, **changes):
    return replace(obs, phases=tuple(replace(p, **changes) if p.name == name else p for p in obs.phases))


def test_a_clean_lazy_run_passes():
    j = judge(lazy_run(), LAZY)
    assert (j.verdict, j.observed_split, j.reasons) == ("PASS", "lazy", [])
    assert {c.name: c.status for c in j.checks} == {
        "huge-before": "pass", "split": "pass", "dirty-log": "pass", "memory": "pass", "recovery": "pass",
        "kernel-log": "pass", "alive": "pass", "witness": "pass", "stats": "pass"}
    assert j.checks[-2].summary == ("tracepoints agree with the stats: populate 128 huge mapped; dirty-1 128 new "
                                    "4K shadow tables; recovery 128 huge mapped")


def test_a_clean_eager_run_passes_with_both_witnesses():
    j = judge(eager_run(), EAGER)
    assert (j.verdict, j.observed_split) == ("PASS", "eager@enable")
    assert "enable 32 splits" in j.checks[-2].summary


def test_huge_pages_zapped_instead_of_split_fail_naming_both_numbers():
    """The stats alone read as a clean eager split; the tracepoints saw none."""
    j = judge(with_phase(eager_run(), "enable", trace=trace()), EAGER)
    assert j.verdict == "FAIL" and j.observed_split == "eager@enable"
    assert j.reasons == ["the witnesses disagree: enable: stats say 32 fewer 2M mappings, tracepoints show "
                         "0 2M regions split"]


def test_split_bookkeeping_that_disagrees_with_the_split_events_fails():
    lying = with_phase(eager_run(), "enable", vm_stats=stats(9000, 0))      # 32 splits but 8995 new 4K
    j = judge(lying, EAGER)
    assert j.verdict == "FAIL"
    assert j.reasons == ["the witnesses disagree: enable: 32 2M splits should add 16384 4K mappings; "
                         "stats say 8995"]


def test_a_split_that_failed_names_its_errno():
    bad = with_phase(eager_run(), "enable", trace=trace(splits_by_level={"2": 32}, regions_dismantled=32,
                                                        split_errnos=[[0x100200, -12]]))
    j = judge(bad, EAGER)
    assert j.verdict == "FAIL" and j.reasons == ["kvm_mmu_split_huge_page failed: errno -12 for gfn 0x100200 in enable"]


def test_no_tracepoints_is_unconfirmed():
    j = judge(lazy_run(trace_unavailable="cannot mount tracefs at /tmp/x: Operation not permitted"), LAZY)
    assert j.verdict == "UNCONFIRMED"
    assert j.reasons == ["tracepoints unavailable (cannot mount tracefs at /tmp/x: Operation not permitted): "
                         "the split evidence rests on the stats alone"]


def test_lost_trace_events_are_unconfirmed():
    j = judge(with_phase(lazy_run(), "dirty-2", trace=trace(lost=300)), LAZY)
    assert j.verdict == "UNCONFIRMED" and "trace events lost in dirty-2 (300)" in j.reasons[0]


def test_a_counter_below_zero_is_a_kernel_bug_not_a_number():
    j = judge(with_phase(lazy_run(), "disable", vm_stats=stats(24, (1 << 64) - 3)), LAZY)
    assert j.verdict == "FAIL"
    assert "pages_2m reads 18446744073709551613 after disable: the kernel's count went below zero (-3)" in j.reasons


def test_a_counter_past_the_memslots_is_a_kernel_bug():
    j = judge(with_phase(lazy_run(), "dirty-2", vm_stats=stats(65560, 4096)), LAZY)
    assert j.verdict == "FAIL"
    assert any(r.startswith("the page counts after dirty-2 map 8448 MiB, more than the 264 MiB") for r in j.reasons)


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
