"""The History class: one SQLite file, opened per operation."""
from __future__ import annotations

import json
import os
import shlex
import sqlite3
from contextlib import closing, contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

from kvmsplit.errors import BadInputError, NoInputError, UsageError
from kvmsplit.paths import data_dir
from kvmsplit.runs.digest import headline, host_name, kernel_release, kind, reports
from kvmsplit.runs.history.migrate import LATEST, ensure_latest
from kvmsplit.runs.results import RunResult, ScenarioResult, json_default
from kvmsplit.runs.schema import from_json

DB_VERSION = LATEST     # PRAGMA user_version of the layout this kvmsplit writes
DEFAULT_TIMEOUT = 30.0  # seconds to wait for another kvmsplit's write lock (KVMSPLIT_DB_TIMEOUT)


def default_timeout() -> float:
    text = os.environ.get("KVMSPLIT_DB_TIMEOUT")
    if not text:
        return DEFAULT_TIMEOUT
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0 <= value < float("inf"):
        raise UsageError(f"KVMSPLIT_DB_TIMEOUT={text!r}: expected seconds to wait for the history's lock")
    return value


def _one_line(e: Exception) -> str:
    """SQLite's message, which may quote a (multi-line) CREATE statement, on one line."""
    text = " ".join(str(e).split())
    return text if len(text) <= 200 else text[:200] + "..."


def _decode(text, where: str):
    """A JSON column of a stored run, or a one-line error where it is corrupt."""
    try:
        return json.loads(text)
    except (TypeError, ValueError, RecursionError) as e:
        raise BadInputError(f"{where}: history database unusable: stored JSON unreadable "
                            f"({type(e).__name__})") from None


def default_db() -> Path:
    return data_dir() / "history.sqlite"


def _params(sr: ScenarioResult) -> str:
    return json.dumps(sr.scenario, sort_keys=True)


def _head(rr: RunResult) -> str:
    return _json({k: v for k, v in rr.to_dict().items() if k != "scenarios"})


def _json(obj) -> str:
    return json.dumps(obj, default=json_default)


def stored_headline(sr: ScenarioResult) -> str | None:
    """scenarios.headline: digest.headline, or NULL where it would only repeat
    the verdict (schema_v2.HEADLINE_SQL computes the same for old rows)."""
    return headline(sr) if reports(sr) or sr.reasons else None


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
    def __init__(self, path: Path | str | None = None, timeout: float | None = None):
        self.path = Path(path) if path else default_db()
        # how long to wait for a lock another process holds, then fail
        self.timeout = default_timeout() if timeout is None else timeout

    @property
    def exists(self) -> bool:
        return self.path.exists()

    @contextmanager
    def _db(self):
        """One connection and one transaction per operation: a run killed
        between two scenarios leaves nothing open. The write lock is taken up
        front, so that two runs creating (or upgrading) the database at once,
        or a reader racing a writer, wait for each other instead of failing."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            with closing(sqlite3.connect(self.path, timeout=self.timeout, isolation_level=None)) as db:
                db.execute("PRAGMA foreign_keys = ON")
                db.execute("BEGIN IMMEDIATE")
                try:
                    ensure_latest(db, self.path)
                    yield db
                except BaseException:
                    if db.in_transaction:   # SQLite may have rolled back already (corruption, I/O error)
                        db.execute("ROLLBACK")
                    raise
                db.execute("COMMIT")
        except sqlite3.OperationalError as e:
            code = (getattr(e, "sqlite_errorcode", None) or 0) & 0xFF      # extended codes too; some have none
            if code in (sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED):
                raise BadInputError(f"{self.path}: history database locked by another process "
                                    f"(waited {self.timeout:g} s; see KVMSPLIT_DB_TIMEOUT)") from None
            raise BadInputError(f"{self.path}: history database unusable: {_one_line(e)}") from None
        except sqlite3.Error as e:
            raise BadInputError(f"{self.path}: history database unusable: {_one_line(e)}") from None
        except UnicodeDecodeError:
            raise BadInputError(f"{self.path}: history database unusable: stored text is not UTF-8") from None

    # -- writing ---------------------------------------------------------------------
    def add_run(self, rr: RunResult, outdir: Path | None = None) -> int:
        """Insert (or replace) a run with all its scenarios as they stand; its id."""
        with self._db() as db:
            db.execute("DELETE FROM runs WHERE host = ? AND run_id = ? AND started = ?",
                       (host_name(rr), rr.run_id, rr.started))
            cur = db.execute(
                "INSERT INTO runs (run_id, host, kernel, started, finished, interrupted, series,"
                " outdir, run, kvmsplit_version) VALUES (?,?,?,?,?,?,?,?,?,?)",
                (rr.run_id, host_name(rr), kernel_release(rr), rr.started, rr.finished,
                 int(rr.interrupted), _json(rr.series) if rr.series else None,
                 str(outdir) if outdir else None, _head(rr), rr.kvmsplit_version))
            pk = cur.lastrowid
            assert pk is not None
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
        db.execute("INSERT INTO scenarios (run, idx, name, kind, params, verdict, observed_split, result,"
                   " headline) VALUES (?,?,?,?,?,?,?,?,?)",
                   (pk, i, sr.name, kind(sr), _params(sr), sr.verdict, sr.observed_split,
                    _json(asdict(sr)), stored_headline(sr)))
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
                                            _decode(series, f"{self.path}: run {pk}") if series else None,
                                            outdir, {})
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
            where = f"{self.path}: run {pk}"
            head = _decode(row[0], where)
            if not isinstance(head, dict):
                raise BadInputError(f"{where}: history database unusable: the stored run is not an object")
            data = {**head, "scenarios": [_decode(s, where) for (s,) in scen]}
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
        return [Sample((run_id, started), kernel, _decode(series, f"{self.path}: run {run_id}") if series else None,
                       phase, dur)
                for run_id, started, kernel, series, phase, dur in rows]

    def run_source(self, pk: int) -> str:
        """A stored run as rerun's argument (see digest.rerun_command)."""
        if self.path == default_db():
            return str(pk)
        return f"{pk} --db {shlex.quote(str(self.path.resolve()))}"
