"""Real selftests on the real /dev/kvm, through the runner and the command
line, into the same results.json as `kvmsplit run`."""
import json
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import pytest

from conftest import need
from kvmsplit.errors import EXIT_BAD_INPUT, EXIT_FAILED, EXIT_INTERRUPTED, EXIT_OK
from kvmsplit.runs.results import RunResult
from kvmsplit.selftests.manifest import SelftestCase, load

from .conftest import DATA

SUBSET = ["dirty_log_test/-M dirty-log", "dirty_log_perf_test/-s anonymous -v 1",
          "dirty_log_page_splitting_test", "kvm_binary_stats_test"]


def running(binary: Path) -> list[int]:
    """Processes whose executable is `binary`."""
    out = []
    for d in os.listdir("/proc"):
        try:
            if d.isdigit() and os.readlink(f"/proc/{d}/exe") == str(binary):
                out.append(int(d))
        except OSError:
            pass
    return out


@pytest.fixture(scope="module")
def subset_run(selftests_build, facts, tmp_path_factory):
    from kvmsplit.selftests.runner import run_selftests
    cases = [c for c in load() if c.name in SUBSET]
    out = tmp_path_factory.mktemp("selftests")
    return run_selftests(cases, selftests_build, facts, out, argv=["test"]), out


@pytest.mark.kvm
def test_results_json_in_the_run_model(subset_run):
    rr, out = subset_run
    doc = json.loads((out / "results.json").read_text())
    assert [s["name"] for s in doc["scenarios"]] == SUBSET
    assert doc["host"]["kvm"]["api_version"] == 12 and doc["finished"]
    assert RunResult.__dataclass_fields__.keys() <= doc.keys()
    for s in doc["scenarios"]:
        assert s["scenario"]["kind"] == "kselftest"
        assert s["verdict"] in ("PASS", "SKIP"), (s["name"], s["reasons"], s["extra"].get("stdout_tail"))
        if s["verdict"] == "PASS":
            assert (out / s["extra"]["log"]).is_file()
            assert any(c["name"] == "kernel-log" for c in s["checks"])


@pytest.mark.kvm
def test_dirty_log_perf_test_phases(subset_run):
    rr, _ = subset_run
    perf = next(s for s in rr.scenarios if s.name == "dirty_log_perf_test/-s anonymous -v 1")
    assert perf.verdict == "PASS"
    assert [p.name for p in perf.phases] == ["populate", "enable", "dirty-1", "get-dirty-log-1",
                                             "clear-dirty-log-1", "dirty-2", "get-dirty-log-2",
                                             "clear-dirty-log-2", "disable"]
    assert all(p.duration_s > 0 for p in perf.phases)
    assert perf.extra["exit_code"] == 0 and perf.extra["command"][1:] == \
        ["-i", "2", "-b", "32M", "-s", "anonymous", "-v", "1"]


@pytest.mark.kvm
def test_page_splitting_test_skips_with_its_reason_without_the_tdp_mmu(subset_run, facts):
    rr, _ = subset_run
    split = next(s for s in rr.scenarios if s.name == "dirty_log_page_splitting_test")
    if facts.param("tdp_mmu"):
        assert split.verdict == "PASS", split.reasons
    else:
        assert (split.verdict, split.reasons) == ("SKIP", ['Requirement not met: get_kvm_param_bool("tdp_mmu")'])
        assert split.extra["exit_code"] == 4
        assert split.extra["ktap"]["plan"] == 0


@pytest.mark.kvm
def test_timeout_kills_the_whole_process_group(selftests_build, facts, tmp_path):
    from kvmsplit.selftests.runner import run_selftests
    # hardware_disable_test forks hundreds of children and runs for minutes
    case = SelftestCase("hardware_disable_test", "hardware_disable_test", [], 1.0)
    rr = run_selftests([case], selftests_build, facts, tmp_path, argv=["test"])
    r = rr.scenarios[0]
    assert (r.verdict, r.reasons) == ("ERROR", ["timed out after 1 s; its process group was killed"])
    assert r.extra["timed_out"] and r.extra["exit_code"] is None
    assert running(selftests_build.binary("hardware_disable_test")) == []
    assert not rr.ok


def kvmsplit(*args, **kw):
    return subprocess.run([sys.executable, "-m", "kvmsplit", *args], capture_output=True, text=True, **kw)


@pytest.mark.kvm
def test_cli_run_exit_0_and_results_json_in_output(selftests_build, tmp_path):
    r = kvmsplit("selftests", "run", "-k", "kvm_binary_stats_test", "-k", "vmx_dirty_log_test",
                 "--output", str(tmp_path))
    assert r.returncode == EXIT_OK, r.stderr
    doc = json.loads((tmp_path / "results.json").read_text())
    assert {s["name"]: s["verdict"] for s in doc["scenarios"]}["kvm_binary_stats_test"] == "PASS"
    assert "kvm_binary_stats_test" in r.stdout


@pytest.mark.kvm
def test_cli_run_exit_1_on_an_assertion_failure(selftests_build, tmp_path):
    m = tmp_path / "m.toml"
    m.write_text('[[test]]\ntest = "dirty_log_test"\nargs = ["-M", "dirty-log", "-i", "2"]\ntimeout = 30\n')
    r = kvmsplit("selftests", "run", "--manifest", str(m), "--output", str(tmp_path / "out"))
    assert r.returncode == EXIT_FAILED, r.stderr
    res = json.loads((tmp_path / "out" / "results.json").read_text())["scenarios"][0]
    assert res["verdict"] == "FAIL"
    assert res["extra"]["assertion"]["expression"] == "p.iterations > 2"
    assert res["reasons"] == ["assertion failed at dirty_log_test.c:911: p.iterations > 2 in main(): "
                              "Iterations must be greater than two"]


