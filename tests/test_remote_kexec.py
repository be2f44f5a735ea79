"""`kvmsplit remote boot` with a real kexec (tests/remote/kexecvm.py): a
virtme-ng VM running the 6.12 kernel under test and a real sshd, switched
by the real CLI with kexec-tools' `kexec -l --reuse-cmdline` and `kexec -e`,
and read back over SSH once the new kernel's sshd answers.

One VM serves both cases (its first boot is the slow part): a switch that
comes back on the expected release is BOOTED; one told to expect another
release comes back all the same, on the image's own, and that is
WRONG_KERNEL. Each case checks on its own (over a plain paramiko
connection, and on the VM's console) that a new kernel really started."""
from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import need
from kvmsplit.remote.boot import image_release
from remote.kexecvm import KEXEC, SSHD, KexecVM, vng_path

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]
DEADLINE_S = 150          # a kexec'd boot takes 15-40 s under TCG on a loaded 2-core machine


@pytest.fixture(scope="module")
def vm(kernel_612, tmp_path_factory):
    for path, package in ((KEXEC, "kexec-tools"), (SSHD, "openssh-server")):
        need(Path(path).exists(), f"{path} not installed (apt-get install {package})")
    need(vng_path() is not None, "vng (virtme-ng) not installed")
    vm = KexecVM(Path(kernel_612), tmp_path_factory.mktemp("kexecvm"))
    try:
        vm.start()
        yield vm
    finally:
        left = vm.close()
    assert not left, f"still running after the VM was closed: {left}"


@pytest.fixture
def box(vm, tmp_path):
    """The VM in an inventory of its own: (inventory, the state dirs the CLI gets)."""
    inv = vm.inventory(tmp_path / "boxes.toml", "kx", vm.known_hosts(tmp_path / "known_hosts"))
    env = {**os.environ, "KVMSPLIT_CACHE_DIR": str(tmp_path / "cache"), "KVMSPLIT_DATA_DIR": str(tmp_path / "data")}
    return inv, env


def remote_boot(inv: Path, env: dict, image: str, *args: str) -> tuple[subprocess.CompletedProcess, float]:
    t0 = time.monotonic()
    r = subprocess.run([sys.executable, "-m", "kvmsplit", "remote", "boot", "--inventory", str(inv), "kx",
                        "--kernel", image, "--deadline", str(DEADLINE_S), "--connect-timeout", "10", *args],
                       capture_output=True, text=True, env=env, timeout=DEADLINE_S + 240)
    return r, time.monotonic() - t0


def switched(vm: KexecVM, before: tuple[str, str], starts: int, kexecs: int) -> tuple[str, str]:
    """The VM really ran a new kernel: one more kexec hand-over and sshd start on its
    console, and a new boot_id when asked directly. Its (boot_id, release) now."""
    after = vm.boot()
    assert after[0] != before[0]
    assert (vm.kexecs(), vm.sshd_starts()) == (kexecs + 1, starts + 1), vm.tail()
    return after


def test_a_real_kexec_comes_back_booted_with_a_new_boot_id(vm, box, kernel_612):
    inv, env = box
    before, starts, kexecs = vm.boot(), vm.sshd_starts(), vm.kexecs()
    release = image_release(Path(kernel_612))
    assert before[1] == release        # the VM runs the image the switch loads again
    r, wall = remote_boot(inv, env, kernel_612)
    assert r.returncode == 0, r.stdout + r.stderr + vm.tail()
    after = switched(vm, before, starts, kexecs)
    assert after[1] == release
    assert f"kx: booted {release} (boot_id {before[0][:8]} -> {after[0][:8]})" in r.stdout
    assert "kx: no --initrd" in r.stderr
    print(f"remote boot (kexec, BOOTED): {wall:.0f}s")


def test_a_box_that_comes_back_on_another_release_is_a_wrong_kernel(vm, box, kernel_612):
    inv, env = box
    before, starts, kexecs = vm.boot(), vm.sshd_starts(), vm.kexecs()
    r, wall = remote_boot(inv, env, kernel_612, "--release", "6.12.0-not-this-one")
    assert r.returncode == 1, r.stdout + r.stderr + vm.tail()
    after = switched(vm, before, starts, kexecs)
    assert (f"kx: WRONG KERNEL: came back on {after[1]}, expected 6.12.0-not-this-one" in r.stdout), r.stdout
    print(f"remote boot (kexec, WRONG_KERNEL): {wall:.0f}s")

