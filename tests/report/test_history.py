"""The history database: stored as the run goes, so a run killed outright
keeps what it finished."""
import os
import signal
import subprocess
import sys
import time

import pytest
from samples import make_run

from kvmsplit.errors import EXIT_BAD_INPUT
from kvmsplit.runs.history import History, HistorySink

pytest_plugins = ["cli_fixture"]      # kv


def test_a_run_is_stored_as_it_goes(tmp_path):
    h = History(tmp_path / "h.sqlite")
    rr, done = make_run(), make_run()
    for s in rr.scenarios:              # as run_suite starts it: nothing ran yet
        s.verdict, s.reasons, s.phases = "MISS", [], []
    rr.finished, rr.interrupted = None, False
    sink = HistorySink(h)
    sink.started(rr, tmp_path)
    [row] = h.runs()
    assert row.counts == {"MISS": 5} and row.state == "running or killed"
    rr.scenarios[0] = done.scenarios[0]
    sink.scenario_done(rr, 0, tmp_path)
    assert h.runs()[0].counts == {"PASS": 1, "MISS": 4}
    assert h.load(row.id).scenarios[0] == done.scenarios[0]
    rr.scenarios, rr.finished, rr.interrupted = done.scenarios, done.finished, True
    sink.finished(rr, tmp_path)
    [row] = h.runs()
    assert row.state == "interrupted" and row.series["version"] == 3
    assert row.counts == {"PASS": 1, "FAIL": 1, "ERROR": 1, "SKIP": 1, "MISS": 1}
    assert h.load(row.id) == done


def test_history_command(kv, tmp_path):
    db = tmp_path / "h.sqlite"
    rc, out, _ = kv("history", "--db", db)
    assert rc == 0 and "no runs recorded" in out and not db.exists()
    History(db).add_run(make_run())
    History(db).add_run(make_run(run_id="20260102-000000-2", started=1_767_312_000.0, host="other"))
    rc, out, _ = kv("history", "--db", db)
    head, newest, older = out.splitlines()
    assert head.split() == ["id", "started", "host", "kernel", "pass", "fail", "error", "skip", "miss", "unconfirmed",
                            "state", "series"]
    assert newest.split()[0] == "2" and " other " in newest
    assert older.split()[0] == "1" and " ci-box.example.org " in older
    assert older.split()[-12:] == ["1", "1", "1", "1", "1", "0", "interrupted", "KVM:", "x86/mmu:", "split",
                                   "faster", "v3"]
    rc, out, _ = kv("history", "--db", db, "--host", "other")
    assert rc == 0 and len(out.splitlines()) == 2


def test_a_file_that_is_not_a_history_is_one_line(kv, tmp_path):
    (tmp_path / "junk.sqlite").write_text("not a database, just text " * 100)
    rc, _, err = kv("history", "--db", tmp_path / "junk.sqlite")
    assert rc == EXIT_BAD_INPUT and err.count("\n") == 1 and "history database unusable" in err


@pytest.mark.kvm
def test_a_killed_run_keeps_what_finished(tmp_path):
    from kvmsplit.host.changes import recover_stale
    db, out = tmp_path / "h.sqlite", tmp_path / "out"
    # every scenario's guest hangs in dirty-2 and is stopped after 10 s: the
    # first finishes (as ERROR), and the kill lands while the second hangs
    proc = subprocess.Popen([sys.executable, "-m", "kvmsplit", "run", "-k", "hugetlb-2m/2m", "--db", db,
                             "-o", out, "--inject-hang", "dirty-2", "--phase-timeout", "10"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and proc.poll() is None:
            runs = History(db).runs()
            if runs and runs[0].counts.get("MISS", 0) < sum(runs[0].counts.values()):
                break
            time.sleep(0.2)
        assert proc.poll() is None, proc.stderr.read()
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        recover_stale()             # the killed run could not shrink the hugetlb pool back
    h = History(db)
    [row] = h.runs()
    assert row.state == "running or killed" and row.finished is None
    rr = h.load(row.id)
    first, *rest = rr.scenarios
    assert first.verdict == "ERROR" and first.error_phase == "dirty-2"
    assert [p.name for p in first.phases][-1] == "dirty-1"
    assert rest and all(s.verdict == "MISS" for s in rest)
    assert (out / "junit.xml").exists() and (out / "kernel-log" / "hugetlb-2m_2m_bitmap.txt").exists()