@pytest.mark.kvm
def test_interrupt_keeps_finished_results_and_kills_the_test(selftests_build, tmp_path):
    m = tmp_path / "m.toml"
    m.write_text('[defaults]\ntimeout = 60\n'
                 '[[test]]\ntest = "kvm_binary_stats_test"\n'
                 '[[test]]\ntest = "hardware_disable_test"\n'          # runs for minutes
                 '[[test]]\ntest = "kvm_binary_stats_test"\nargs = []\n[test.matrix]\n"-h" = [true]\n')
    out = tmp_path / "out"
    p = subprocess.Popen([sys.executable, "-m", "kvmsplit", "selftests", "run", "--manifest", str(m),
                          "--output", str(out)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        while not running(selftests_build.binary("hardware_disable_test")):
            assert time.monotonic() < deadline and p.poll() is None, "hardware_disable_test never started"
            time.sleep(0.05)
        p.send_signal(signal.SIGINT)
        _, err = p.communicate(timeout=30)
    finally:
        p.kill()
    assert p.returncode == EXIT_INTERRUPTED, err
    doc = json.loads((out / "results.json").read_text())
    assert doc["interrupted"]
    assert [(s["verdict"], s["reasons"]) for s in doc["scenarios"]] == \
        [("PASS", doc["scenarios"][0]["reasons"]), ("ERROR", ["interrupted"]), ("MISS", [])]
    assert running(selftests_build.binary("hardware_disable_test")) == []


@pytest.mark.kvm
def test_a_test_this_kernel_lacks_is_skipped(selftests_build, facts, tmp_path):
    from kvmsplit.selftests.runner import run_selftests
    case = SelftestCase("no_such_test", "x86_64/no_such_test", [], 5.0)
    r = run_selftests([case], selftests_build, facts, tmp_path, argv=["test"]).scenarios[0]
    assert (r.verdict, r.reasons) == ("SKIP", [f"the KVM selftests of {selftests_build.version} "
                                               "have no x86_64/no_such_test"])


def test_cli_parse_a_capture():
    r = kvmsplit("selftests", "parse", str(DATA / "dirty_log_perf_test-hugetlb-1gb-256M.txt"))
    assert r.returncode == EXIT_OK, r.stderr
    doc = json.loads(r.stdout)
    assert doc["assertion"]["errno"] == 22 and doc["phases"][0]["name"] == "populate"


def test_cli_parse_malformed_ktap_is_one_line_with_the_line_number(tmp_path):
    f = tmp_path / "out.txt"
    f.write_text("Random seed: 0x6b8b4567\nTAP version 13\n1..2\nok 1 vm0\nnot ok vm1\n")
    r = kvmsplit("selftests", "parse", str(f))
    assert r.returncode == EXIT_BAD_INPUT
    assert r.stderr == (f"kvmsplit: error: {f}:5: malformed KTAP: "
                        "result line without a test number: 'not ok vm1'\n")


def test_cli_bad_manifest_is_one_line(tmp_path):
    m = tmp_path / "m.toml"
    m.write_text('[[test]]\ntest = "dirty_log_test"\ntimeout = 5\ncolour = "red"\n')
    r = kvmsplit("selftests", "run", "--manifest", str(m), "--output", str(tmp_path / "out"))
    assert r.returncode == EXIT_BAD_INPUT
    assert r.stderr == (f"kvmsplit: error: {m}: test #1: unknown key 'colour' (expected test, about, "
                        "args, matrix, timeout, requires, hugepages)\n")


def test_cli_list():
    r = kvmsplit("selftests", "list", "-k", "dirty_log_perf_test/-n")
    assert r.returncode == EXIT_OK
    lines = r.stdout.splitlines()
    assert [ln.split("  ")[0] for ln in lines] == ["dirty_log_perf_test/-n -v 1", "dirty_log_perf_test/-n -v 2"]
    assert all("requires=vmx_or_svm" in ln for ln in lines)


@pytest.mark.kvm
def test_a_kernel_report_during_a_test_fails_that_test(selftests_build, facts, tmp_path):
    """Lines root writes to /dev/kmsg are user-facility records: with
    accept_user_log the guard counts them, as it would the kernel's own."""
    from kvmsplit.selftests.runner import run_selftests
    need(os.access("/dev/kmsg", os.R_OK | os.W_OK), "/dev/kmsg must be readable and writable")
    marker = uuid.uuid4().hex.translate(str.maketrans("0123456789abcdef", "ghijklmnopqrstuv"))
    binary = selftests_build.binary("hardware_disable_test")

    def warn_while_it_runs():
        deadline = time.monotonic() + 20
        while not running(binary) and time.monotonic() < deadline:
            time.sleep(0.01)
        for line in ("------------[ cut here ]------------",
                     f"WARNING: CPU: 0 PID: 1 at arch/x86/kvm/mmu/mmu.c:1 kvmsplit_{marker}+0x0/0x10 [kvm]",
                     "---[ end trace 0000000000000000 ]---"):
            with open("/dev/kmsg", "w") as f:      # one open per line: /dev/kmsg rate-limits per file
                f.write(f"<4>{line}\n")

    writer = threading.Thread(target=warn_while_it_runs)
    writer.start()
    case = SelftestCase("hardware_disable_test", "hardware_disable_test", [], 2.0)
    rr = run_selftests([case], selftests_build, facts, tmp_path, argv=["test"], accept_user_log=True)
    writer.join()
    r = rr.scenarios[0]
    assert r.verdict == "FAIL"
    assert r.reasons == [f"kernel report: WARNING in kvmsplit_{marker}",
                         "timed out after 2 s; its process group was killed"]
    assert r.kernel_log["reports"][0]["title"] == f"WARNING in kvmsplit_{marker}"
