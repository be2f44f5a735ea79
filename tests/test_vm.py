"""`kvmsplit vm`: a real kernel under test (Debian's, from linux-image-amd64)
booted with virtme-ng, kvmsplit run inside it, results brought out. On a host
without vmx/svm this is TCG with SVM+NPT emulated: a real TDP MMU, so eager
splits are expected and must be seen. Also the VM's own failures: a real
kernel panic, a timeout, a kernel that does not boot."""
import glob
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from conftest import need

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def kernel():
    need(shutil.which("qemu-system-x86_64") is not None, "qemu-system-x86 not installed")
    need(shutil.which("busybox") is not None, "busybox not installed (virtme-ng needs it)")
    need(shutil.which("vng", path=os.path.dirname(sys.executable)) or shutil.which("vng"),
         "virtme-ng not installed")
    images = sorted(glob.glob("/boot/vmlinuz-*"))
    need(bool(images), "no kernel in /boot (apt-get install linux-image-amd64)")
    return images[-1]


def vm(*args, timeout=600, tmpdir=None):
    env = {**os.environ, "TMPDIR": str(tmpdir)} if tmpdir else None
    return subprocess.run([sys.executable, "-m", "kvmsplit", "vm", *args], capture_output=True, text=True,
                          timeout=timeout, env=env)


@pytest.fixture
def vm_tmp(tmp_path):
    """The TMPDIR a `kvmsplit vm` gets, to see what it leaves there."""
    (tmp_path / "tmp").mkdir()
    return tmp_path / "tmp"


def left_in(tmpdir):
    """What a killed VM left in the temporary folder: virtme-ng's own files
    (virtme_ret*) are removed at its exit, which a SIGKILL never reaches."""
    return sorted(p.name for p in tmpdir.iterdir())


def results(d):
    return json.loads((d / "results.json").read_text())


def no_qemu_left():
    out = subprocess.run(["pgrep", "-f", "qemu-system"], capture_output=True, text=True).stdout.split()
    live = [p for p in out if os.path.exists(f"/proc/{p}") and "Z" not in open(f"/proc/{p}/stat").read().split()[2]]
    return not live


def test_eager_split_seen_in_the_kernel_under_test(kernel, tmp_path):
    r = vm("--kernel", kernel, "--db", str(tmp_path / "h.sqlite"), "--",
           "kvmsplit", "run", "-k", "hugetlb-2m/2m/bitmap", "-k", "thp/2m/manual-init-set",
           "--output", str(tmp_path / "out"))
    assert r.returncode == 0, r.stderr[-3000:]
    res = results(tmp_path / "out")
    v = res["host"]["vm"]
    assert v["state"] == "done" and v["release"] == res["host"]["kernel"]["release"]
    assert v["image"] == os.path.realpath(kernel) and len(v["sha256"]) == 64
    by_name = {s["name"]: s for s in res["scenarios"]}
    assert all(s["verdict"] == "PASS" for s in by_name.values())
    if res["host"]["virtualization"]["paging"] == "tdp" and res["host"]["eager_page_split"]["value"]:
        assert by_name["hugetlb-2m/2m/bitmap"]["observed_split"] == "eager@enable"
        assert by_name["thp/2m/manual-init-set"]["observed_split"] == "eager@first-clear"
    for name in ("results.ktap", "junit.xml", "kcidb.json"):
        assert (tmp_path / "out" / name).exists()
    # recorded in the host's history, not only in the VM's throwaway one
    h = subprocess.run([sys.executable, "-m", "kvmsplit", "history", "--db", str(tmp_path / "h.sqlite")],
                       capture_output=True, text=True)
    assert v["release"] in h.stdout
    assert no_qemu_left()


def test_kernel_panic_is_an_error_with_the_console(kernel, tmp_path, vm_tmp):
    r = vm("--kernel", kernel, "--inject-panic-after", "1", "--",
           "kvmsplit", "run", "-k", "thp/2m/bitmap", "-o", str(tmp_path / "out"), tmpdir=vm_tmp)
    assert r.returncode == 1
    res = results(tmp_path / "out")
    bad = [s for s in res["scenarios"] if s["verdict"] == "ERROR"]
    assert len(bad) == 1 and bad[0]["reasons"][0].startswith("kernel under test panicked: Kernel panic")
    assert "sysrq triggered crash" in bad[0]["reasons"][0]
    assert any("sysrq_handle_crash" in line for line in bad[0]["console_tail"])
    assert [r["type"] for r in bad[0]["kernel_log"]["reports"]] == ["PANIC"]
    assert res["host"]["vm"]["state"] == "panic"
    assert res["host"]["vm"]["boot_attempts"] == 1, "a panic after the command started is not retried"
    assert no_qemu_left()
    assert left_in(vm_tmp) == []


def test_timeout_kills_the_vm(kernel, tmp_path, vm_tmp):
    r = vm("--kernel", kernel, "--timeout", "4", "--", "kvmsplit", "run", "-o", str(tmp_path / "out"),
           tmpdir=vm_tmp)
    assert r.returncode == 1
    res = results(tmp_path / "out")
    assert res["scenarios"][-1]["verdict"] in ("ERROR", "MISS")
    assert "timed out after 4s" in res["scenarios"][-1]["reasons"][0]
    assert no_qemu_left()
    assert left_in(vm_tmp) == []


