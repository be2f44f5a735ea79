"""The history database: every run, stored while it runs (SQLite, one file).

A run is inserted when it starts, with every planned scenario as MISS, and
each scenario is replaced by its result as soon as it finishes; so a run
that is killed outright keeps what it finished, and shows the rest as never
run. Phase times get a table of their own because compare's baseline is
"this phase of this scenario in every earlier run on this host".
"""
from __future__ import annotations

import json
import shlex
import sqlite3
import time
from contextlib import closing, contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

from kvmsplit.errors import BadInputError, NoInputError
from kvmsplit.paths import data_dir
from kvmsplit.runs.digest import host_name, kernel_release, kind, results_source
from kvmsplit.report.outputs import warn
from kvmsplit.runs.schema import from_json, load_results, results_path
from kvmsplit.runs.results import RunResult, ScenarioResult, _json_default

DB_VERSION = 1      # PRAGMA user_version of the layout below

_LAYOUT = (
    """CREATE TABLE runs (
    id          INTEGER PRIMARY KEY AUTOINCREMENT,  -- what `kvmsplit history` shows
    run_id      TEXT NOT NULL,                      -- RunResult.run_id
    host        TEXT NOT NULL,
    kernel      TEXT NOT NULL,
    started     REAL NOT NULL,
    finished    REAL,                               -- NULL: still running, or killed
    interrupted INTEGER NOT NULL DEFAULT 0,
    series      TEXT,                               -- JSON, or NULL
    outdir      TEXT,
    run         TEXT NOT NULL,                      -- the RunResult as JSON, less its scenarios
    UNIQUE (host, run_id, started)
)""",
    """CREATE TABLE scenarios (
    run            INTEGER NOT NULL REFERENCES runs(id) ON DELETE CASCADE,
    idx            INTEGER NOT NULL,
    name           TEXT NOT NULL,
    kind           TEXT NOT NULL,
    params         TEXT NOT NULL,    -- canonical JSON of the parameters: "the same scenario"
    verdict        TEXT NOT NULL,
    observed_split TEXT,
    result         TEXT NOT NULL,    -- the ScenarioResult as JSON
    PRIMARY KEY (run, idx)
)""",
    """CREATE TABLE phases (
    run        INTEGER NOT NULL,
    idx        INTEGER NOT NULL,
    seq        INTEGER NOT NULL,
    name       TEXT NOT NULL,
    duration_s REAL NOT NULL,
    PRIMARY KEY (run, idx, seq),
    FOREIGN KEY (run, idx) REFERENCES scenarios(run, idx) ON DELETE CASCADE
)""",
    """CREATE INDEX scenarios_by_params ON scenarios(name, params)""",
)


def default_db() -> Path:
    return data_dir() / "history.sqlite"


def _params(sr: ScenarioResult) -> str:
    return json.dumps(sr.scenario, sort_keys=True)


def _head(rr: RunResult) -> str:
    return _json({k: v for k, v in rr.to_dict().items() if k != "scenarios"})


def _json(obj) -> str:
    return json.dumps(obj, default=_json_default)


@dataclass
class RunRow:
    id: int
    run_id: str
    host: str
    kernel: str
    started: float
    finished: float | None
    interrupted: bool
    series: dict | None
    outdir: str | None
    counts: dict[str, int]

    @property
    def state(self) -> str:
        if self.interrupted:
            return "interrupted"
        return "done" if self.finished else "running or killed"


@dataclass
class Sample:
    """One phase time of one stored run."""
    run: tuple[str, float]      # (run_id, started): run ids alone may repeat
    kernel: str
    series: dict | None
    phase: str
    seconds: float


