"""The command line as a user meets it: real subprocesses, real exit codes."""
import json
import os
import subprocess
import sys

import pytest

from kvmsplit.errors import EXIT_NO_KVM, EXIT_UNAVAILABLE, EXIT_USAGE


def kvmsplit(*args, env=None, **kw):
    return subprocess.run([sys.executable, "-m", "kvmsplit", *args], capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, **kw)


def _opens_for_write(path):
    """sysfs refuses to open a 0444 parameter for writing, even for root."""
    try:
        os.close(os.open(path, os.O_WRONLY))
    except PermissionError:
        return False
    return True


@pytest.mark.kvm
def test_probe_json_shows_the_true_kvm_params():
    r = kvmsplit("probe", "--json")
    assert r.returncode == 0, r.stderr
    f = json.loads(r.stdout)
    for name in ("tdp_mmu", "eager_page_split", "nx_huge_pages"):
        want = open(f"/sys/module/kvm/parameters/{name}").read().strip() == "Y"
        assert f[name]["value"] is want
        assert f[name]["writable"] is _opens_for_write(f"/sys/module/kvm/parameters/{name}")
    assert f["kvm"]["api_version"] == 12
    assert set(f["kvm"]["capabilities"]) >= {"MANUAL_DIRTY_LOG_PROTECT2", "DIRTY_LOG_RING",
                                            "DIRTY_LOG_RING_ACQ_REL", "BINARY_STATS_FD",
                                            "USER_MEMORY2", "GUEST_MEMFD", "NR_VCPUS", "MAX_VCPUS"}
    assert f["taint"]["value"] == int(open("/proc/sys/kernel/tainted").read())


@pytest.mark.kvm
def test_probe_table():
    r = kvmsplit("probe")
    assert r.returncode == 0 and "kvm.eager_page_split" in r.stdout and "taint" in r.stdout


def test_missing_dev_kvm_is_one_line_and_exit_2():
    r = kvmsplit("probe", env={"KVMSPLIT_DEV_KVM": "/nonexistent/kvm"})
    assert r.returncode == EXIT_NO_KVM
    assert r.stderr.count("\n") == 1 and "does not exist" in r.stderr and "Traceback" not in r.stderr


def test_usage_error_exit_code():
    r = kvmsplit("run", "--expect", "sideways")
    assert r.returncode == EXIT_USAGE and "Traceback" not in r.stderr


@pytest.mark.kvm
def test_more_memory_than_the_host_has_is_refused_up_front(tmp_path):
    f = tmp_path / "big.toml"
    f.write_text('[[scenario]]\nname = "huge"\nsize = "256G"\n')
    r = kvmsplit("run", "--scenario", str(f), "-o", str(tmp_path / "out"))
    assert r.returncode == EXIT_UNAVAILABLE
    assert "needs 256G of guest memory but this host has" in r.stderr and r.stderr.count("\n") == 1
    assert not (tmp_path / "out").exists()


@pytest.mark.kvm
def test_run_writes_results_and_exits_0(tmp_path):
    r = kvmsplit("run", "-k", "hugetlb-2m/2m/bitmap", "-k", "thp/4k/ring-acq-rel", "-o", str(tmp_path))
    assert r.returncode == 0, r.stdout + r.stderr
    res = json.loads((tmp_path / "results.json").read_text())
    names = {s["name"]: s for s in res["scenarios"]}
    assert set(names) == {"hugetlb-2m/2m/bitmap", "thp/4k/ring-acq-rel"}
    assert all(s["verdict"] == "PASS" for s in names.values())
    assert res["host"]["eager_page_split"]["value"] in (True, False)
    assert "split observed" in r.stdout


@pytest.mark.kvm
def test_sigint_keeps_finished_results_and_restores_host(tmp_path):
    """Ctrl-C in the middle: exit 130, finished scenarios kept, the one in
    flight recorded as ERROR, the rest MISS, hugetlb pool as before."""
    import signal
    import time

    pool = "/sys/kernel/mm/hugepages/hugepages-2048kB/nr_hugepages"
    before = open(pool).read()
    p = subprocess.Popen([sys.executable, "-m", "kvmsplit", "run", "-v", "-k", "hugetlb-2m/", "-o",
                          str(tmp_path), "--inject-hang", "dirty-2", "--phase-timeout", "60"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    for line in p.stderr:     # -v: a line as each phase starts
        if line.rstrip().endswith(": dirty-2"):
            break
    time.sleep(0.5)           # the guest is now spinning instead of answering
    p.send_signal(signal.SIGINT)
    out, err = p.communicate(timeout=30)
    assert p.returncode == 130, err
    data = json.loads((tmp_path / "results.json").read_text())
    verdicts = [s["verdict"] for s in data["scenarios"]]
    assert data["interrupted"] and verdicts[0] == "ERROR" and set(verdicts[1:]) == {"MISS"}
    assert "interrupted in phase dirty-2" in data["scenarios"][0]["reasons"][0]
    assert open(pool).read() == before


def test_kernellog_scans_a_saved_log(tmp_path):
    log = tmp_path / "console.log"
    log.write_text("[    1.0] Speculative Return Stack Overflow: WARNING: See https://kernel.org/doc/html/"
                   "latest/admin-guide/hw-vuln/srso.html for mitigation options.\n"
                   "[    2.0] ------------[ cut here ]------------\n"
                   "[    2.0] WARNING: CPU: 1 PID: 103 at arch/x86/kvm/mmu/tdp_mmu.c:1366 "
                   "tdp_mmu_split_huge_page+0x12c/0x150\n"
                   "[    2.1] Call Trace:\n[    2.1]  <TASK>\n"
                   "[    2.1]  kvm_mmu_slot_try_split_huge_pages+0x4b/0x80\n"
                   "[    2.1]  kvm_arch_commit_memory_region+0x1c0/0x2c0\n"
                   "[    2.1]  </TASK>\n[    2.2] ---[ end trace 0000000000000000 ]---\n")
    r = kvmsplit("kernellog", str(log), "--json")
    assert r.returncode == 1      # reports found
    reports = json.loads(r.stdout)
    assert [x["title"] for x in reports] == ["WARNING in tdp_mmu_split_huge_page"]


def test_kernellog_malformed_kmsg_is_one_line_exit_65(tmp_path):
    bad = tmp_path / "kmsg.txt"
    bad.write_text("6,100,5000,-;fine\n6,oops,5001,-;broken\n")
    r = kvmsplit("kernellog", str(bad))
    assert r.returncode == 65 and "line 2" in r.stderr and r.stderr.count("\n") == 1
