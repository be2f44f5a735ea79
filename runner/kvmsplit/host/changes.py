"""Changes kvmsplit makes to the host, and putting them back.

Today that is hugetlb pool sizes. A run records how many pages IT added to
each pool (never an absolute "original" size, which a concurrent run would
have changed), in a journal of its own, before it changes anything; at the
end it takes exactly those pages back. Two runs at once, or two HostChanges
in one process, therefore never undo each other's pools. Every read-modify-
write of a pool happens under a host-wide lock on that pool.

If a run dies without restoring (SIGKILL, power loss) its journal stays, and
the next run gives those pages back first: a journal whose process is gone
is stale. Journals of live processes are left alone.
"""
from __future__ import annotations

import itertools
import json
import os
import signal
import sys
import tempfile
import threading
from contextlib import ExitStack, contextmanager
from pathlib import Path

from kvmsplit.locks import locked
from kvmsplit.paths import cache_dir

HUGEPAGES = Path("/sys/kernel/mm/hugepages")
MEMINFO = Path("/proc/meminfo")
# what growing a pool must leave of MemAvailable: a scenario must never push the host into OOM
KEEP_AVAILABLE_FRACTION = 8
_counter = itertools.count()


def _pool_file(size_kb: int, name: str) -> Path:
    return HUGEPAGES / f"hugepages-{size_kb}kB" / name


def _read_int(p: Path) -> int:
    return int(p.read_text().strip())


def journal_dir() -> Path:
    return cache_dir() / "host-restore"


def _lock_dir() -> Path:
    """Host-wide, whoever's cache directory a run uses (tests use their own)."""
    run = Path("/run/lock")
    return run if os.access(run, os.W_OK) else Path(tempfile.gettempdir())


@contextmanager
def pool_lock(nr_path: Path | str, wait: bool = True):
    """One kvmsplit at a time reads, decides and writes a given pool; a second
    one says that it waits (the first holds the lock for milliseconds), or
    with wait=False (--no-wait) refuses."""
    name = Path(nr_path).parent.name

    def say() -> None:
        print(f"kvmsplit: waiting for another kvmsplit run to finish changing the {name} pool", file=sys.stderr)
    with ExitStack() as stack:
        try:
            stack.enter_context(locked(_lock_dir() / f"kvmsplit-{name}.lock", wait=wait, waiting=say))
        except BlockingIOError:
            raise PoolBusy(f"another kvmsplit run is changing the {name} pool (--no-wait)") from None
        yield


class PoolBusy(Exception):
    """--no-wait, and another run holds the pool's lock."""


