"""Verdicts from real selftest output and how the process ended: the same
PASS/FAIL/ERROR/SKIP as kvmsplit's own scenarios, with the reason."""
import pytest

from kvmsplit.runs.results import ScenarioResult
from kvmsplit.selftests.process import Completed
from kvmsplit.selftests.verdict import record

from .conftest import capture

CLEAN_LOG = {"checked": True, "reports": [], "taint_before": 0, "taint_after": 0}


def judged(stdout: str, rc: int | None, *, stderr: str = "", timed_out: bool = False,
           kernel_log: dict = CLEAN_LOG, timeout: float = 60) -> ScenarioResult:
    res = ScenarioResult(name="t", scenario={"kind": "kselftest"}, kernel_log=kernel_log)
    record(res, Completed(argv=["t"], returncode=rc, timed_out=timed_out, duration_s=1.0,
                          stdout=stdout, stderr=stderr), timeout)
    return res


@pytest.mark.parametrize("name, verdict, reason", [
    ("dirty_log_test-dirty-log.txt", "PASS", None),
    ("dirty_log_perf_test-small.txt", "PASS", None),
    ("kvm_binary_stats_test.txt", "PASS", None),
    ("dirty_log_page_splitting_test-skip.txt", "SKIP", 'Requirement not met: get_kvm_param_bool("tdp_mmu")'),
    ("access_tracking_perf_test-skip.txt", "SKIP", "CONFIG_IDLE_PAGE_TRACKING is not enabled"),
    ("dirty_log_perf_test-hugetlb-1gb-256M.txt", "FAIL",
     "assertion failed at lib/kvm_util.c:729: !ret in __vm_mem_region_delete(), errno 22 (Invalid argument): "
     "munmap() failed, rc: -1 errno: 22 (Invalid argument)"),
    ("dirty_log_test-dirty-ring-missing-page.txt", "FAIL",
     "assertion failed at dirty_log_test.c:561: test_bit_le(page, bmap) in vm_dirty_log_verify(), errno 1 "
     "(Operation not permitted): Page 917 should have its dirty bit set in this iteration but it is missing"),
])
def test_real_outputs(name, verdict, reason):
    out, rc = capture(name)
    r = judged(out, rc)
    assert r.verdict == verdict
    assert r.reasons == ([reason] if reason else [])
    assert r.extra["exit_code"] == rc


def test_perf_timings_become_phases_and_the_details_are_kept():
    out, rc = capture("dirty_log_perf_test-small.txt")
    r = judged(out, rc)
    assert [p.name for p in r.phases][:3] == ["populate", "enable", "dirty-1"]
    assert r.phase("populate").duration_s == 0.495048622
    assert r.extra["stdout_tail"][-1].startswith("Clear dirty log over 2 iterations")
    assert [c.name for c in r.checks] == ["exit", "kernel-log"]


def test_ktap_result_is_a_check():
    r = judged(*capture("kvm_binary_stats_test.txt"))
    assert r.check("ktap").summary == "KTAP: 4 ok of 4"
    assert r.extra["ktap"]["plan"] == 4


def test_not_ok_with_exit_0_fails():
    r = judged("TAP version 13\n1..2\nok 1 vm0\nnot ok 2 vm1\n", 0)
    assert (r.verdict, r.reasons) == ("FAIL", ["KTAP: not ok 2 vm1"])


def test_unparsable_ktap_does_not_crash_and_the_exit_code_decides():
    # exit 0 with unreadable KTAP: nothing failed, but the per-test witness is missing
    out = "TAP version 13\n1..4\nok 1 vm0\nok 3 vm2\n"
    r = judged(out, 0)
    assert r.verdict == "UNCONFIRMED"
    assert r.extra["ktap_error"] == "line 4: test number 3 out of sequence (expected 2)"
    assert r.reasons == ["output is not valid KTAP (line 4: test number 3 out of sequence "
                         "(expected 2)); judged by the exit code"]
    assert judged(out, 1).verdict == "FAIL"


def test_timeout_is_an_error():
    r = judged("Random seed: 0x6b8b4567\n", None, timed_out=True, timeout=1)
    assert (r.verdict, r.reasons) == ("ERROR", ["timed out after 1 s; its process group was killed"])


def test_a_kernel_report_fails_the_test_that_caused_it_even_when_it_passed():
    kl = {"checked": True, "taint_before": 0, "taint_after": 512,
          "reports": [{"title": "WARNING in kvm_mmu_split_huge_pages"}]}
    r = judged(*capture("dirty_log_perf_test-small.txt"), kernel_log=kl)
    assert r.verdict == "FAIL"
    assert r.reasons == ["kernel report: WARNING in kvm_mmu_split_huge_pages"]


def test_taint_change_fails():
    kl = {"checked": True, "reports": [], "taint_before": 0, "taint_after": 4096,
          "taint_before_letters": "", "taint_after_letters": "O"}
    r = judged(*capture("dirty_log_perf_test-small.txt"), kernel_log=kl)
    assert (r.verdict, r.reasons) == ("FAIL", ["kernel taint changed: '' -> 'O' (0 -> 4096)"])


def test_unchecked_kernel_log_is_unconfirmed_not_pass():
    r = judged(*capture("dirty_log_perf_test-small.txt"), kernel_log={"checked": False, "note": "not root"})
    assert (r.verdict, r.reasons) == ("UNCONFIRMED", ["kernel log unchecked: not root"])


@pytest.mark.parametrize("rc, verdict, reason", [
    (2, "PASS", None),
    (3, "FAIL", "exit 3 (KSFT_XPASS: passed where the test expects a failure)"),
    (-11, "FAIL", "killed by SIGSEGV"),
    (1, "FAIL", "exit 1: Guest physical address width: 52"),
    (4, "SKIP", "exit 4 (KSFT_SKIP): Guest physical address width: 52"),
])
def test_exit_codes(rc, verdict, reason):
    r = judged("Random seed: 0x6b8b4567\nGuest physical address width: 52\n", rc)
    assert r.verdict == verdict
    if reason:
        assert r.reasons[0] == reason


def test_a_whole_skip_in_ktap_with_exit_0_is_a_skip():
    r = judged("1..0 # SKIP - no VMX\n", 0)
    assert (r.verdict, r.reasons) == ("SKIP", ["KTAP: all skipped: no VMX"])