class History:
    def __init__(self, path: Path | str | None = None):
        self.path = Path(path) if path else default_db()

    @property
    def exists(self) -> bool:
        return self.path.exists()

    @contextmanager
    def _db(self):
        """One connection and one transaction per operation: a run killed
        between two scenarios leaves nothing open. The write lock is taken up
        front, so that two runs creating the database at once, or a reader
        racing a writer, wait for each other instead of failing."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            with closing(sqlite3.connect(self.path, timeout=30, isolation_level=None)) as db:
                db.execute("PRAGMA foreign_keys = ON")
                db.execute("BEGIN IMMEDIATE")
                try:
                    self._check_layout(db)
                    yield db
                except BaseException:
                    db.execute("ROLLBACK")
                    raise
                db.execute("COMMIT")
        except sqlite3.DatabaseError as e:
            raise BadInputError(f"{self.path}: history database unusable: {e}") from None

    def _check_layout(self, db) -> None:
        version = db.execute("PRAGMA user_version").fetchone()[0]
        if version == 0 and not db.execute("SELECT 1 FROM sqlite_master").fetchone():
            for statement in _LAYOUT:
                db.execute(statement)
            db.execute(f"PRAGMA user_version = {DB_VERSION}")
        elif version != DB_VERSION:
            raise BadInputError(f"{self.path}: history database version {version}, "
                                f"this kvmsplit reads version {DB_VERSION}")

    # -- writing ---------------------------------------------------------------------
    def add_run(self, rr: RunResult, outdir: Path | None = None) -> int:
        """Insert (or replace) a run with all its scenarios as they stand; its id."""
        with self._db() as db:
            db.execute("DELETE FROM runs WHERE host = ? AND run_id = ? AND started = ?",
                       (host_name(rr), rr.run_id, rr.started))
            cur = db.execute(
                "INSERT INTO runs (run_id, host, kernel, started, finished, interrupted, series,"
                " outdir, run) VALUES (?,?,?,?,?,?,?,?,?)",
                (rr.run_id, host_name(rr), kernel_release(rr), rr.started, rr.finished,
                 int(rr.interrupted), _json(rr.series) if rr.series else None,
                 str(outdir) if outdir else None, _head(rr)))
            pk = cur.lastrowid
            for i, sr in enumerate(rr.scenarios):
                self._put_scenario(db, pk, i, sr)
        return pk

    def update_scenario(self, pk: int, index: int, sr: ScenarioResult) -> None:
        with self._db() as db:
            self._put_scenario(db, pk, index, sr)

    def finish_run(self, pk: int, rr: RunResult) -> None:
        """The end of a run: its final state, and the scenarios it never finished."""
        with self._db() as db:
            db.execute("UPDATE runs SET finished = ?, interrupted = ?, run = ? WHERE id = ?",
                       (rr.finished, int(rr.interrupted), _head(rr), pk))
            for i, sr in enumerate(rr.scenarios):
                self._put_scenario(db, pk, i, sr)

    @staticmethod
    def _put_scenario(db, pk: int, i: int, sr: ScenarioResult) -> None:
        db.execute("DELETE FROM scenarios WHERE run = ? AND idx = ?", (pk, i))
        db.execute("INSERT INTO scenarios VALUES (?,?,?,?,?,?,?,?)",
                   (pk, i, sr.name, kind(sr), _params(sr), sr.verdict, sr.observed_split,
                    _json(asdict(sr))))
        db.executemany("INSERT INTO phases VALUES (?,?,?,?,?)",
                       [(pk, i, seq, p.name, p.duration_s) for seq, p in enumerate(sr.phases)])

    # -- reading ---------------------------------------------------------------------
    def runs(self, host: str | None = None, limit: int | None = None) -> list[RunRow]:
        """Newest first."""
        if not self.exists:
            return []
        sql = ("SELECT r.id, r.run_id, r.host, r.kernel, r.started, r.finished, r.interrupted,"
               " r.series, r.outdir, s.verdict, count(s.idx) FROM runs r"
               " LEFT JOIN scenarios s ON s.run = r.id")
        args: list = []
        if host:
            sql += " WHERE r.host = ?"
            args.append(host)
        sql += " GROUP BY r.id, s.verdict ORDER BY r.started DESC, r.id DESC"
        rows: dict[int, RunRow] = {}
        with self._db() as db:
            for (pk, run_id, h, kernel, started, finished, intr, series, outdir,
                 verdict, n) in db.execute(sql, args):
                row = rows.get(pk)
                if row is None:
                    if limit is not None and len(rows) >= limit:
                        break
                    row = rows[pk] = RunRow(pk, run_id, h, kernel, started, finished, bool(intr),
                                            json.loads(series) if series else None, outdir, {})
                if verdict:
                    row.counts[verdict] = n
        return list(rows.values())

    def load(self, pk: int) -> RunResult:
        if not self.exists:
            raise NoInputError(f"{self.path}: no history database (no run recorded yet)")
        with self._db() as db:
            row = db.execute("SELECT run FROM runs WHERE id = ?", (pk,)).fetchone()
            if row is None:
                raise NoInputError(f"no run {pk} in {self.path} (see `kvmsplit history`)")
            scen = db.execute("SELECT result FROM scenarios WHERE run = ? ORDER BY idx", (pk,))
            data = {**json.loads(row[0]), "scenarios": [json.loads(s) for (s,) in scen]}
        return from_json(data, f"{self.path}: run {pk}")

    def find(self, run_id: str) -> int | None:
        """The id of a run known by its RunResult.run_id, if stored."""
        if not self.exists:
            return None
        with self._db() as db:
            row = db.execute("SELECT id FROM runs WHERE run_id = ? ORDER BY started DESC",
                             (run_id,)).fetchone()
        return row[0] if row else None

    def phase_samples(self, host: str, sr: ScenarioResult, before: float) -> list[Sample]:
        """The phase times of the same scenario (same name and parameters) in
        the runs on host that started before `before`."""
        if not self.exists:
            return []
        with self._db() as db:
            rows = db.execute(
                "SELECT r.run_id, r.started, r.kernel, r.series, p.name, p.duration_s FROM phases p"
                " JOIN scenarios s ON s.run = p.run AND s.idx = p.idx"
                " JOIN runs r ON r.id = p.run"
                " WHERE r.host = ? AND s.name = ? AND s.params = ? AND r.started < ?",
                (host, sr.name, _params(sr), before)).fetchall()
        return [Sample((run_id, started), kernel, json.loads(series) if series else None, phase, dur)
                for run_id, started, kernel, series, phase, dur in rows]

    def run_source(self, pk: int) -> str:
        """A stored run as rerun's argument (see digest.rerun_command)."""
        if self.path == default_db():
            return str(pk)
        return f"{pk} --db {shlex.quote(str(self.path.resolve()))}"


