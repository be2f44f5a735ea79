"""Where kvmsplit keeps things: the source tree's guests/, and per-user cache
and data directories (XDG, overridable for CI and tests)."""
from __future__ import annotations

import os
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]


def guests_dir() -> Path:
    return Path(os.environ.get("KVMSPLIT_GUESTS_DIR", REPO_ROOT / "guests"))


def cache_dir() -> Path:
    base = os.environ.get("KVMSPLIT_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "kvmsplit")
    p = Path(base)
    p.mkdir(parents=True, exist_ok=True)
    return p


def data_dir() -> Path:
    base = os.environ.get("KVMSPLIT_DATA_DIR") or os.path.join(
        os.environ.get("XDG_DATA_HOME") or os.path.expanduser("~/.local/share"), "kvmsplit")
    p = Path(base)
    p.mkdir(parents=True, exist_ok=True)
    return p