@contextmanager
def signals_held():
    """Ctrl-C and SIGTERM wait until the pools are given back (then they are delivered)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    held = {signal.SIGINT, signal.SIGTERM}
    old = signal.pthread_sigmask(signal.SIG_BLOCK, held)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


def _mem_available() -> int | None:
    try:
        for line in MEMINFO.read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


class HostChanges:
    def __init__(self, allowed: bool = True, journal: Path | None = None, wait: bool = True):
        self.allowed = allowed
        self.wait = wait
        self.journal = journal or journal_dir() / f"{os.getpid()}-{next(_counter)}.json"
        self.added: dict[str, int] = {}        # pool path -> pages this HostChanges added
        self.log: list[str] = []

    # -- hugetlb ----------------------------------------------------------------
    def ensure_hugepages(self, size_kb: int, count: int) -> str | None:
        """Make `count` free huge pages of `size_kb` available. Returns None on
        success or the reason it cannot (for a SKIP)."""
        nr = _pool_file(size_kb, "nr_hugepages")
        if not nr.exists():
            return f"this kernel has no {size_kb // 1024}M hugetlb pool"
        label = f"{size_kb // 1024}M"
        try:
            with pool_lock(nr, self.wait):
                return self._ensure(nr, size_kb, count, label)
        except PoolBusy as e:
            return str(e)

    def _ensure(self, nr: Path, size_kb: int, count: int, label: str) -> str | None:
        free = self._unreserved(size_kb)
        if free >= count:
            return None
        need = count - free
        if not self.allowed:
            return (f"hugetlb {label} pool has {free} free pages, {count} needed, and host "
                    "changes are not allowed (--no-host-changes)")
        if not os.access(nr, os.W_OK):
            return f"hugetlb {label} pool has {free} free pages, {count} needed, and {nr} is not writable"
        why = self._too_big(need, size_kb, label)
        if why:
            return why
        self._grow(nr, need, label)
        if self._unreserved(size_kb) < count:
            return (f"hugetlb {label} pool could only grow to {_read_int(nr)} pages, {count} free "
                    "needed (memory too fragmented or too small)")
        return None

    @staticmethod
    def _unreserved(size_kb: int) -> int:
        """Free pages nobody has reserved yet: a concurrent run's mapping reserves
        its pages before it touches them, and those are not ours to count."""
        free = _read_int(_pool_file(size_kb, "free_hugepages"))
        resv = _pool_file(size_kb, "resv_hugepages")
        return free - (_read_int(resv) if resv.exists() else 0)

    @staticmethod
    def _too_big(pages: int, size_kb: int, label: str) -> str | None:
        avail = _mem_available()
        want = pages * size_kb * 1024
        if avail is not None and want > avail - avail // KEEP_AVAILABLE_FRACTION:
            return (f"hugetlb {label} pool would need {pages} more pages ({want >> 20} MiB) but the host "
                    f"has {avail >> 20} MiB available; not growing it (that would starve the host)")
        return None

    def _grow(self, nr: Path, need: int, label: str) -> None:
        cur = _read_int(nr)
        key = str(nr)
        # the journal says so before the pool changes: a kill in between gives back at most too much
        self._remember(key, self.added.get(key, 0) + need)
        nr.write_text(f"{cur + need}\n")
        got = _read_int(nr) - cur
        self._remember(key, self.added.get(key, 0) - need + max(got, 0))
        self.log.append(f"hugetlb {label} pool {cur} -> {cur + got} pages (+{got} by this run)")

    # -- restore ----------------------------------------------------------------
    def _remember(self, path: str, added: int) -> None:
        self.added[path] = added
        self.journal.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.journal.with_name(self.journal.name + ".tmp")
        tmp.write_text(json.dumps({"pid": os.getpid(), "added": self.added}))
        os.replace(tmp, self.journal)

    def restore(self) -> list[str]:
        """Give back what this run added, with Ctrl-C/SIGTERM held off meanwhile,
        and say what was actually given back."""
        with signals_held():
            done = _give_back(self.added)
            if done is None:
                return []           # keep the journal so the next run retries (already warned)
            self.added = {}
            self.journal.unlink(missing_ok=True)
        if done:
            print(f"kvmsplit: host restored: {'; '.join(done)}", file=sys.stderr)
        return done

    def __enter__(self):
        recover_stale()
        return self

    def __exit__(self, *exc):
        self.restore()


def _give_back(added: dict[str, int]) -> list[str] | None:
    """Take back the pages a run added; None if a pool could not be written."""
    done = []
    for path, pages in added.items():
        if pages <= 0:
            continue
        p = Path(path)
        try:
            with pool_lock(p):
                cur = _read_int(p)
                p.write_text(f"{max(cur - pages, 0)}\n")
        except OSError as e:
            print(f"kvmsplit: warning: could not give {pages} pages back to {path}: {e.strerror}",
                  file=sys.stderr)
            return None
        done.append(f"hugetlb {p.parent.name} pool {cur} -> {max(cur - pages, 0)} (-{pages} added by this run)")
    return done


def _alive(pid: int | None) -> bool:
    """Our own pid counts as alive: another HostChanges of this process owns that journal."""
    return bool(pid) and (pid == os.getpid() or Path(f"/proc/{pid}").exists())


def recover_stale(journal: Path | None = None) -> list[str]:
    """Give back what dead kvmsplit runs added: one journal, or every journal
    in the journal directory (and the single journal of kvmsplit before 0.2)."""
    paths = [journal] if journal else [*sorted(journal_dir().glob("*.json")), cache_dir() / "host-restore.json"]
    done: list[str] = []
    for path in paths:
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if _alive(data.get("pid")):
            continue        # that run is still going
        added = {k: int(v) for k, v in data.get("added", {}).items()}
        got = _give_back(added) if added else _restore_absolute(data.get("original", {}))
        if got is not None:
            path.unlink(missing_ok=True)
            done += got
    if done:
        print(f"kvmsplit: gave back what an interrupted run left: {'; '.join(done)}", file=sys.stderr)
    return done


def _restore_absolute(original: dict) -> list[str] | None:
    """The old journal format: absolute pool sizes (written by kvmsplit 0.1)."""
    done = []
    for path, value in original.items():
        try:
            Path(path).write_text(f"{int(value)}\n")
        except OSError:
            return None
        done.append(f"{path} = {value}")
    return done
