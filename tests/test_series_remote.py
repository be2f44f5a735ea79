"""`kvmsplit series --remote BOX`: the base and patched kernels go to a box
(a real sshd, tests/remote/sshboxes.py), which is switched to each with
kexec and waited for (a new boot_id and the image's release: emulated, as
no real reboot can happen here), and the suite runs there each time. The
box's kvmsplit runs on this machine's kernel, so the two runs agree: the
plumbing is what is tested (a switch with the right image before every
run, each kernel run three times, the runs fetched and compared with phase
times judged over the repeats, one summary), not the kernels.

A --matrix boots the box once per kernel and combination when a parameter
is read-only there (this host's kvm parameters all are), and once per
kernel when they are writable: the other combinations are writes, put back
after each run, failed or not (the box sees a parameters directory of the
test's own, with eager_page_split writable)."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

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


def series_on_a_box(lab, tmp_path, name: str, **box_opts):
    """The two-patch series' mbox, and a box (with its inventory) that comes back on the kernel built
    from it."""
    base = subprocess.run(["git", "-C", str(TREE), "rev-parse", "kvmsplit-base"], capture_output=True,
                          text=True).stdout.strip()
    doc = subprocess.run(["git", "-C", str(TREE), "show", f"kvmsplit-base:{DOC}"], capture_output=True,
                         text=True).stdout.splitlines()
    mbx = series_mbox(tmp_path / "series.mbx", base, doc)
    box = lab.box(name, **box_opts)
    box.comes_back_as = json.loads(subprocess.run([sys.executable, "-m", "kvmsplit", "kernel", "build", "--json"],
                                                  capture_output=True, text=True, check=True).stdout)["release"]
    inv = lab.inventory(tmp_path / "boxes.toml", [box], **{name: box_settings(name, tmp_path)})
    return mbx, box, inv


def test_a_matrix_boots_the_box_once_per_combination_with_its_parameters(kernel_612, lab, tmp_path):
    mbx, box, inv = series_on_a_box(lab, tmp_path, "mx")
    out = tmp_path / "out"
    r = subprocess.run([sys.executable, "-m", "kvmsplit", "series", "--remote", "mx", "--inventory", str(inv),
                        "--boot-deadline", "60", "--matrix", "kvm.eager_page_split=0,1", "--output", str(out),
                        "--db", str(tmp_path / "h.db"), str(mbx), "--", "--scenario", str(SUITE), "-k", "one"],
                       capture_output=True, text=True, timeout=1500)
    assert r.returncode == 0, r.stdout + r.stderr[-4000:]
    loads = [ln for ln in box.shim_log.read_text().splitlines() if ln.startswith("kexec -l")]
    # kernel by kernel, each combination a boot: eager_page_split is read-only here
    assert loads == ["kexec -l boot/bzImage --append=kvm.eager_page_split=0",
                     "kexec -l boot/bzImage --append=kvm.eager_page_split=1"] * 2
    assert r.stderr.count("mx: kvm.eager_page_split is read-only (/sys/module/kvm/parameters/eager_page_split): "
                          "booting with 'kvm.eager_page_split=1'") == 2, r.stderr[-4000:]
    assert "instead of booting" not in r.stderr
    assert "== eager_page_split=0 (--append 'kvm.eager_page_split=0')" in r.stdout
    assert "== eager_page_split=1 (--append 'kvm.eager_page_split=1')" in r.stdout
    data = json.loads((out / "series.json").read_text())
    assert [c["append"] for c in data["combinations"]] == ["kvm.eager_page_split=0", "kvm.eager_page_split=1"]
    res = json.loads((out / "eager_page_split-1" / "patch-02" / "results.json").read_text())
    assert res["host"]["kernel_under_test"]["append"] == "kvm.eager_page_split=1"
    assert res["host"]["module_params"] == {"values": "kvm.eager_page_split=1", "how": "boot"}


def kvm_params_copy(where: Path) -> Path:
    """kvm's parameters as a box is to see them: this host's values, read-only,
    but for eager_page_split: writable, and N (what the first boot asks for)."""
    where.mkdir()
    for f in Path("/sys/module/kvm/parameters").iterdir():
        try:
            (where / f.name).write_text(f.read_text())
        except OSError:
            continue
        (where / f.name).chmod(0o444)
    (where / "eager_page_split").chmod(0o644)
    (where / "eager_page_split").write_text("N\n")
    return where


def test_a_matrix_writes_a_writable_parameter_instead_of_booting_and_puts_it_back(kernel_612, lab, tmp_path):
    params = kvm_params_copy(tmp_path / "kvm-params")
    mbx, box, inv = series_on_a_box(lab, tmp_path, "pw", binds={"/sys/module/kvm/parameters": params})
    out = tmp_path / "out"
    # every run fails (its guest "hangs" in a 10 ms phase): the parameter is put back all the same
    r = subprocess.run([sys.executable, "-m", "kvmsplit", "series", "--remote", "pw", "--inventory", str(inv),
                        "--boot-deadline", "60", "--matrix", "kvm.eager_page_split=N,Y", "--output", str(out),
                        "--db", str(tmp_path / "h.db"), str(mbx),
                        "--", "--scenario", str(SUITE), "-k", "one", "--phase-timeout", "0.01"],
                       capture_output=True, text=True, timeout=1500)
    assert r.returncode in (0, 1) and "Traceback" not in r.stderr, r.stdout + r.stderr[-4000:]
    loads = [ln for ln in box.shim_log.read_text().splitlines() if ln.startswith("kexec -l")]
    assert loads == ["kexec -l boot/bzImage --append=kvm.eager_page_split=N"] * 2, loads   # one boot a kernel
    assert box.reboots == 2
    assert r.stderr.count("pw: wrote kvm.eager_page_split=Y (was N) instead of booting") == 2, r.stderr[-4000:]
    assert r.stderr.count("pw: put back kvm.eager_page_split=N") == 2
    assert (params / "eager_page_split").read_text() == "N\n"
    for combo, seen, how in (("eager_page_split-N", "N", "boot"), ("eager_page_split-Y", "Y", "written")):
        for step in ("base", "patch-02"):
            res = json.loads((out / combo / step / "results.json").read_text())
            assert res["host"]["eager_page_split"]["raw"] == seen, (combo, step)       # what the run saw
            assert res["host"]["module_params"]["how"] == how
            assert [(s["name"], s["verdict"]) for s in res["scenarios"]] == [("one", "ERROR")]
