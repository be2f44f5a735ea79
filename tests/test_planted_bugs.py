"""Proof that kvmsplit catches real kernel bugs: Debian's linux-source-6.12,
built once as is and once per planted MMU bug (kselftests/planted/), each
booted with `kvmsplit vm` (TCG with SVM+NPT here: a real TDP MMU, and nested
SVM for the L2 scenarios).

The unpatched kernel runs the whole default suite and must pass it, with
eager splits observed by both witnesses. Each planted kernel runs a subset
that covers every kind of scenario the bug can and cannot touch, and the
WHOLE verdict vector is asserted: for every scenario, its verdict and the
status of every check. A scenario the bug cannot reach must come out exactly
as under the unpatched kernel; one it reaches must fail exactly the checks
the bug breaks, and no others.

The first build takes 10-20 minutes on two cores and is cached in
the tests' own cache (~/.cache/kvmsplit-test/kernel); each planted variant then rebuilds in about a
minute.
"""
from pathlib import Path

import pytest

from conftest import build_kernel, kvmsplit_vm

pytestmark = [pytest.mark.slow, pytest.mark.kvm, pytest.mark.timeout(3600)]
PLANTED = Path(__file__).resolve().parents[1] / "kselftests" / "planted"
# one of each kind: nothing to split, TDP eager at enable and at the first clear, every dirty-log
# interface, multi-vCPU and multi-slot, and nested L2 pages (shadow MMU) huge and 4K
SUBSET = ["anon/4k/bitmap", "thp/4k/bitmap", "thp/2m/bitmap", "thp/2m/manual-init-set", "hugetlb-2m/2m/manual",
          "hugetlb-2m/2m/ring", "nested/hugetlb-2m/l2-2m/bitmap", "nested/thp/l2-2m/manual-init-set",
          "nested/hugetlb-2m/l2-4k/bitmap"]


def statuses(s) -> dict:
    return {c["name"]: c["status"] for c in s["checks"]}


def check(s, name):
    return next(c for c in s["checks"] if c["name"] == name)


def tdp_eager(s) -> bool:
    """The TDP MMU splits this scenario's huge mappings when logging is enabled (or at the first clear)."""
    return s["expectation"]["split"] == "eager" and "nested" not in s["scenario"]


def nested_huge(s) -> bool:
    return s["expectation"]["split"] == "eager" and "nested" in s["scenario"]


@pytest.fixture(scope="module")
def clean(clean_run):
    return clean_run


def planted_run(patch, tmp_path):
    rc, res = kvmsplit_vm(build_kernel(PLANTED / patch), *[a for k in SUBSET for a in ("-k", k)], out=tmp_path)
    assert res["host"]["eager_page_split"]["value"] and res["host"]["tdp_mmu"]["value"]
    return rc, res["scenarios"]


def assert_vector(scenarios, clean_res, affected, expect, everywhere=False):
    """Untouched scenarios exactly as under the clean kernel; touched ones as `expect` says."""
    base = {s["name"]: s for s in clean_res["scenarios"]}
    hit = [s for s in scenarios if affected(s)]
    assert hit, "the subset must reach the bug"
    assert everywhere or [s for s in scenarios if not affected(s)], \
        "the subset must also hold scenarios the bug cannot reach"
    for s in scenarios:
        want_verdict, want = base[s["name"]]["verdict"], statuses(base[s["name"]])
        if affected(s):
            want_verdict, changes = expect(s, first=s is hit[0])
            want = {**want, **changes}
        assert (s["verdict"], statuses(s)) == (want_verdict, want), (s["name"], s["reasons"])


def test_unpatched_kernel_passes_every_scenario_with_both_witnesses(clean):
    rc, res = clean
    scenarios = res["scenarios"]
    assert rc == 0, [(s["name"], s["reasons"]) for s in scenarios if s["verdict"] != "PASS"]
    assert all(s["verdict"] == "PASS" for s in scenarios)
    eager = [s for s in scenarios if s["expectation"]["split"] == "eager"]
    assert eager and all(s["observed_split"].startswith("eager@") for s in eager)
    assert all(check(s, "witness")["status"] == "pass" for s in scenarios)
    assert any(nested_huge(s) for s in eager) and any(tdp_eager(s) for s in eager)


