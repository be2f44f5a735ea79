"""rerun: exactly the scenarios of an earlier run, parameters and seeds included."""
import json
import subprocess
import sys
from types import SimpleNamespace

import pytest
from samples import make_run

from kvmsplit.cli.rerun import choose, expect_override
from kvmsplit.errors import EXIT_USAGE, UsageError
from kvmsplit.host.facts import HostFacts
from kvmsplit.runs.history import History, LoadedRun
from kvmsplit.runs.results import ScenarioResult

pytest_plugins = ["cli_fixture"]      # kv


def loaded(rr=None) -> LoadedRun:
    return LoadedRun(rr or make_run(), "results.json", "results.json")


def test_failed_picks_fail_and_error_only_picks_by_name():
    assert [s.name for s in choose(loaded(), True, None)] == ["thp/2m/manual", "thp/2m/ring"]
    assert [s.name for s in choose(loaded(), False, ["thp/2m/ring", "anon/4k/bitmap"])] == \
        ["thp/2m/ring", "anon/4k/bitmap"]
    assert len(choose(loaded(), False, None)) == 5
    with pytest.raises(UsageError, match="did you mean 'thp/2m/ring'"):
        choose(loaded(), False, ["thp/2m/rign"])


def test_the_runs_expect_override_is_recovered():
    rr = make_run()
    assert expect_override(rr.scenarios) is None
    for s in rr.scenarios:
        s.expectation = {"split": "lazy", "when": None, "reason": "overridden", "overridden": True}
    assert expect_override(rr.scenarios) == "lazy"
    rr.scenarios[0].scenario["expect"] = "lazy"        # the scenario's own, not the command line's
    assert expect_override(rr.scenarios[:1]) is None


def test_kinds_are_not_mixed_in_one_rerun(kv, tmp_path):
    rr = make_run()
    rr.scenarios[1].scenario = {"kind": "kselftest", "test": "dirty_log_test", "args": []}
    rr.write(tmp_path)
    rc, _, err = kv("rerun", tmp_path, "--failed")
    assert rc == EXIT_USAGE and "cannot rerun kselftest, scenario results together" in err
    assert err.count("\n") == 1


def test_selftest_results_go_back_to_the_selftests_runner(kv, tmp_path, monkeypatch):
    # the selftests themselves take a kernel build; what rerun owns is
    # handing the runner the very cases that ran
    from kvmsplit.cli import options
    from kvmsplit.selftests import build, runner
    from kvmsplit.selftests.manifest import SelftestCase
    cases = [SelftestCase(name=f"dirty_log_test/{m}", test="dirty_log_test", args=["-M", m],
                          timeout=120.0, requires=["root"], hugepages={"2M": 512}) for m in ("ring", "bitmap")]
    rr = make_run()
    rr.scenarios = [ScenarioResult(name=c.name, scenario=c.to_dict(), verdict=v, reasons=["x"])
                    for c, v in zip(cases, ("FAIL", "PASS"))]
    rr.write(tmp_path)
    ran = []

    def run_selftests(cases, b, facts, outdir, **kw):
        ran.extend(cases)
        rr.scenarios = rr.scenarios[:1]
        return rr
    monkeypatch.setattr(build, "build", lambda tree=None, **kw: SimpleNamespace(version="6.18.0"))
    monkeypatch.setattr(runner, "run_selftests", run_selftests)
    monkeypatch.setattr(options, "probe", lambda: HostFacts())
    rc, out, _ = kv("rerun", tmp_path, "--failed", "-o", tmp_path / "again")
    assert ran == cases[:1]
    assert rc == 1 and "dirty_log_test/ring" in out


def test_nothing_failed_nothing_to_rerun(kv, tmp_path):
    rr = make_run()
    rr.scenarios = rr.scenarios[:1]
    rr.write(tmp_path)
    rc, out, _ = kv("rerun", tmp_path / "results.json", "--failed")
    assert rc == 0 and "nothing to rerun" in out


def kvmsplit(*args):
    r = subprocess.run([sys.executable, "-m", "kvmsplit", *map(str, args)], capture_output=True, text=True)
    assert r.returncode in (0, 1), r.stderr        # 1: a scenario did not pass, still a run
    return r


@pytest.mark.kvm
def test_rerun_runs_the_same_scenarios_again(tmp_path):
    f = tmp_path / "tiny.toml"
    f.write_text('[defaults]\nsize = "16M"\npasses = 1\n\n'
                 '[[scenario]]\nname = "tiny-anon"\nbacking = "anon"\nguest_page = "4k"\n\n'
                 '[[scenario]]\nname = "tiny-thp-random"\nbacking = "thp"\npattern = "random"\n'
                 'percent = 40\nseed = 977\ndirty_mode = "ring"\n')
    db = tmp_path / "h.sqlite"
    kvmsplit("run", "--scenario", f, "-o", tmp_path / "first", "--db", db, "--series", "tiny", "--series-version", 2)
    first = json.loads((tmp_path / "first" / "results.json").read_text())

    kvmsplit("rerun", tmp_path / "first", "-o", tmp_path / "again", "--db", db)
    again = json.loads((tmp_path / "again" / "results.json").read_text())
    assert [s["scenario"] for s in again["scenarios"]] == [s["scenario"] for s in first["scenarios"]]
    assert again["scenarios"][1]["scenario"]["seed"] == 977
    assert again["series"] == first["series"] == {"name": "tiny", "version": 2}
    assert all(s["verdict"] != "MISS" for s in again["scenarios"])

    kvmsplit("rerun", "1", "--db", db, "--only", "tiny-thp-random", "-o", tmp_path / "one")
    one = json.loads((tmp_path / "one" / "results.json").read_text())
    assert [s["scenario"] for s in one["scenarios"]] == [first["scenarios"][1]["scenario"]]
    assert [r.started for r in History(db).runs()] == [one["started"], again["started"], first["started"]]
