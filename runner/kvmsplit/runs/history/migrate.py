"""Which layout a history database has, and bringing it to the latest.

One module per version (schema_v1, schema_v2, ...): VERSION, and either
the LAYOUT of version 1 or, from v2 on, upgrade(db), which takes a database
of the version before to this one in place. A fresh database is version 1
upgraded step by step, so every path leads to the same layout. The version
is SQLite's PRAGMA user_version. To change the layout, add schema_vN.py and
append it to SCHEMAS; never edit a released one."""
from __future__ import annotations

from pathlib import Path

from kvmsplit.errors import BadInputError
from kvmsplit.runs.history import schema_v1, schema_v2

SCHEMAS = (schema_v1, schema_v2)
LATEST = SCHEMAS[-1].VERSION

assert [s.VERSION for s in SCHEMAS] == list(range(1, len(SCHEMAS) + 1))


def ensure_latest(db, path: Path) -> None:
    """Create, check or upgrade the layout. The caller holds the write lock
    (BEGIN IMMEDIATE), so concurrent openers upgrade once, one after the
    other, and a failed upgrade rolls back to the version it found."""
    version = db.execute("PRAGMA user_version").fetchone()[0]
    if version == 0 and not db.execute("SELECT 1 FROM sqlite_master").fetchone():
        for statement in SCHEMAS[0].LAYOUT:
            db.execute(statement)
        version = SCHEMAS[0].VERSION
        db.execute(f"PRAGMA user_version = {version}")
    if version > LATEST:
        raise BadInputError(f"{path}: history database version {version} was written by a newer kvmsplit "
                            f"(this one reads up to version {LATEST}); left as it is")
    elif version < 1:
        raise BadInputError(f"{path}: history database unusable: an SQLite file, but not a kvmsplit history")
    elif version < LATEST:
        for schema in SCHEMAS[version:]:
            schema.upgrade(db)
            db.execute(f"PRAGMA user_version = {schema.VERSION}")
