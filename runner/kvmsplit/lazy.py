"""Modules imported on first use.

Some libraries cost a large share of a kvmsplit command's start-up (numpy
0.05-0.1 s, jsonschema 0.1 s with its format checkers, paramiko 0.1-0.4 s
with invoke and asyncio) and are needed only by some commands, or only
after the guest's first line. `np = lazy("numpy")` at the top of a module
keeps the name and the annotations (mypy sees the real module through
`if TYPE_CHECKING: import numpy as np`), and imports it at the first
attribute read.
"""
from __future__ import annotations

import importlib
from types import ModuleType
from typing import Any


class LazyModule:
    def __init__(self, name: str):
        self._name = name
        self._module: ModuleType | None = None

    def __getattr__(self, attr: str) -> Any:     # only for names not yet read
        if self._module is None:
            self._module = importlib.import_module(self._name)
        value = getattr(self._module, attr)
        setattr(self, attr, value)          # later reads are plain attribute reads
        return value

    def __repr__(self) -> str:
        return f"<lazy module {self._name!r}{' (imported)' if self._module else ''}>"


def lazy(name: str) -> Any:
    return LazyModule(name)
