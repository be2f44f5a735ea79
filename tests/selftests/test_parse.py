"""Assertion failures and perf timings, parsed from real selftest output."""
import pytest

from kvmsplit.selftests.parse import parse_assertion, parse_timings

from .conftest import capture


def test_assertion_failure_at_cleanup_with_1g_hugetlb():
    a = parse_assertion(capture("dirty_log_perf_test-hugetlb-1gb-256M.txt")[0])
    assert (a.file, a.line, a.expression) == ("lib/kvm_util.c", 729, "!ret")
    assert (a.errno, a.errno_text) == (22, "Invalid argument")
    assert [(f.n, f.function) for f in a.backtrace] == [
        (1, "__vm_mem_region_delete"), (2, "kvm_vm_free"), (3, "run_test"), (4, "for_each_guest_mode"),
        (5, "main"), (6, "??"), (7, "??"), (8, "_start")]
    assert a.backtrace[0].address == "0x0000000000403f8c"
    assert a.backtrace[0].location == "kvm_util.c:729 (discriminator 7)"
    assert a.message == "munmap() failed, rc: -1 errno: 22 (Invalid argument)"
    assert a.summary() == ("assertion failed at lib/kvm_util.c:729: !ret in __vm_mem_region_delete(), "
                           "errno 22 (Invalid argument): munmap() failed, rc: -1 errno: 22 (Invalid argument)")


def test_assertion_with_an_inlined_frame():
    a = parse_assertion(capture("dirty_log_test-dirty-ring-missing-page.txt")[0])
    assert (a.file, a.line, a.expression) == ("dirty_log_test.c", 561, "test_bit_le(page, bmap)")
    inlined = a.backtrace[1]
    assert (inlined.n, inlined.address, inlined.function, inlined.location) == \
        (2, None, "run_test", "dirty_log_test.c:803")
    assert len(a.backtrace) == 7
    assert a.message == "Page 917 should have its dirty bit set in this iteration but it is missing"


def test_assertion_with_errno_0_leaves_errno_out_of_the_summary():
    a = parse_assertion(capture("dirty_log_test-two-iterations.txt")[0])
    assert a.errno == 0
    assert a.summary() == ("assertion failed at dirty_log_test.c:911: p.iterations > 2 in main(): "
                           "Iterations must be greater than two")


@pytest.mark.parametrize("name", ["dirty_log_perf_test-small.txt", "kvm_binary_stats_test.txt",
                                  "dirty_log_page_splitting_test-skip.txt"])
def test_no_assertion(name):
    assert parse_assertion(capture(name)[0]) is None


def test_truncated_assertion_block_is_kept_raw():
    a = parse_assertion("==== Test Assertion Failure ====\n  garbage\n")
    assert a.file is None and a.raw == ["==== Test Assertion Failure ====", "  garbage"]
    assert a.summary() == "test assertion failure:   garbage"


PERF_SMALL = [
    ("populate", 0.495048622), ("enable", 0.000039199),
    ("dirty-1", 0.440183814), ("get-dirty-log-1", 0.000006920), ("clear-dirty-log-1", 0.000135823),
    ("dirty-2", 0.452292989), ("get-dirty-log-2", 0.000003785), ("clear-dirty-log-2", 0.000135732),
    ("disable", 0.000038557),
]


@pytest.mark.parametrize("name, phases", [
    ("dirty_log_perf_test-small.txt", PERF_SMALL),
    # -g: KVM_GET_DIRTY_LOG clears, so there is no clear phase
    ("dirty_log_perf_test-bitmap-thp.txt", [
        ("populate", 0.326562920), ("enable", 0.003993259), ("dirty-1", 0.443967706),
        ("get-dirty-log-1", 0.000137095), ("dirty-2", 0.419837206), ("get-dirty-log-2", 0.000141151),
        ("disable", 0.000049664)]),
    ("demand_paging_test.txt", [("total-guest-execution", 0.488792022)]),
    ("kvm_page_table_test.txt", [("kvm-create-mappings-total-execution", 0.129865204),
                                 ("kvm-update-mappings-total-execution", 0.076585746),
                                 ("kvm-adjust-mappings-total-execution", 0.063437551)]),
    ("dirty_log_test-dirty-log.txt", []),
])
def test_timings(name, phases):
    assert [(p.name, p.duration_s) for p in parse_timings(capture(name)[0])] == phases
