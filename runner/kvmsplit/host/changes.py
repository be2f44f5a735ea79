"""Changes kvmsplit makes to the host, and putting them back.

Today that is hugetlb pool sizes. Before the first change the original value
is written to a journal file; restore() puts it back and deletes the journal.
If a run dies without restoring (SIGKILL, power loss) the next run finds the
journal and restores first, so the host is never left changed for long.
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from kvmsplit.paths import cache_dir

HUGEPAGES = Path("/sys/kernel/mm/hugepages")


def _pool_file(size_kb: int, name: str) -> Path:
    return HUGEPAGES / f"hugepages-{size_kb}kB" / name


def _read_int(p: Path) -> int:
    return int(p.read_text().strip())


class HostChanges:
    def __init__(self, allowed: bool = True, journal: Path | None = None):
        self.allowed = allowed
        self.journal = journal or cache_dir() / "host-restore.json"
        self.original: dict[str, int] = {}     # path -> value before kvmsplit touched it
        self.log: list[str] = []

    # -- hugetlb ----------------------------------------------------------------
    def ensure_hugepages(self, size_kb: int, count: int) -> str | None:
        """Make `count` free huge pages of `size_kb` available. Returns None on
        success or the reason it cannot (for a SKIP)."""
        nr = _pool_file(size_kb, "nr_hugepages")
        if not nr.exists():
            return f"this kernel has no {size_kb // 1024}M hugetlb pool"
        free = _read_int(_pool_file(size_kb, "free_hugepages"))
        if free >= count:
            return None
        label = f"{size_kb // 1024}M"
        if not self.allowed:
            return (f"hugetlb {label} pool has {free} free pages, {count} needed, and host "
                    "changes are not allowed (--no-host-changes)")
        if not os.access(nr, os.W_OK):
            return f"hugetlb {label} pool has {free} free pages, {count} needed, and {nr} is not writable"
        cur = _read_int(nr)
        self._remember(nr, cur)
        want = cur + (count - free)
        nr.write_text(f"{want}\n")
        got = _read_int(nr)
        self.log.append(f"hugetlb {label} pool {cur} -> {got} pages")
        if _read_int(_pool_file(size_kb, "free_hugepages")) < count:
            return (f"hugetlb {label} pool could only grow to {got} of {want} pages "
                    "(memory too fragmented or too small)")
        return None

    # -- restore ----------------------------------------------------------------
    def _remember(self, path: Path, value: int) -> None:
        if str(path) in self.original:
            return
        self.original[str(path)] = value
        tmp = self.journal.with_suffix(".tmp")
        tmp.write_text(json.dumps({"pid": os.getpid(), "original": self.original}))
        os.replace(tmp, self.journal)

    def restore(self) -> list[str]:
        done = []
        for path, value in self.original.items():
            try:
                Path(path).write_text(f"{value}\n")
                done.append(f"{path} = {value}")
            except OSError as e:
                print(f"kvmsplit: warning: could not restore {path} to {value}: {e.strerror}",
                      file=sys.stderr)
                return done      # keep the journal so the next run retries
        self.original = {}
        self.journal.unlink(missing_ok=True)
        return done

    def __enter__(self):
        recover_stale(self.journal)
        return self

    def __exit__(self, *exc):
        self.restore()


def recover_stale(journal: Path | None = None) -> list[str]:
    """Restore what a dead kvmsplit run left changed."""
    journal = journal or cache_dir() / "host-restore.json"
    try:
        data = json.loads(journal.read_text())
    except (OSError, ValueError):
        return []
    pid = data.get("pid")
    if pid and pid != os.getpid() and Path(f"/proc/{pid}").exists():
        return []   # that run is still going
    hc = HostChanges(journal=journal)
    hc.original = {k: int(v) for k, v in data.get("original", {}).items()}
    done = hc.restore()
    if done:
        print(f"kvmsplit: restored host settings left by an interrupted run: {'; '.join(done)}",
              file=sys.stderr)
    return done
