"""The history database: every run, stored while it runs (SQLite, one file).

A run is inserted when it starts, with every planned scenario as MISS, and
each scenario is replaced by its result as soon as it finishes; so a run
that is killed outright keeps what it finished, and shows the rest as never
run. Phase times get a table of their own because compare's baseline is
"this phase of this scenario in every earlier run on this host".

The layout is versioned (schema_v1, schema_v2, ...; see migrate): an older
database is upgraded in place when opened, a newer one is refused untouched.
"""
from kvmsplit.runs.history.db import DB_VERSION, History, RunRow, Sample, default_db, stored_headline
from kvmsplit.runs.history.migrate import LATEST, SCHEMAS
from kvmsplit.runs.history.refs import LoadedRun, fmt_time, open_run
from kvmsplit.runs.history.sink import HistorySink

__all__ = ["DB_VERSION", "LATEST", "SCHEMAS", "History", "HistorySink", "LoadedRun", "RunRow", "Sample",
           "default_db", "fmt_time", "open_run", "stored_headline"]
