"""History database migrations: a version 1 database (as kvmsplit 0.1 wrote
it) is upgraded in place when opened, once, atomically; a newer one is
refused untouched. Every database here is a file in tmp_path."""
import json
import multiprocessing
import sqlite3
import time
from dataclasses import asdict, replace

import pytest
from samples import make_run

from kvmsplit.errors import EXIT_BAD_INPUT, BadInputError
from kvmsplit.runs.digest import headline, host_name, kernel_release, kind
from kvmsplit.runs.history import DB_VERSION, LATEST, SCHEMAS, History, schema_v1, schema_v2, stored_headline
from kvmsplit.runs.results import json_default

pytest_plugins = ["cli_fixture"]      # kv


def _json(obj):
    return json.dumps(obj, default=json_default)


def v1_database(path, *runs):
    """A history file as kvmsplit 0.1 (layout version 1) created and filled
    it: its CREATE statements, and the INSERTs of its add_run, verbatim."""
    with sqlite3.connect(path, isolation_level=None) as db:
        db.execute("BEGIN IMMEDIATE")
        for statement in schema_v1.LAYOUT:
            db.execute(statement)
        db.execute("PRAGMA user_version = 1")
        for rr in runs:
            cur = db.execute(
                "INSERT INTO runs (run_id, host, kernel, started, finished, interrupted, series,"
                " outdir, run) VALUES (?,?,?,?,?,?,?,?,?)",
                (rr.run_id, host_name(rr), kernel_release(rr), rr.started, rr.finished,
                 int(rr.interrupted), _json(rr.series) if rr.series else None, "/tmp/out",
                 _json({k: v for k, v in rr.to_dict().items() if k != "scenarios"})))
            for i, sr in enumerate(rr.scenarios):
                db.execute("INSERT INTO scenarios VALUES (?,?,?,?,?,?,?,?)",
                           (cur.lastrowid, i, sr.name, kind(sr), json.dumps(sr.scenario, sort_keys=True),
                            sr.verdict, sr.observed_split, _json(asdict(sr))))
                db.executemany("INSERT INTO phases VALUES (?,?,?,?,?)",
                               [(cur.lastrowid, i, seq, p.name, p.duration_s)
                                for seq, p in enumerate(sr.phases)])
        db.execute("COMMIT")
    db.close()
    return path


def odd_run():
    """Headlines off the beaten track: a report without a title, one with an
    empty title, a PASS with a note, a FAIL without reasons."""
    rr = make_run(run_id="20260103-000000-3", started=1_767_398_400.0)
    passed, failing, *_ = rr.scenarios
    rep = failing.kernel_log["reports"][0]
    rr.scenarios += [
        replace(failing, name="untitled", kernel_log={**failing.kernel_log, "reports": [{**rep, "title": None}]}),
        replace(failing, name="empty-title", kernel_log={**failing.kernel_log, "reports": [{**rep, "title": ""}]}),
        replace(passed, name="noted", reasons=["dirty ring: not checked (no ring support)"]),
        replace(failing, name="reasonless", reasons=[], kernel_log={}),
    ]
    return rr


def dump(path):
    with sqlite3.connect(path) as db:
        out = (db.execute("PRAGMA user_version").fetchone()[0], list(db.iterdump()))
    db.close()
    return out


def version(path):
    return dump(path)[0]


def layout(path):
    """What the code sees of a layout: columns, indexes, foreign keys (not the CREATE text)."""
    with sqlite3.connect(path) as db:
        tables = [t for (t,) in db.execute("SELECT name FROM sqlite_master WHERE type = 'table' ORDER BY name")]
        out = {t: (db.execute(f"PRAGMA table_info({t})").fetchall(),
                   sorted(db.execute(f"PRAGMA index_list({t})").fetchall()),
                   db.execute(f"PRAGMA foreign_key_list({t})").fetchall()) for t in tables}
        out["indexes"] = sorted(db.execute("SELECT name, tbl_name FROM sqlite_master WHERE type = 'index'"))
    db.close()
    return out


def test_the_registry_is_one_module_per_version_in_order():
    assert [s.VERSION for s in SCHEMAS] == list(range(1, LATEST + 1))
    assert DB_VERSION == LATEST == 2
    assert all(callable(s.upgrade) for s in SCHEMAS[1:])


def test_a_v1_database_is_upgraded_in_place_and_keeps_every_run(kv, tmp_path):
    first, second = make_run(), make_run(run_id="20260102-000000-2", started=1_767_312_000.0)
    db = v1_database(tmp_path / "h.sqlite", first, second)
    inode = db.stat().st_ino
    h = History(db)
    rows = h.runs()
    assert version(db) == 2 and db.stat().st_ino == inode
    assert [(r.id, r.run_id, r.counts, r.state, r.outdir) for r in rows] == [
        (2, second.run_id, {"PASS": 1, "FAIL": 1, "ERROR": 1, "SKIP": 1, "MISS": 1}, "interrupted", "/tmp/out"),
        (1, first.run_id, {"PASS": 1, "FAIL": 1, "ERROR": 1, "SKIP": 1, "MISS": 1}, "interrupted", "/tmp/out")]
    assert h.load(1) == first and h.load(2) == second and h.find(second.run_id) == 2
    samples = h.phase_samples(host_name(first), first.scenarios[0], before=second.started + 1)
    assert sorted({s.run for s in samples}) == [(first.run_id, first.started), (second.run_id, second.started)]
    assert len(samples) == 2 * len(first.scenarios[0].phases)
    with sqlite3.connect(db) as c:
        assert c.execute("SELECT DISTINCT kvmsplit_version FROM runs").fetchall() == [("0.1.0",)]
        assert c.execute("SELECT verdict, headline FROM scenarios WHERE run = 1 ORDER BY idx").fetchall() == [
            ("PASS", None), ("FAIL", "WARNING in kvm_mmu_split_huge_pages"),
            ("ERROR", "guest hung in phase dirty-2: guest cpu 0 did not answer within 60s"),
            ("SKIP", "KVM does not offer 1G guest pages here"), ("MISS", None)]
    c.close()
    h.add_run(make_run(run_id="20260104-000000-4", started=1_767_484_800.0))   # and it takes new runs
    rc, out, _ = kv("history", "--db", db)
    assert rc == 0 and [line.split()[0] for line in out.splitlines()[1:]] == ["3", "2", "1"]


