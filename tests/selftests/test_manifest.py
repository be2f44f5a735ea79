"""The manifest: the default one expands and is sound; bad ones are refused
with one line naming the entry and the key."""
from dataclasses import replace

import pytest

from kvmsplit.errors import BadInputError, NoInputError
from kvmsplit.host.facts import HostFacts, HugetlbPool
from kvmsplit.selftests.manifest import REQUIREMENTS, SelftestCase, expand, load


def test_default_manifest_covers_what_matters():
    cases = load()
    names = [c.name for c in cases]
    assert len(names) == len(set(names))
    for want in ("dirty_log_test/-M dirty-log", "dirty_log_test/-M clear-log", "dirty_log_test/-M dirty-ring",
                 "dirty_log_perf_test/-s anonymous_thp -v 2", "dirty_log_perf_test/-s anonymous -v 1 -g",
                 "dirty_log_perf_test/-s anonymous_hugetlb_2mb -v 1",
                 "dirty_log_perf_test/-s anonymous_hugetlb_1gb -v 1", "dirty_log_perf_test/-n -v 1",
                 "dirty_log_page_splitting_test", "vmx_dirty_log_test", "nx_huge_pages_test",
                 "kvm_binary_stats_test", "memslot_modification_stress_test", "memslot_perf_test",
                 "set_memory_region_test", "access_tracking_perf_test", "demand_paging_test"):
        assert want in names
    by = {c.name: c for c in cases}
    assert by["dirty_log_perf_test/-s anonymous_thp -v 2"].args == \
        ["-i", "2", "-b", "32M", "-s", "anonymous_thp", "-v", "2"]
    assert by["dirty_log_perf_test/-n -v 1"].requires == ["vmx_or_svm"]
    assert by["dirty_log_perf_test/-s anonymous_hugetlb_1gb -v 1"].hugepages == {"1G": 1}
    assert by["dirty_log_page_splitting_test"].test == "x86_64/dirty_log_page_splitting_test"
    assert by["demand_paging_test/-u MISSING"].args == ["-b", "64M", "-u", "MISSING"]
    assert all(c.timeout > 0 for c in cases)


def test_scenario_definition_is_kind_kselftest():
    c = SelftestCase("t/-v 2", "dirty_log_perf_test", ["-v", "2"], 30.0)
    assert c.to_dict() == {"kind": "kselftest", "test": "dirty_log_perf_test", "args": ["-v", "2"],
                           "timeout": 30.0, "requires": [], "hugepages": {}, "about": ""}


def test_matrix_order_flags_and_defaults():
    cases = expand({"defaults": {"timeout": 9},
                    "test": [{"test": "x86_64/t", "args": ["-i", 2],
                              "matrix": {"-s": ["a", "b"], "-g": [False, True]}}]}, "m.toml")
    assert [(c.name, c.args, c.timeout) for c in cases] == [
        ("t/-s a", ["-i", "2", "-s", "a"], 9.0), ("t/-s a -g", ["-i", "2", "-s", "a", "-g"], 9.0),
        ("t/-s b", ["-i", "2", "-s", "b"], 9.0), ("t/-s b -g", ["-i", "2", "-s", "b", "-g"], 9.0)]


