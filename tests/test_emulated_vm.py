"""Emulated writes inside `kvmsplit vm` with the 6.12 build booted with
kvm.force_emulation_prefix=1: a TDP-MMU KVM (TCG's SVM+NPT) that emulates
only what carries the prefix. The scenarios take the FEP route there, and
their results are recorded whatever they are. About 90 s with the kernel
cached."""
import json
import subprocess
import sys

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.kvm, pytest.mark.timeout(1200)]


def test_emulated_scenarios_run_through_the_prefix_in_the_612_kernel(kernel_612, tmp_path):
    r = subprocess.run([sys.executable, "-m", "kvmsplit", "vm", "--kernel", kernel_612, "--append",
                        "kvm.force_emulation_prefix=1", "--", "kvmsplit", "run", "-k", "emulated/anon/4k/bitmap",
                        "-k", "emulated/anon/4k/ring", "-k", "emulated-string/anon/4k/ring", "--output", tmp_path],
                       capture_output=True, text=True, timeout=1100)
    res = json.loads((tmp_path / "results.json").read_text())
    assert res["host"]["vm"]["state"] == "done", r.stderr[-3000:]
    assert res["host"]["force_emulation_prefix"]["value"] == 1 and res["host"]["tdp_mmu"]["value"]
    by = {s["name"]: s for s in res["scenarios"]}
    assert set(by) == {"emulated/anon/4k/bitmap", "emulated/anon/4k/ring", "emulated/anon/4k/ring-acq-rel",
                       "emulated-string/anon/4k/ring", "emulated-string/anon/4k/ring-acq-rel"}
    for s in by.values():
        assert s["extra"]["write_route"]["route"] == "fep", s["name"]
        assert s["verdict"] in ("PASS", "FAIL"), (s["name"], s["reasons"])
    # one emulated mov per page is exact there too
    for name in ("emulated/anon/4k/bitmap", "emulated/anon/4k/ring", "emulated/anon/4k/ring-acq-rel"):
        assert by[name]["verdict"] == "PASS", (name, by[name]["reasons"])
    # a failing rep-string ring names what it saw: the stuck ring, and the WARNING once per boot
    failed = [s for s in by.values() if s["verdict"] == "FAIL"]
    for s in failed:
        assert any("dirty ring stuck" in reason for reason in s["reasons"]), s["reasons"]
    if failed:
        titles = [r["title"] for s in failed for r in s["kernel_log"]["reports"]]
        assert "WARNING in kvm_dirty_ring_push" in titles or failed[0]["kernel_log"]["taint_before"] & 512
    assert r.returncode == (1 if failed else 0), r.stderr[-3000:]
