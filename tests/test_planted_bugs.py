"""Proof that kvmsplit catches real kernel bugs: Debian's linux-source-6.12,
built once as is and once per planted MMU bug (kselftests/planted/), each
booted with `kvmsplit vm` (TCG with SVM+NPT here: a real TDP MMU). The
unpatched kernel must pass with an eager split observed; each bug must be
reported as exactly that failure. A bug that kvmsplit does not catch is a
bug in kvmsplit.

The first build takes about ten minutes on two cores and is cached in
~/.cache/kvmsplit/kernel; each planted variant then rebuilds in about a minute.
"""
import glob
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import need

# the first kernel build alone takes ~10 minutes on two cores
pytestmark = [pytest.mark.slow, pytest.mark.timeout(3600)]
PLANTED = Path(__file__).resolve().parents[1] / "kselftests" / "planted"


@pytest.fixture(scope="module")
def tools():
    need(bool(glob.glob("/usr/src/linux-source-6.12*")), "linux-source-6.12 not installed")
    for tool in ("qemu-system-x86_64", "busybox", "flex", "bison", "bc"):
        need(shutil.which(tool) is not None, f"{tool} not installed")


def build(*patches):
    args = [sys.executable, "-m", "kvmsplit", "kernel", "build", "--json"]
    for p in patches:
        args += ["--mbox", str(PLANTED / p)]
    r = subprocess.run(args, capture_output=True, text=True, timeout=3600)
    assert r.returncode == 0, r.stderr[-2000:]
    return json.loads(r.stdout)["image"]


def run_default_suite(image, out):
    """The default suite inside the kernel under test (about 90 s under TCG)."""
    r = subprocess.run([sys.executable, "-m", "kvmsplit", "vm", "--kernel", image, "--",
                        "kvmsplit", "run", "--output", str(out)],
                       capture_output=True, text=True, timeout=1800)
    res = json.loads((out / "results.json").read_text())
    assert res["host"]["vm"]["state"] == "done", r.stderr[-2000:]
    assert res["host"]["eager_page_split"]["value"] and res["host"]["tdp_mmu"]["value"]
    return r.returncode, res["scenarios"]


def check(s, name):
    return next(c for c in s["checks"] if c["name"] == name)


def eager_expected(s):
    return s["expectation"]["split"] == "eager"


def test_unpatched_kernel_passes_with_eager_split(tools, tmp_path):
    rc, scenarios = run_default_suite(build(), tmp_path)
    assert rc == 0, [(s["name"], s["reasons"]) for s in scenarios if s["verdict"] != "PASS"]
    assert all(s["verdict"] == "PASS" or s["verdict"] == "SKIP" and s["reasons"] for s in scenarios)
    eager = [s for s in scenarios if eager_expected(s) and s["verdict"] == "PASS"]
    assert eager and all(s["observed_split"].startswith("eager@") for s in eager)


def test_kvm_bug_on_in_eager_split_is_vm_bugged_with_the_warning(tools, tmp_path):
    rc, scenarios = run_default_suite(build("0001-kvm-bug-on-in-eager-split.patch"), tmp_path)
    assert rc == 1
    # every VM that splits eagerly is killed; WARN_ON_ONCE prints only for the first
    eager = [s for s in scenarios if eager_expected(s) and s["verdict"] != "SKIP"]
    assert eager and all(s["verdict"] == "FAIL" for s in eager)
    assert all(s["reasons"][0].startswith("VM bugged (KVM_BUG_ON?): ") for s in eager)
    warned = [s for s in eager if "kernel: WARNING in tdp_mmu_split_huge_page" in s["reasons"]]
    assert warned == eager[:1]
    s = warned[0]
    assert "WARNING in tdp_mmu_split_huge_page" in [r["title"] for r in s["kernel_log"]["reports"]]
    assert "W" in s["kernel_log"]["taint_after_letters"]
    assert all(s["verdict"] == "PASS" for s in scenarios if s["expectation"]["split"] == "none")


def test_eager_split_that_leaves_huge_pages_is_incomplete(tools, tmp_path):
    rc, scenarios = run_default_suite(build("0002-eager-split-leaves-huge-pages.patch"), tmp_path)
    assert rc == 1
    eager = [s for s in scenarios if eager_expected(s) and s["verdict"] != "SKIP"]
    assert eager and all(s["verdict"] == "FAIL" for s in eager)
    for s in eager:
        assert s["observed_split"].startswith("eager-incomplete@"), s["name"]
        assert check(s, "split")["summary"].startswith("eager split incomplete:")


def test_lost_dirty_bit_is_dirty_pages_missing(tools, tmp_path):
    rc, scenarios = run_default_suite(build("0003-lost-dirty-bit.patch"), tmp_path)
    assert rc == 1
    ran = [s for s in scenarios if s["verdict"] != "SKIP"]
    assert ran and all(s["verdict"] == "FAIL" for s in ran)
    for s in ran:
        dirty = check(s, "dirty-log")
        assert dirty["summary"].startswith("dirty pages missing:"), s["name"]
        assert dirty["details"]["missing"] > 0 and dirty["details"]["extra"] == 0
