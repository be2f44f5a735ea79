"""What a CI box acts on: the process exit code of a run, by what the run
found (README: Exit codes), shown on real runs where the real fault can be had."""
import json
import os
import shutil
import subprocess
import sys

import pytest

from conftest import need
from kvmsplit.errors import EXIT_BAD_INPUT, EXIT_FAILED, EXIT_INTERNAL, EXIT_NOTHING_TESTED, EXIT_OK, EXIT_UNCONFIRMED
from kvmsplit.runs.results import RunResult, ScenarioResult

TINY = '[defaults]\nsize = "16M"\npasses = 1\nbacking = "anon"\nguest_page = "4k"\n\n'


def run_with(*verdicts, internal=False, interrupted=False):
    rr = RunResult(host={}, argv=[], kvmsplit_version="test", interrupted=interrupted)
    rr.scenarios = [ScenarioResult(name=f"s{i}", scenario={}, verdict=v, reasons=["why"])
                    for i, v in enumerate(verdicts)]
    if internal:
        rr.scenarios[0].extra["internal_error"] = "Traceback ..."
    return rr


@pytest.mark.parametrize("verdicts, kw, allow, code", [
    (("PASS", "SKIP"), {}, False, EXIT_OK),
    (("PASS", "UNCONFIRMED"), {}, False, EXIT_UNCONFIRMED),
    (("PASS", "UNCONFIRMED"), {}, True, EXIT_OK),
    (("FAIL", "UNCONFIRMED"), {}, True, EXIT_FAILED),
    (("SKIP", "SKIP"), {}, False, EXIT_NOTHING_TESTED),
    (("UNCONFIRMED", "SKIP"), {}, True, EXIT_OK),
    (("PASS", "MISS"), {}, False, EXIT_FAILED),
    (("PASS",), {"interrupted": True}, False, EXIT_FAILED),
    (("ERROR", "FAIL"), {"internal": True}, False, EXIT_INTERNAL),
])
def test_the_worst_finding_decides(verdicts, kw, allow, code):
    assert run_with(*verdicts, **kw).exit_code(allow_unchecked=allow) == code


def kvmsplit(tmp_path, *args, prefix=()):
    return subprocess.run([*prefix, sys.executable, "-m", "kvmsplit", *map(str, args)],
                          capture_output=True, text=True, env={**os.environ})


def scenario_file(tmp_path, body):
    f = tmp_path / "s.toml"
    f.write_text(TINY + body)
    return f


def test_percent_zero_is_refused(tmp_path):
    f = scenario_file(tmp_path, '[[scenario]]\nname = "nothing"\npercent = 0\n')
    r = kvmsplit(tmp_path, "list", "--scenario", f)
    assert r.returncode == EXIT_BAD_INPUT and "percent: must be 1..100" in r.stderr
    assert r.stderr.count("\n") == 1


@pytest.mark.kvm
def test_an_unreadable_kernel_log_is_exit_3_unless_allowed(tmp_path):
    """Real: root without CAP_SYSLOG cannot read /dev/kmsg (dmesg_restrict=1)
    but still drives /dev/kvm."""
    need(shutil.which("setpriv") is not None, "setpriv not installed")
    need(open("/proc/sys/kernel/dmesg_restrict").read().strip() == "1", "dmesg_restrict is 0 here")
    f = scenario_file(tmp_path, '[[scenario]]\nname = "tiny"\n')
    nosyslog = ("setpriv", "--bounding-set", "-syslog", "--inh-caps", "-syslog")
    r = kvmsplit(tmp_path, "run", "--scenario", f, "-o", tmp_path / "a", prefix=nosyslog)
    assert r.returncode == EXIT_UNCONFIRMED, r.stderr
    s = json.loads((tmp_path / "a" / "results.json").read_text())["scenarios"][0]
    assert s["verdict"] == "UNCONFIRMED" and s["reasons"][0].startswith("kernel log unchecked")
    assert "not ok 1 tiny # UNCONFIRMED kernel log unchecked" in (tmp_path / "a" / "results.ktap").read_text()
    kcidb = json.loads((tmp_path / "a" / "kcidb.json").read_text())
    assert [t["status"] for t in kcidb["tests"]] == ["DONE"]
    assert 'type="UNCONFIRMED"' in (tmp_path / "a" / "junit.xml").read_text()
    r = kvmsplit(tmp_path, "run", "--scenario", f, "-o", tmp_path / "b", "--allow-unchecked", prefix=nosyslog)
    assert r.returncode == EXIT_OK, r.stderr