def test_kvm_bug_on_in_the_tdp_eager_split_is_vm_bugged_with_the_warning(clean, tmp_path):
    rc, scenarios = planted_run("0001-kvm-bug-on-in-eager-split.patch", tmp_path)

    def expect(s, first):
        # the VM dies at the split: nothing after it is judged; WARN_ON_ONCE prints for the first only
        died_at_enable = s["error_phase"] == "enable"
        return "FAIL", {"alive": "fail", "dirty-log": "skip", "recovery": "skip",
                        "kernel-log": "fail" if first else "pass",
                        **({"split": "skip"} if died_at_enable else {})}
    assert rc == 1
    assert_vector(scenarios, clean[1], tdp_eager, expect)
    hit = [s for s in scenarios if tdp_eager(s)]
    assert all(s["reasons"][0].startswith("VM bugged (KVM_BUG_ON?): ") for s in hit)
    assert "kernel: WARNING in tdp_mmu_split_huge_page" in hit[0]["reasons"]
    assert "W" in hit[0]["kernel_log"]["taint_after_letters"]


def test_eager_split_that_leaves_huge_pages_is_incomplete(clean, tmp_path):
    rc, scenarios = planted_run("0002-eager-split-leaves-huge-pages.patch", tmp_path)
    assert rc == 1
    assert_vector(scenarios, clean[1], tdp_eager, lambda s, first: ("FAIL", {"split": "fail"}))
    for s in (s for s in scenarios if tdp_eager(s)):
        assert s["observed_split"].startswith("eager-incomplete@"), s["name"]
        assert check(s, "split")["summary"].startswith("eager split incomplete:")


def test_lost_dirty_bit_is_dirty_pages_missing_everywhere(clean, tmp_path):
    rc, scenarios = planted_run("0003-lost-dirty-bit.patch", tmp_path)
    assert rc == 1
    assert_vector(scenarios, clean[1], lambda s: True, lambda s, first: ("FAIL", {"dirty-log": "fail"}),
                  everywhere=True)
    for s in scenarios:
        dirty = check(s, "dirty-log")
        assert dirty["summary"].startswith("dirty pages missing:"), s["name"]
        assert dirty["details"]["missing"] > 0 and dirty["details"]["extra"] == 0


def test_huge_pages_zapped_instead_of_split_are_caught_by_the_second_witness(clean, tmp_path):
    """The stats alone read as a clean eager split here; only the tracepoints tell."""
    rc, scenarios = planted_run("0004-eager-split-zaps-instead.patch", tmp_path)

    def at_enable(s):       # the planted zap is on the enable path (mmu_lock held for read)
        return tdp_eager(s) and s["expectation"]["when"] == "enable"
    assert rc == 1
    assert_vector(scenarios, clean[1], at_enable, lambda s, first: ("FAIL", {"witness": "fail"}))
    for s in (s for s in scenarios if at_enable(s)):
        assert s["observed_split"] == "eager@enable" and check(s, "split")["status"] == "pass"
        assert check(s, "witness")["summary"].startswith("the witnesses disagree: enable: stats say "), s["name"]
        assert "tracepoints show 0 2M regions split" in check(s, "witness")["summary"]


def test_kvm_bug_on_in_the_shadow_mmus_nested_eager_split_is_caught(clean, tmp_path):
    """The seed's path: the shadow MMU's eager split of L2 pages. Only nested scenarios reach it."""
    rc, scenarios = planted_run("0005-kvm-bug-on-in-nested-eager-split.patch", tmp_path)

    def expect(s, first):
        return "FAIL", {"alive": "fail", "dirty-log": "skip", "recovery": "skip",
                        "kernel-log": "fail" if first else "pass"}
    assert rc == 1
    assert_vector(scenarios, clean[1], nested_huge, expect)
    hit = [s for s in scenarios if nested_huge(s)]
    assert all(s["reasons"][0].startswith("VM bugged (KVM_BUG_ON?): ") for s in hit)
    # shadow_mmu_split_huge_page() is inlined: the WARNING names its caller
    assert "kernel: WARNING in kvm_shadow_mmu_try_split_huge_pages" in hit[0]["reasons"]
    # the evidence shows the shadow MMU splitting L2 memory before the VM died
    trace = next(p["trace"] for p in hit[0]["phases"] if p["name"] == hit[0]["expectation"]["when"])
    assert trace["new_direct_l1_guest_mode"] > 0
