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
# one eager-splitting scenario is enough to show each bug; keep the VM run short
SUITE = ["-k", "hugetlb-2m/2m/bitmap"]


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


def run_in_vm(image, out):
    r = subprocess.run([sys.executable, "-m", "kvmsplit", "vm", "--kernel", image, "--",
                        "kvmsplit", "run", *SUITE, "--output", str(out)],
                       capture_output=True, text=True, timeout=1200)
    res = json.loads((out / "results.json").read_text())
    assert res["host"]["vm"]["state"] == "done", r.stderr[-2000:]
    assert res["host"]["eager_page_split"]["value"] and res["host"]["tdp_mmu"]["value"]
    return r.returncode, res["scenarios"][0]


def test_unpatched_kernel_passes_with_eager_split(tools, tmp_path):
    rc, s = run_in_vm(build(), tmp_path)
    assert rc == 0 and s["verdict"] == "PASS", s["reasons"]
    assert s["observed_split"] == "eager@enable"


def test_kvm_bug_on_in_eager_split_is_vm_bugged_with_the_warning(tools, tmp_path):
    rc, s = run_in_vm(build("0001-kvm-bug-on-in-eager-split.patch"), tmp_path)
    assert rc == 1 and s["verdict"] == "FAIL"
    assert s["reasons"][0].startswith("VM bugged (KVM_BUG_ON?): ")
    assert "kernel: WARNING in tdp_mmu_split_huge_page" in s["reasons"]
    titles = [r["title"] for r in s["kernel_log"]["reports"]]
    assert "WARNING in tdp_mmu_split_huge_page" in titles
    assert "W" in s["kernel_log"]["taint_after_letters"]


def test_eager_split_that_leaves_huge_pages_is_incomplete(tools, tmp_path):
    rc, s = run_in_vm(build("0002-eager-split-leaves-huge-pages.patch"), tmp_path)
    assert rc == 1 and s["verdict"] == "FAIL"
    split = next(c for c in s["checks"] if c["name"] == "split")
    assert split["status"] == "fail" and split["summary"].startswith("eager split incomplete:")
    assert s["observed_split"] == "eager-incomplete@enable"


def test_lost_dirty_bit_is_dirty_pages_missing(tools, tmp_path):
    rc, s = run_in_vm(build("0003-lost-dirty-bit.patch"), tmp_path)
    assert rc == 1 and s["verdict"] == "FAIL"
    dirty = next(c for c in s["checks"] if c["name"] == "dirty-log")
    assert dirty["status"] == "fail" and dirty["summary"].startswith("dirty pages missing:")
    assert dirty["details"]["missing"] > 0 and dirty["details"]["extra"] == 0
