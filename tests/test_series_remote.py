"""`kvmsplit series --remote BOX`: the base and patched kernels go to a box
(a real sshd, tests/remote/sshboxes.py), which is switched to each with
kexec and waited for (a new boot_id and the image's release: emulated, as
no real reboot can happen here), and the suite runs there each time. The
box's kvmsplit runs on this machine's kernel, so the two runs agree: the
plumbing is what is tested (a switch with the right image before every
run, each kernel run three times, the runs fetched and compared with phase
times judged over the repeats, one summary), not the kernels."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from remote.sshboxes import Lab
from test_remote import SUITE, box_settings
from test_series import DOC, TREE, series_mbox

pytestmark = [pytest.mark.slow, pytest.mark.kvm, pytest.mark.timeout(1800)]


@pytest.fixture
def lab(tmp_path):
    (tmp_path / "lab").mkdir()
    lab = Lab(tmp_path / "lab")
    try:
        yield lab
    finally:
        lab.close()


def test_a_series_on_a_box_boots_each_kernel_there_and_compares_the_runs(kernel_612, lab, tmp_path):
    base = subprocess.run(["git", "-C", str(TREE), "rev-parse", "kvmsplit-base"], capture_output=True,
                          text=True).stdout.strip()
    doc = subprocess.run(["git", "-C", str(TREE), "show", f"kvmsplit-base:{DOC}"], capture_output=True,
                         text=True).stdout.splitlines()
    mbx = series_mbox(tmp_path / "series.mbx", base, doc)
    box = lab.box("kx")
    release = json.loads(subprocess.run([sys.executable, "-m", "kvmsplit", "kernel", "build", "--json"],
                                        capture_output=True, text=True, check=True).stdout)["release"]
    box.comes_back_as = release
    inv = lab.inventory(tmp_path / "boxes.toml", [box], kx=box_settings("kx", tmp_path))
    out = tmp_path / "out"
    r = subprocess.run([sys.executable, "-m", "kvmsplit", "series", "--remote", "kx", "--inventory", str(inv),
                        "--boot-deadline", "60", "--repeat", "3", "--output", str(out),
                        "--db", str(tmp_path / "h.db"), str(mbx),
                        "--", "--scenario", str(SUITE), "-k", "one"],
                       capture_output=True, text=True, timeout=1500)
    assert r.returncode == 0, r.stdout + r.stderr[-4000:]
    assert "the series introduces nothing new" in r.stdout
    # three repeats a side: phase times are judged (3 vs 3 can never reach p < 0.01: nothing regresses)
    assert "phase-time regressions beyond noise, against earlier runs on" in r.stdout
    assert "not enough samples" not in r.stdout, r.stdout
    assert box.reboots == 6
    loads = [ln for ln in box.shim_log.read_text().splitlines() if ln.startswith("kexec -l")]
    assert loads == ["kexec -l boot/bzImage --reuse-cmdline"] * 6
    for step in ("base", "base-2", "base-3", "patch-02", "patch-02-2", "patch-02-3"):
        res = json.loads((out / "default" / step / "results.json").read_text())
        assert res["host"]["remote"]["box"] == "kx" and res["host"]["booted"]["release"] == release
        assert [(s["name"], s["verdict"]) for s in res["scenarios"]] == [("one", "PASS")]
    keys = [json.loads((out / "default" / s / "results.json").read_text())["host"]["kernel_under_test"]["key"]
            for s in ("base", "patch-02")]
    assert keys[0] != keys[1]


def test_a_matrix_boots_the_box_once_per_combination_with_its_parameters(kernel_612, lab, tmp_path):
    base = subprocess.run(["git", "-C", str(TREE), "rev-parse", "kvmsplit-base"], capture_output=True,
                          text=True).stdout.strip()
    doc = subprocess.run(["git", "-C", str(TREE), "show", f"kvmsplit-base:{DOC}"], capture_output=True,
                         text=True).stdout.splitlines()
    mbx = series_mbox(tmp_path / "series.mbx", base, doc)
    box = lab.box("mx")
    box.comes_back_as = json.loads(subprocess.run([sys.executable, "-m", "kvmsplit", "kernel", "build", "--json"],
                                                  capture_output=True, text=True, check=True).stdout)["release"]
    inv = lab.inventory(tmp_path / "boxes.toml", [box], mx=box_settings("mx", tmp_path))
    out = tmp_path / "out"
    r = subprocess.run([sys.executable, "-m", "kvmsplit", "series", "--remote", "mx", "--inventory", str(inv),
                        "--boot-deadline", "60", "--matrix", "kvm.eager_page_split=0,1", "--output", str(out),
                        "--db", str(tmp_path / "h.db"), str(mbx), "--", "--scenario", str(SUITE), "-k", "one"],
                       capture_output=True, text=True, timeout=1500)
    assert r.returncode == 0, r.stdout + r.stderr[-4000:]
    loads = [ln for ln in box.shim_log.read_text().splitlines() if ln.startswith("kexec -l")]
    assert loads == ["kexec -l boot/bzImage --append=kvm.eager_page_split=0"] * 2 + \
        ["kexec -l boot/bzImage --append=kvm.eager_page_split=1"] * 2
    assert "== eager_page_split=0 (--append 'kvm.eager_page_split=0')" in r.stdout
    assert "== eager_page_split=1 (--append 'kvm.eager_page_split=1')" in r.stdout
    data = json.loads((out / "series.json").read_text())
    assert [c["append"] for c in data["combinations"]] == ["kvm.eager_page_split=0", "kvm.eager_page_split=1"]
    res = json.loads((out / "eager_page_split=1" / "patch-02" / "results.json").read_text())
    assert res["host"]["kernel_under_test"]["append"] == "kvm.eager_page_split=1"