@pytest.mark.parametrize("doc, message", [
    ({"tests": []}, "m.toml: unknown top-level key 'tests' (expected [defaults] and [[test]])"),
    ({"test": []}, "m.toml: no [[test]] tables"),
    ({"defaults": {"timout": 3}, "test": [{"test": "t"}]},
     "m.toml: [defaults]: unknown key 'timout' (expected timeout)"),
    ({"test": [{"test": "t", "timeout": 5, "arg": []}]},
     "m.toml: test #1: unknown key 'arg' (expected test, about, args, matrix, timeout, requires, hugepages)"),
    ({"test": [{"timeout": 5}]},
     "m.toml: test #1: 'test' must be a selftest path like \"x86_64/vmx_dirty_log_test\", got None"),
    ({"test": [{"test": "../../bin/sh", "timeout": 5}]},
     "m.toml: test #1: 'test' must be a selftest path like \"x86_64/vmx_dirty_log_test\", got '../../bin/sh'"),
    ({"test": [{"test": "t"}]}, "m.toml: test #1 (t): no 'timeout' (and none in [defaults])"),
    ({"test": [{"test": "t", "timeout": 0}]},
     "m.toml: test #1 (t): 'timeout' must be a positive number of seconds, got 0"),
    ({"test": [{"test": "t", "timeout": 5, "args": "-i 2"}]},
     "m.toml: test #1 (t): 'args' must be a list of strings, got '-i 2'"),
    ({"test": [{"test": "t", "timeout": 5, "requires": ["vmx_and_svm"]}]},
     "m.toml: test #1 (t): unknown requirement 'vmx_and_svm' (known: " + ", ".join(REQUIREMENTS) + ")"),
    ({"test": [{"test": "t", "timeout": 5, "hugepages": {"4M": 1}}]},
     "m.toml: test #1 (t): 'hugepages' must map \"2M\"/\"1G\" to a page count, got {'4M': 1}"),
    ({"test": [{"test": "t", "timeout": 5, "matrix": {"s": ["a"]}}]},
     "m.toml: test #1 (t): matrix key 's' is not an option (it must start with '-')"),
    ({"test": [{"test": "t", "timeout": 5, "matrix": {"-s": []}}]},
     "m.toml: test #1 (t): matrix '-s' must be a non-empty list of values (strings, numbers, "
     "or true/false for a bare flag)"),
    ({"test": [{"test": "t", "timeout": 5, "matrix": {"-v": [1]}},
               {"test": "t", "timeout": 5, "args": ["-x"], "matrix": {"-v": [1]}}]},
     "m.toml: test #2: scenario 't/-v 1' already comes from test #1; give them different matrices"),
])
def test_bad_manifest_is_one_line(doc, message):
    with pytest.raises(BadInputError) as e:
        expand(doc, "m.toml")
    assert str(e.value) == message


def test_manifest_files(tmp_path):
    with pytest.raises(NoInputError, match="no such manifest"):
        load(tmp_path / "missing.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("[[test]\n")
    with pytest.raises(BadInputError, match=r"bad.toml: not valid TOML: .*line 1"):
        load(bad)


PVM_FACTS = HostFacts(hardware="none", thp="madvise",
                      hugetlb={2048: HugetlbPool(2048), 1048576: HugetlbPool(1048576)}).with_params(
    tdp_mmu=False, eager_page_split=True, nx_huge_pages=False)


@pytest.mark.parametrize("requires, facts, why", [
    ([], PVM_FACTS, None),
    (["vmx_or_svm"], PVM_FACTS,
     "requires vmx_or_svm: needs VMX or SVM for a nested (L2) guest; the CPU offers neither"),
    (["vmx_or_svm"], replace(PVM_FACTS, hardware="svm"), None),
    (["vmx"], replace(PVM_FACTS, hardware="svm"),
     "requires vmx: needs Intel VMX; the CPU offers svm"),
    (["eager_page_split", "tdp_mmu"], PVM_FACTS, "requires tdp_mmu: kvm.tdp_mmu is N"),
    (["hugetlb_2m", "hugetlb_1g"], PVM_FACTS, None),
    (["hugetlb_1g"], replace(PVM_FACTS, hugetlb={2048: HugetlbPool(2048)}),
     "requires hugetlb_1g: this kernel has no 1G hugetlb pool"),
    (["thp"], replace(PVM_FACTS, thp="never"), "requires thp: transparent hugepages are never"),
])
def test_requirements(requires, facts, why):
    assert SelftestCase("t", "t", [], 1.0, requires).unmet(facts) == why

