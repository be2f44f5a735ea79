"""History database version 1: the layout of kvmsplit 0.1, the first one.

Frozen: a database of this version is only ever created by old kvmsplits;
this one reads it through the upgrades that follow (schema_v2...)."""
from __future__ import annotations

VERSION = 1

LAYOUT = (
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
