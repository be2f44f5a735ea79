"""One kvmsplit at a time: an exclusive flock on a lock file. The kernel drops
the lock when its holder dies, so a killed run never leaves a stale lock."""
from __future__ import annotations

import fcntl
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def locked(path: Path, *, wait: bool = True, waiting: Callable[[], None] | None = None) -> Iterator[None]:
    """Hold an exclusive flock on `path` (created if missing). If another holds
    it: call `waiting()` and wait, or with wait=False raise BlockingIOError."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if not wait:
                raise
            if waiting:
                waiting()
            fcntl.flock(f, fcntl.LOCK_EX)
        yield
