"""`kvmsplit run --repeat M` (the failure rate) and `kvmsplit report
--reproducer` (the file a KVM developer attaches to a bug report), as a user
meets them: real subprocesses on this host's /dev/kvm."""
import json
import os
import subprocess
import sys
import tomllib

import pytest

from conftest import need
from kvmsplit.errors import EXIT_USAGE

pytestmark = pytest.mark.kvm
SCENARIO = """
[[scenario]]
name = "emulated-string/ring"
backing = "anon"
guest_page = "4k"
size = "2M"
dirty_mode = "ring"
ring_size = "4K"
write_via = "emulated-string"
pattern = "random"
percent = 50
seed = 17

[[scenario]]
name = "emulated/bitmap"
backing = "anon"
guest_page = "4k"
size = "2M"
write_via = "emulated"
"""


def kvmsplit(*args):
    return subprocess.run([sys.executable, "-m", "kvmsplit", *map(str, args)], capture_output=True, text=True,
                          env=os.environ, timeout=600)


@pytest.fixture
def scenario_file(tmp_path, facts):
    route, why = facts.emulation_route()
    need(route is not None, why)
    f = tmp_path / "s.toml"
    f.write_text(SCENARIO)
    return f


def test_repeat_prints_how_many_of_the_repeats_failed(scenario_file, tmp_path):
    r = kvmsplit("run", "--scenario", scenario_file, "--repeat", 2, "-o", tmp_path / "out")
    lines = [ln for ln in r.stdout.splitlines() if "repeats failed" in ln]
    runs = [json.loads((tmp_path / "out" / f"repeat-{i}" / "results.json").read_text()) for i in (1, 2)]
    for name in ("emulated-string/ring", "emulated/bitmap"):
        verdicts = [s["verdict"] for rr in runs for s in rr["scenarios"] if s["name"] == name]
        failed = sum(v in ("FAIL", "ERROR") for v in verdicts)
        line = next(ln for ln in lines if ln.startswith(f"{name}: "))
        assert line.startswith(f"{name}: {failed} of 2 repeats failed ("), line
    assert "emulated/bitmap: 0 of 2 repeats failed (PASS 2)" in lines
    assert r.returncode == (1 if any(s["verdict"] in ("FAIL", "ERROR") for rr in runs for s in rr["scenarios"])
                            else 0), r.stderr[-2000:]


def test_repeat_refuses_nonsense():
    r = kvmsplit("run", "--repeat", "0")
    assert r.returncode == EXIT_USAGE and "repeats 1..1000" in r.stderr
    assert "Traceback" not in r.stderr


def test_the_reproducer_runs_the_same_scenario_again(scenario_file, tmp_path):
    r = kvmsplit("run", "--scenario", scenario_file, "-k", "emulated-string", "-o", tmp_path / "first")
    first = json.loads((tmp_path / "first" / "results.json").read_text())["scenarios"][0]
    repro = tmp_path / "repro.toml"
    r = kvmsplit("report", "--reproducer", tmp_path / "first", "--scenario", first["name"], "-o", repro)
    assert r.returncode == 0, r.stderr
    text = repro.read_text()
    doc = tomllib.loads(text)
    assert [s["name"] for s in doc["scenario"]] == [first["name"]]
    # the exact command, the kernel and the host facts travel with it
    assert f"# run it:  kvmsplit run --scenario {repro}" in text
    assert f"# kernel: {os.uname().release}" in text
    assert '"paging":' in text and '"dirty_ring_min":' in text and f"# verdict: {first['verdict']}" in text
    r = kvmsplit("run", "--scenario", repro, "-o", tmp_path / "again")
    again = json.loads((tmp_path / "again" / "results.json").read_text())["scenarios"]
    assert [s["scenario"] for s in again] == [first["scenario"]]
    assert again[0]["scenario"]["write_via"] == "emulated-string"


def test_a_reproducer_needs_a_failing_or_named_scenario(tmp_path):
    rr = {"schema_version": 1, "run_id": "x", "host": {"kernel": {"release": "r"}}, "scenarios": []}
    (tmp_path / "results.json").write_text(json.dumps(rr))
    r = kvmsplit("report", "--reproducer", tmp_path)
    assert r.returncode in (EXIT_USAGE, 65) and "Traceback" not in r.stderr and len(r.stderr.splitlines()) == 1


def test_rerun_repeats_an_emulated_scenario_with_the_same_parameters(scenario_file, tmp_path):
    kvmsplit("run", "--scenario", scenario_file, "-k", "emulated/bitmap", "-o", tmp_path / "first")
    r = kvmsplit("rerun", tmp_path / "first", "--repeat", 2, "-o", tmp_path / "again")
    assert "emulated/bitmap: 0 of 2 repeats failed (PASS 2)" in r.stdout.splitlines(), r.stdout[-2000:]
    first = json.loads((tmp_path / "first" / "results.json").read_text())["scenarios"][0]["scenario"]
    for i in (1, 2):
        again = json.loads((tmp_path / "again" / f"repeat-{i}" / "results.json").read_text())
        assert [s["scenario"] for s in again["scenarios"]] == [first]
    assert r.returncode == 0, r.stderr[-2000:]
