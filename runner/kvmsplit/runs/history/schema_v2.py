"""History database version 2: what version 1 had, plus

- scenarios.headline: the one line a result is known by (digest.headline:
  the first kernel report's title, else the first reason), NULL when there
  is nothing to say beyond the verdict (a plain PASS, a MISS);
- runs.kvmsplit_version: the kvmsplit that recorded the run;
- runs_by_host: an index for "the runs on this host, newest first".

A fresh database is made as version 1 and upgraded, so a fresh database and
an upgraded one are the same by construction."""
from __future__ import annotations

VERSION = 2

RUNS_BY_HOST = "CREATE INDEX runs_by_host ON runs(host, started)"

# digest.headline, in SQL over a stored ScenarioResult (scenarios.result);
# db.stored_headline is the same in Python, for the rows written from now on.
HEADLINE_SQL = """CASE
    WHEN json_array_length(result, '$.kernel_log.reports') > 0
        THEN coalesce(nullif(json_extract(result, '$.kernel_log.reports[0].title'), ''), 'kernel report')
    WHEN json_array_length(result, '$.reasons') > 0
        THEN json_extract(result, '$.reasons[0]')
END"""


def upgrade(db) -> None:
    """A version 1 database to version 2, in place, inside the caller's transaction."""
    db.execute("ALTER TABLE runs ADD COLUMN kvmsplit_version TEXT")
    db.execute("UPDATE runs SET kvmsplit_version = json_extract(run, '$.kvmsplit_version')")
    db.execute("ALTER TABLE scenarios ADD COLUMN headline TEXT")
    db.execute(f"UPDATE scenarios SET headline = {HEADLINE_SQL}")
    db.execute(RUNS_BY_HOST)
