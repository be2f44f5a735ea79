"""KTAP as the KVM selftests print it (real captures), and KTAP that is
broken: refused with the line that is wrong."""
import pytest

from kvmsplit.selftests import ktap

from .conftest import capture


@pytest.mark.parametrize("name, plan, oks, skip_reason", [
    ("kvm_binary_stats_test.txt", 4, [True] * 4, None),
    ("dirty_log_page_splitting_test-skip.txt", 0, [], 'Requirement not met: get_kvm_param_bool("tdp_mmu")'),
    ("nx_huge_pages_test-no-token.txt", 0, [],
     "This test must be run with the magic token via '-t 887563923'."),
    ("access_tracking_perf_test-skip.txt", 0, [], "CONFIG_IDLE_PAGE_TRACKING is not enabled"),
])
def test_real_ktap(name, plan, oks, skip_reason):
    doc = ktap.parse(capture(name)[0])
    assert doc.plan == plan
    assert [r.ok for r in doc.results] == oks
    assert doc.skip_reason == skip_reason
    assert doc.failures() == []


def test_version_line_results_and_diagnostics_of_a_real_capture():
    doc = ktap.parse(capture("kvm_binary_stats_test.txt")[0])
    assert doc.version == "TAP version 13"
    assert [(r.number, r.description, r.line) for r in doc.results] == \
        [(1, "vm0", 4), (2, "vm1", 5), (3, "vm2", 6), (4, "vm3", 7)]
    assert doc.diagnostics == ["Totals: pass:4 fail:0 xfail:0 xpass:0 skip:0 error:0"]


@pytest.mark.parametrize("name", ["dirty_log_test-dirty-ring.txt", "dirty_log_perf_test-small.txt",
                                  "dirty_log_perf_test-hugetlb-1gb-256M.txt"])
def test_output_without_ktap_is_none(name):
    assert ktap.parse(capture(name)[0]) is None


# The nesting example of Documentation/dev-tools/ktap.rst
SPEC_EXAMPLE = """KTAP version 1
1..1
  KTAP version 1
  1..3
    KTAP version 1
    1..1
    # test_1: initializing test_1
    ok 1 test_1
  ok 1 example_test_1
    KTAP version 1
    1..2
    ok 1 test_1 # SKIP test_1 skipped
    ok 2 test_2
  ok 2 example_test_2
    KTAP version 1
    1..3
    ok 1 test_1
    # test_2: FAIL
    not ok 2 test_2
    ok 3 test_3 # SKIP test_3 skipped
  not ok 3 example_test_3
not ok 1 main_test
"""


def test_nested_subtests_attach_to_their_parent_result():
    doc = ktap.parse(SPEC_EXAMPLE)
    main = doc.results[0]
    assert (main.description, main.ok) == ("main_test", False)
    ex = main.subtests.results
    assert [r.description for r in ex] == ["example_test_1", "example_test_2", "example_test_3"]
    assert ex[0].subtests.diagnostics == ["test_1: initializing test_1"]
    skipped = ex[1].subtests.results[0]
    assert (skipped.directive, skipped.diagnostic) == ("SKIP", "test_1 skipped")
    assert [f"{r.number} {r.description}" for r in doc.failures()] == \
        ["2 test_2", "3 example_test_3", "1 main_test"]


@pytest.mark.parametrize("line, directive, diagnostic, failed", [
    ("not ok 1 t # TIMEOUT 30 seconds", "TIMEOUT", "30 seconds", True),
    ("not ok 1 t # XFAIL known", "XFAIL", "known", False),
    ("not ok 1 t # SKIP - no vmx", "SKIP", "no vmx", False),
    ("ok 1 t # rcode=0", None, "rcode=0", False),
])
def test_directives(line, directive, diagnostic, failed):
    r = ktap.parse(f"KTAP version 1\n1..1\n{line}\n").results[0]
    assert (r.directive, r.diagnostic, r.failed) == (directive, diagnostic, failed)


def test_trailing_plan_and_unknown_lines_are_accepted():
    doc = ktap.parse("Random seed: 0x1\nTAP version 13\nok 1 a\nsome free text\nok 2 b\n1..2\n")
    assert doc.plan == 2 and len(doc.results) == 2


@pytest.mark.parametrize("text, line, message", [
    ("TAP version 13\n1..2\nok 1 a\nok 3 c\n", 4, "test number 3 out of sequence (expected 2)"),
    ("TAP version 13\n1..3\nok 1 a\nok 2 b\n", 2, "plan 1..3 but 2 result(s) (missing 3..3)"),
    ("TAP version 13\n1..1\nok 1 a\nok 2 b\n", 4, "result 2 beyond the plan 1..1"),
    ("TAP version 13\n1..1\n1..1\nok 1 a\n", 3, "second plan (the first is at line 2)"),
    ("TAP version 13\n1..x\n", 2, "bad plan '1..x': expected 1..N"),
    ("TAP version thirteen\n1..0\n", 1, "bad version number in 'TAP version thirteen'"),
    ("TAP version 13\n1..1\nok a\n", 3, "result line without a test number: 'ok a'"),
    ("TAP version 13\nok 1 a\nTAP version 13\n", 3,
     "unexpected version line 'TAP version 13' after the document's results"),
    ("TAP version 13\nok 1 a\nok 2 b\n1..3\n", 4, "trailing plan 1..3 but 2 result(s) before it"),
    ("KTAP version 1\n1..1\n  KTAP version 1\n  1..1\n  ok 1 sub\n1..2\n", 6,
     "subtests (from line 3) not followed by their parent's result line"),
    ("KTAP version 1\n1..1\n  KTAP version 1\n  1..1\n  ok 1 sub\n", 3,
     "subtests never closed by their parent's result line"),
])
def test_malformed_ktap_names_the_line(text, line, message):
    with pytest.raises(ktap.KtapError) as e:
        ktap.parse(text)
    assert (e.value.line, e.value.message) == (line, message)
    assert str(e.value) == f"line {line}: {message}"
