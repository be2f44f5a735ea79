"""results.json against its JSON Schema, and loading it back into the model.

Every report reads results through load_results(), so a malformed or
foreign file is refused with one line saying where it is wrong, instead of
a KeyError deep inside a report.
"""
from __future__ import annotations

import json
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING

from kvmsplit.errors import BadInputError, read_parsed
from kvmsplit.lazy import lazy
from kvmsplit.runs.results import RunResult

if TYPE_CHECKING:
    import jsonschema
else:
    jsonschema = lazy("jsonschema")     # 0.1 s of start-up; only reading results validates them

SCHEMA_PATH = Path(__file__).with_name("results.schema.json")
_MAX_SHOWN = 200        # characters of a value quoted in an error


@cache
def _validator() -> jsonschema.Draft202012Validator:
    return jsonschema.Draft202012Validator(json.loads(SCHEMA_PATH.read_text()))


def validate(data: dict, where: str = "results") -> None:
    """Raise BadInputError naming the first offending place in data."""
    try:
        err = jsonschema.exceptions.best_match(_validator().iter_errors(data))
    except RecursionError:      # the messages quote values: repr() of one nested too deeply
        raise BadInputError(f"{where}: not kvmsplit results: arrays or objects nested too deeply") from None
    if err is not None:
        at = _shown("/".join(str(p) for p in err.absolute_path)) or "top level"
        raise BadInputError(f"{where}: not kvmsplit results: at {at}: {_shown(err.message)}")


def _shown(text: str) -> str:
    """Text from the file, for a one-line message: escaped, and cut short (the
    message quotes the offending value, which may be the whole file)."""
    text = "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)
    return text if len(text) <= _MAX_SHOWN else text[:_MAX_SHOWN] + "..."


def from_json(data: dict, where: str = "results") -> RunResult:
    validate(data, where)
    return RunResult.from_dict(data)


def results_path(path: str | Path) -> Path:
    """A results.json, or a run's output directory holding one."""
    p = Path(path)
    return p / "results.json" if p.is_dir() else p


def load_results(path: str | Path) -> RunResult:
    p = results_path(path)
    return from_json(read_parsed(p, "results file", json.loads, "JSON"), str(p))
