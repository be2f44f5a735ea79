"""Where kvmsplit keeps things: the source tree's guests/, and per-user cache
and data directories (XDG, overridable for CI and tests)."""
from __future__ import annotations

import os
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]


def guests_dir() -> Path:
    return Path(os.environ.get("KVMSPLIT_GUESTS_DIR", REPO_ROOT / "guests"))


def _user_dir(override: str, xdg: str, fallback: str) -> Path:
    base = os.environ.get(override) or os.path.join(
        os.environ.get(xdg) or os.path.expanduser(fallback), "kvmsplit")
    p = Path(base)
    p.mkdir(parents=True, exist_ok=True)
    return p


def cache_dir() -> Path:
    """Builds (guests, kernels, selftests): safe to delete."""
    return _user_dir("KVMSPLIT_CACHE_DIR", "XDG_CACHE_HOME", "~/.cache")


def data_dir() -> Path:
    """What a user would miss: the run history."""
    return _user_dir("KVMSPLIT_DATA_DIR", "XDG_DATA_HOME", "~/.local/share")