def test_an_upgraded_database_is_laid_out_as_a_fresh_one(tmp_path):
    fresh = tmp_path / "fresh.sqlite"
    History(fresh).add_run(make_run())
    old = v1_database(tmp_path / "old.sqlite", make_run())
    History(old).runs()
    assert layout(old) == layout(fresh)
    assert ("runs_by_host", "runs") in layout(fresh)["indexes"]


def test_upgrade_and_new_rows_agree_on_headlines(tmp_path):
    rr = odd_run()
    old = v1_database(tmp_path / "old.sqlite", rr)
    History(old).runs()
    new = tmp_path / "new.sqlite"
    History(new).add_run(rr)
    query = "SELECT name, headline FROM scenarios ORDER BY idx"
    with sqlite3.connect(old) as a, sqlite3.connect(new) as b:
        upgraded, written = a.execute(query).fetchall(), b.execute(query).fetchall()
    a.close()
    b.close()
    assert upgraded == written == [(sr.name, stored_headline(sr)) for sr in rr.scenarios]
    for sr, (_, line) in zip(rr.scenarios, written):
        assert line == (headline(sr) if line is not None else None)
        assert (line is None) == (not sr.reasons and not (sr.kernel_log or {}).get("reports"))
    assert dict(written)["untitled"] == dict(written)["empty-title"] == "kernel report"


def test_a_database_from_a_newer_kvmsplit_is_refused_untouched(kv, tmp_path):
    db = tmp_path / "h.sqlite"
    History(db).add_run(make_run())
    with sqlite3.connect(db) as c:
        c.execute("ALTER TABLE runs ADD COLUMN from_the_future TEXT")
        c.execute("PRAGMA user_version = 3")
    c.close()
    before = db.read_bytes()
    with pytest.raises(BadInputError, match="version 3 was written by a newer kvmsplit"):
        History(db).runs()
    rc, _, err = kv("history", "--db", db)
    assert rc == EXIT_BAD_INPUT and err.count("\n") == 1 and "newer kvmsplit" in err
    with pytest.raises(BadInputError):
        History(db).add_run(make_run(run_id="x"))
    assert db.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith("h.sqlite")] == ["h.sqlite"]   # no journal


def test_an_sqlite_file_that_is_not_a_history_is_unusable(kv, tmp_path):
    db = tmp_path / "other.sqlite"
    with sqlite3.connect(db) as c:
        c.execute("CREATE TABLE t (x)")
    c.close()
    before = db.read_bytes()
    rc, _, err = kv("history", "--db", db)
    assert rc == EXIT_BAD_INPUT and err.count("\n") == 1 and "history database unusable" in err
    assert db.read_bytes() == before


def test_a_failed_upgrade_leaves_the_database_at_v1(tmp_path, monkeypatch):
    db = v1_database(tmp_path / "h.sqlite", make_run())
    before = dump(db)
    real = schema_v2.upgrade

    def half_then_fail(c):
        c.execute("ALTER TABLE runs ADD COLUMN kvmsplit_version TEXT")
        c.execute("UPDATE runs SET kvmsplit_version = 'half'")
        raise sqlite3.OperationalError("disk I/O error (simulated)")
    monkeypatch.setattr(schema_v2, "upgrade", half_then_fail)
    with pytest.raises(BadInputError, match="history database unusable: disk I/O error"):
        History(db).runs()
    assert dump(db) == before and version(db) == 1
    monkeypatch.setattr(schema_v2, "upgrade", real)
    assert History(db).load(1) == make_run() and version(db) == 2


def _open_together(db, barrier, log):
    """A child: count the upgrades this process runs, and read the history."""
    real = schema_v2.upgrade

    def counted(c):
        with open(log, "a") as f:
            f.write("upgrade\n")
        time.sleep(0.3)             # long enough for the other process to be waiting on the lock
        real(c)
    schema_v2.upgrade = counted
    barrier.wait(timeout=10)
    rows = History(db).runs()
    assert [r.run_id for r in rows] == ["20260101-000000-1"]


def test_two_processes_opening_a_v1_database_upgrade_it_once(tmp_path):
    db, log = v1_database(tmp_path / "h.sqlite", make_run()), tmp_path / "upgrades.log"
    ctx = multiprocessing.get_context("fork")
    barrier = ctx.Barrier(2)
    procs = [ctx.Process(target=_open_together, args=(db, barrier, log)) for _ in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=30)
    assert [p.exitcode for p in procs] == [0, 0]
    assert log.read_text() == "upgrade\n"
    assert version(db) == 2 and History(db).load(1) == make_run()