@pytest.mark.kvm
def test_a_kvmsplit_bug_is_an_error_the_suite_survives_and_exit_70(tmp_path):
    f = scenario_file(tmp_path, '[[scenario]]\nname = "first"\n\n[[scenario]]\nname = "second"\n')
    r = kvmsplit(tmp_path, "run", "--scenario", f, "-o", tmp_path, "--inject-bug", "dirty-1")
    assert r.returncode == EXIT_INTERNAL
    assert "internal error in first" in r.stderr and "Traceback" in r.stderr
    first, second = json.loads((tmp_path / "results.json").read_text())["scenarios"]
    assert first["verdict"] == "ERROR"
    assert first["reasons"] == ["internal error in phase dirty-1: RuntimeError: injected kvmsplit bug in phase dirty-1"]
    assert "RuntimeError" in first["extra"]["internal_error"]
    assert second["verdict"] == "ERROR"       # the same injected bug, but it ran: the suite went on
    assert second["extra"]["internal_error"]


@pytest.mark.kvm
def test_a_run_where_everything_skips_is_exit_4(tmp_path):
    free = int(open("/sys/kernel/mm/hugepages/hugepages-2048kB/free_hugepages").read())
    size = (free + 8) * 2          # MiB: more than the pool has free, and it may not grow
    f = scenario_file(tmp_path, f'[[scenario]]\nname = "no-pool"\nbacking = "hugetlb-2m"\nguest_page = "2m"\n'
                                f'size = "{size}M"\n')
    r = kvmsplit(tmp_path, "run", "--scenario", f, "-o", tmp_path, "--no-host-changes")
    assert r.returncode == EXIT_NOTHING_TESTED, r.stderr
    assert json.loads((tmp_path / "results.json").read_text())["scenarios"][0]["verdict"] == "SKIP"


@pytest.mark.kvm
def test_without_tracefs_access_the_split_evidence_is_unconfirmed(tmp_path):
    """Real: in a mount namespace of its own with every tracefs unmounted, and
    without CAP_SYS_ADMIN to mount one, kvmsplit cannot trace; /dev/kvm works."""
    need(shutil.which("unshare") is not None and shutil.which("setpriv") is not None, "util-linux missing")
    f = scenario_file(tmp_path, '[[scenario]]\nname = "thp"\nbacking = "thp"\nguest_page = "2m"\n')
    inner = (f"grep ' tracefs ' /proc/mounts | cut -d' ' -f2 | xargs -r -n1 umount; "
             f"exec setpriv --bounding-set -sys_admin --inh-caps -sys_admin {sys.executable} -m kvmsplit run "
             f"--scenario {f} -o {tmp_path / 'out'}")
    r = subprocess.run(["unshare", "-m", "--propagation", "private", "sh", "-c", inner],
                       capture_output=True, text=True)
    assert r.returncode == EXIT_UNCONFIRMED, r.stderr
    s = json.loads((tmp_path / "out" / "results.json").read_text())["scenarios"][0]
    assert s["verdict"] == "UNCONFIRMED"
    assert s["reasons"][0].startswith("tracepoints unavailable (cannot mount tracefs at ")
    assert "Operation not permitted" in s["reasons"][0]
    assert all(p["trace"] is None for p in s["phases"])
