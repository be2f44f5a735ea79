"""Nested scenarios for real: inside `kvmsplit vm` (TCG with an emulated
SVM+NPT EPYC) the 6.12 kernel under test offers SVM to kvmsplit's guest, whose
L1 runs an L2 under nested paging; the shadow MMU's eager split of L2 memory
(the seed review's path) must be observed, not assumed."""
import pytest

from conftest import kvmsplit_vm

pytestmark = [pytest.mark.slow, pytest.mark.kvm, pytest.mark.timeout(3600)]
ONE = "nested/hugetlb-2m/l2-2m/bitmap"


def check(s, name):
    return next(c for c in s["checks"] if c["name"] == name)


def test_nested_scenarios_pass_with_the_shadow_mmus_eager_split(clean_run):
    """`kvmsplit vm --kernel <6.12> -- kvmsplit run` (the default suite holds the nested variants)."""
    rc, res = clean_run
    nested = [s for s in res["scenarios"] if s["name"].startswith("nested/")]
    assert rc == 0, [(s["name"], s["reasons"]) for s in res["scenarios"] if s["verdict"] != "PASS"]
    assert len(nested) == 11 and all(s["verdict"] == "PASS" for s in nested)
    huge = [s for s in nested if s["scenario"]["l2_page"] == "2m"]
    for s in huge:
        when = s["expectation"]["when"]
        assert s["observed_split"] == f"eager@{when}", s["name"]
        trace = next(p["trace"] for p in s["phases"] if p["name"] == when)
        split = trace["splits_by_level"]["2"]
        # every 2M split of L2 memory came with a new guest_mode shadow page: the shadow MMU's
        assert split > 0 and trace["new_direct_l1_guest_mode"] >= split, (s["name"], trace)
        assert "by the shadow MMU, of L2 memory" in check(s, "witness")["summary"]
    small = next(s for s in nested if s["scenario"]["l2_page"] == "4k")
    assert small["observed_split"] == "none" and small["expectation"]["split"] == "none"


def test_an_l2_that_faults_is_an_error_naming_the_phase_and_its_exit_code(kernel_612, tmp_path):
    rc, res = kvmsplit_vm(kernel_612, "-k", ONE, "--inject-l2-fault", "dirty-1", out=tmp_path)
    [s] = res["scenarios"]
    assert rc == 1 and s["verdict"] == "ERROR" and s["error_phase"] == "dirty-1"
    want = "guest failed in phase dirty-1: guest cpu 0: L2 #VMEXIT 0x400 (NPF)"
    assert s["reasons"][0].startswith(want), s["reasons"]


def test_a_hung_l2_is_an_error_within_the_phase_timeout(kernel_612, tmp_path):
    rc, res = kvmsplit_vm(kernel_612, "-k", ONE, "--inject-hang", "dirty-1", "--phase-timeout", "20", out=tmp_path)
    [s] = res["scenarios"]
    assert rc == 1 and s["verdict"] == "ERROR" and s["error_phase"] == "dirty-1"
    assert s["reasons"][0].startswith("guest hung in phase dirty-1"), s["reasons"]
    assert s["duration_s"] < 120