def test_a_kernel_that_does_not_boot_is_a_miss(kernel, tmp_path):
    bogus = tmp_path / "vmlinuz-bogus"
    bogus.write_bytes(os.urandom(4096))
    r = vm("--kernel", str(bogus), "--timeout", "120", "--", "kvmsplit", "run", "-o", str(tmp_path / "o"))
    assert r.returncode == 1
    res = results(tmp_path / "o")
    assert res["scenarios"][-1]["verdict"] == "MISS"
    assert res["scenarios"][-1]["reasons"][0].startswith("VM did not boot")
    assert res["scenarios"][-1]["console_tail"], "the console lines say why"
    assert res["host"]["vm"]["boot_attempts"] == 2, "a boot failure is retried once"
    assert no_qemu_left()


def test_vm_usage_errors(kernel, tmp_path):
    r = vm("--", "kvmsplit", "run")
    assert r.returncode == 64 and "exactly one of --kernel" in r.stderr
    r = vm("--kernel", str(tmp_path / "nope"), "--", "kvmsplit", "run")
    assert r.returncode == 66 and "no such kernel image" in r.stderr
    # virtme-ng takes '=' and ',' in a shared folder's path for syntax: every run there was a MISS
    for bad in ("eager_page_split=0", "a,b", "a b"):
        r = vm("--kernel", kernel, "--", "kvmsplit", "run", "-o", str(tmp_path / bad))
        assert r.returncode == 64 and "cannot be shared with the VM" in r.stderr, r.stderr
        assert len(r.stderr.splitlines()) == 1 and not (tmp_path / bad).exists()


def test_a_sigterm_while_the_vm_boots_leaves_no_vm_and_no_files(kernel, tmp_path, vm_tmp):
    """A CI job's timeout sends SIGTERM: the VM goes with kvmsplit, and so do virtme-ng's
    temporary files, which its own exit handlers never get to remove (seen for real: a
    virtme_ret* file left in /tmp per killed run)."""
    p = subprocess.Popen([sys.executable, "-m", "kvmsplit", "vm", "--kernel", kernel, "--",
                          "kvmsplit", "run", "-k", "thp/2m/bitmap", "-o", str(tmp_path / "out")],
                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                         env={**os.environ, "TMPDIR": str(vm_tmp)})
    try:
        deadline = time.monotonic() + 120
        while not list(vm_tmp.rglob("virtme_ret*")):    # vng has made its files
            assert p.poll() is None and time.monotonic() < deadline, p.stderr.read()
            time.sleep(0.2)
        time.sleep(1)
        p.send_signal(signal.SIGTERM)
        rest = p.communicate(timeout=60)[1]
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    assert p.returncode == 130, rest
    assert "Traceback" not in rest
    assert no_qemu_left()
    assert left_in(vm_tmp) == []


def test_a_python_in_a_folder_the_vm_hides_is_shared_with_it(kernel, tmp_path):
    """virtme-init mounts a fresh tmpfs over /var/tmp (and /run, /var/cache, ...): a checkout
    or a venv there was invisible inside, the command found no Python, and the run came back
    "done" with no scenarios (seen for real: CI from a clone in /var/tmp). Here the venv is
    reached through a symlink in /var/tmp, so the VM must see it under the link's name."""
    link = Path(tempfile.mkdtemp(dir="/var/tmp", prefix="kvmsplit-test-"))
    try:
        (link / "venv").symlink_to(Path(sys.prefix))
        python = link / "venv" / "bin" / Path(sys.executable).name
        r = subprocess.run([str(python), "-m", "kvmsplit", "vm", "--kernel", kernel, "--",
                            "kvmsplit", "run", "-k", "anon/4k/bitmap", "-o", str(tmp_path / "out")],
                           capture_output=True, text=True, timeout=600)
    finally:
        shutil.rmtree(link)
    res = results(tmp_path / "out")
    assert [(s["name"], s["verdict"]) for s in res["scenarios"]] == [("anon/4k/bitmap", "PASS")], r.stderr[-3000:]
    assert r.returncode == 0 and res["host"]["vm"]["state"] == "done"


@pytest.mark.parametrize("command, writes", [(["kvmsplit", "run"], True), ([], True),
                                             (["kvmsplit", "selftests", "run"], True),
                                             (["kvmsplit", "probe"], False)])
def test_a_command_that_should_write_results_and_wrote_none_is_an_error(kernel, tmp_path, command, writes):
    """The VM ran its command to the end ("done"), and the results are not there: an ERROR
    with the exit code, never an empty green run. A command that writes no results is fine."""
    from kvmsplit.kernel import vm as virtme
    from kvmsplit.runs.results import Verdict
    assert ("--output" in virtme._inner_command(command, tmp_path)) == writes   # told where, if it writes
    out = virtme.VmOutcome(virtme.VmState.DONE, 127, "r", ["sh: python: not found"], booted=True,
                           wants_results=virtme.writes_results(command))
    rr = virtme.record(out, virtme.KernelUnderTest.resolve(kernel, None), virtme.choose_accel("tcg"), tmp_path,
                       ["kvmsplit", "vm", "--", *command])
    if writes:
        assert [(s.name, s.verdict) for s in rr.scenarios] == [("vm", Verdict.ERROR)]
        assert rr.scenarios[0].reasons == ["the command in the VM exited 127 and wrote no results.json"]
        assert rr.scenarios[0].console_tail == ["sh: python: not found"]
    else:
        assert rr.scenarios == []
    assert results(tmp_path)["host"]["vm"]["state"] == "done"