class HistorySink:
    """Records a run into the history as it goes (a suite.ResultSink)."""

    def __init__(self, history: History):
        self.history = history
        self.pk: int | None = None

    def started(self, rr: RunResult, outdir: Path) -> None:
        try:
            self.pk = self.history.add_run(rr, outdir.resolve())
        except BadInputError as e:
            warn("history not recorded", e)

    def scenario_done(self, rr: RunResult, index: int, outdir: Path) -> None:
        if self.pk is not None:
            try:
                self.history.update_scenario(self.pk, index, rr.scenarios[index])
            except BadInputError as e:
                warn("history not updated", e)

    def finished(self, rr: RunResult, outdir: Path) -> None:
        if self.pk is not None:
            try:
                self.history.finish_run(self.pk, rr)
            except BadInputError as e:
                warn("history not updated", e)


def fmt_time(ts: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M", time.localtime(ts))


@dataclass
class LoadedRun:
    rr: RunResult
    ref: str                    # how to name it to a person: "run 12" or the file
    source: str                 # how `kvmsplit rerun` takes it (digest.rerun_command)
    path: Path | None = None    # the results.json, when it came from one


def open_run(ref: str, history: History) -> LoadedRun:
    """RUN: a history id (as `kvmsplit history` lists), a results.json or its
    directory, or a RunResult.run_id stored in the history."""
    if ref.isdigit():
        pk = int(ref)
        return LoadedRun(history.load(pk), f"run {pk}", history.run_source(pk))
    p = results_path(ref)
    if p.exists() or ref.endswith(".json") or "/" in ref:
        return LoadedRun(load_results(p), str(p), results_source(p), p)
    pk = history.find(ref)
    if pk is None:
        raise NoInputError(f"{ref}: neither a results file nor a run in {history.path}")
    return LoadedRun(history.load(pk), f"run {pk}", history.run_source(pk))
