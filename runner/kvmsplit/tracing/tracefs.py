"""tracefs, read through a private trace instance per session.

A `TraceSession` makes its own instance (`instances/kvmsplit-<pid>-<n>-<random>`):
its own ring buffer, options, filters and enabled events, so sessions in one
process or in many never see or disturb each other's, nor the top-level
buffer a person may be using. Events are filtered in the kernel (only huge
mappings, only new shadow pages, only the threads of one process, via
`set_event_pid` + `event-fork`) and again by TGID when parsed.

`take()` drains the instance's `trace_pipe` (a consuming read: an event
written while we read stays for the next take, none falls between a read and
a clear) and counts what the kernel dropped from the per-CPU `stats`.

If no tracefs is mounted, a session mounts one at a private temporary
directory and unmounts it on close. A debugfs `tracing/` directory is not
touched: looking into it would automount tracefs there and leave it mounted;
once mounted it shows in /proc/mounts as tracefs and is used like any other.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import errno
import itertools
import os
import re
import secrets
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kvmsplit.errors import UnavailableError

from .events import GET_PAGE, SET_SPTE, SPLIT, PhaseTrace

SYSTEM = "kvmmmu"


@dataclass(frozen=True)
class EventSpec:
    """One tracepoint to enable, with its in-kernel filter ('' for none)."""
    system: str
    name: str
    filter: str = ""


# No per-4K events: new shadow pages only, huge leaf SPTEs only, every split.
DEFAULT: tuple[EventSpec, ...] = (
    EventSpec(SYSTEM, SPLIT),
    EventSpec(SYSTEM, GET_PAGE, "created == 1"),
    EventSpec(SYSTEM, SET_SPTE, "level > 1"),
)

PREFERRED_MOUNTS = ("/sys/kernel/tracing", "/sys/kernel/debug/tracing")
BUFFER_KB_PER_CPU = 8192          # ~150k filtered events per CPU between two takes
BUFFER_KB_TOTAL = 256 * 1024      # ... but no more than this over all CPUs
MNT_DETACH = 2

_counter = itertools.count()


class TracingUnavailable(UnavailableError):
    """Kernel tracing cannot be used here; `reason` says why in one line."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


def _unescape(field: str) -> str:
    """A /proc/mounts field: spaces, tabs, newlines and backslashes are octal escapes."""
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m[1], 8)), field)


# <pid>, then the pid namespace the pid belongs to: tracefs instances are global, and a
# kvmsplit in another pid namespace (a container, a test's "remote box") must not take a pid
# it cannot see for a dead one. Names without the namespace are from older versions.
PRIVATE_MOUNT = re.compile(r"kvmsplit-tracefs-(\d+)-(?:ns(\d+)-)?")
INSTANCE = re.compile(r"kvmsplit-(\d+)-\w*\d+-[0-9a-f]{6}(?:-ns(\d+))?")


def tracefs_mounts(mounts: str) -> list[str]:
    points = []
    for line in mounts.splitlines():
        parts = line.split()
        if len(parts) >= 3 and parts[2] == "tracefs":
            points.append(_unescape(parts[1]))
    return points


def find_tracefs(mounts: str) -> str | None:
    """The tracefs mount point to use from /proc/mounts text, or None (the usual place first).
    Another kvmsplit's private mount is not ours to use: it unmounts it when it ends."""
    points = [p for p in tracefs_mounts(mounts) if not PRIVATE_MOUNT.match(Path(p).name)]
    for p in PREFERRED_MOUNTS:
        if p in points:
            return p
    return points[0] if points else None


def _alive(pid: int) -> bool:
    return Path(f"/proc/{pid}").exists()


def pid_namespace() -> int:
    """The inode of this process's pid namespace (0 where /proc/self/ns is unreadable)."""
    try:
        return os.stat("/proc/self/ns/pid").st_ino
    except OSError:
        return 0


def _dead(pid: str, ns: str | None) -> bool:
    """A pid of another pid namespace is not ours to judge: never dead."""
    return (ns is None or int(ns) == pid_namespace()) and not _alive(int(pid))


def recover_stale(mounts_path: str = "/proc/mounts") -> list[str]:
    """Undo what a kvmsplit killed outright (SIGKILL, power loss) left in tracefs:
    its trace instances, and the private tracefs it had mounted. What live
    processes own is left alone. Returns what was done."""
    try:
        points = tracefs_mounts(Path(mounts_path).read_text())
    except OSError:
        return []
    done = []
    for point in points:
        owner = PRIVATE_MOUNT.match(Path(point).name)
        dead_mount = owner is not None and _dead(owner[1], owner[2])
        for name in leftover_instances(point):
            inst = INSTANCE.fullmatch(name)
            assert inst is not None                     # leftover_instances() matched it
            if dead_mount or _dead(inst[1], inst[2]):
                try:
                    os.rmdir(Path(point) / "instances" / name)
                    done.append(f"trace instance {name}")
                except OSError:
                    pass
        if dead_mount:
            try:
                _umount(point)
                os.rmdir(point)
                done.append(f"tracefs mount {point}")
            except OSError:
                pass
    return done + _remove_unmounted_dirs(set(points))


def _remove_unmounted_dirs(mounted: set[str]) -> list[str]:
    """A private mount point whose tracefs is already gone (its mount namespace ended with a
    killed run) is an empty directory left in the temp dir: removed once its owner is dead."""
    done = []
    tmp = Path(tempfile.gettempdir())
    for d in tmp.glob("kvmsplit-tracefs-*"):
        owner = PRIVATE_MOUNT.match(d.name)
        if owner is None or str(d) in mounted or not _dead(owner[1], owner[2]):
            continue
        try:
            d.rmdir()                   # only ever an empty directory
            done.append(f"empty tracefs mount point {d}")
        except OSError:
            pass
    return done


def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)


def _mount_tracefs(target: str) -> None:
    if _libc().mount(b"nodev", os.fsencode(target), b"tracefs", 0, None) != 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e), target)


def _umount(target: str) -> None:
    if _libc().umount2(os.fsencode(target), MNT_DETACH) != 0:
        e = ctypes.get_errno()
        if e not in (errno.EINVAL, errno.ENOENT):      # EINVAL: not a mount point (any more)
            raise OSError(e, os.strerror(e), target)


def _why(e: OSError) -> str:
    if isinstance(e, PermissionError):
        return f"{e.strerror} (tracing needs root)"
    return e.strerror or str(e)


class Tracefs:
    """A tracefs root: one already mounted, or one this object mounted (and will unmount)."""

    def __init__(self, root: Path, mounted_here: bool = False):
        self.root = root
        self.mounted_here = mounted_here

    @classmethod
    def open(cls, root: str | os.PathLike[str] | None = None, *, private: bool = False,
             mounts: str = "/proc/mounts") -> Tracefs:
        """`root` given: use it. Else a mounted tracefs, else (or with private=True) mount one."""
        if root is not None:
            cls._check(Path(root))
            return cls(Path(root))
        if not private:
            recover_stale(mounts)
            try:
                found = find_tracefs(Path(mounts).read_text())
            except OSError as e:
                raise TracingUnavailable(f"cannot read {mounts}: {e.strerror}") from None
            if found:
                cls._check(Path(found))
                return cls(Path(found))
        return cls._mount()

    @staticmethod
    def _check(root: Path) -> None:
        try:
            os.stat(root / "instances")
        except FileNotFoundError:
            what = "no such directory" if not root.exists() else "not a tracefs (no instances/)"
            raise TracingUnavailable(f"{root}: {what}") from None
        except OSError as e:
            raise TracingUnavailable(f"{root}: {_why(e)}") from None

    @classmethod
    def _mount(cls) -> Tracefs:
        try:
            have = "tracefs" in Path("/proc/filesystems").read_text().split()
        except OSError:
            have = False
        if not have:
            raise TracingUnavailable("the kernel has no tracefs (CONFIG_TRACING off?)")
        d = tempfile.mkdtemp(prefix=f"kvmsplit-tracefs-{os.getpid()}-ns{pid_namespace()}-")  # see recover_stale()
        try:
            _mount_tracefs(d)
        except OSError as e:
            os.rmdir(d)
            raise TracingUnavailable(f"cannot mount tracefs at {d}: {_why(e)}") from None
        return cls(Path(d), mounted_here=True)

    def close(self) -> None:
        """Unmount and remove the directory if this object mounted it; idempotent."""
        if self.mounted_here:
            _umount(str(self.root))
            try:
                os.rmdir(self.root)
            except FileNotFoundError:
                pass
            self.mounted_here = False

    def events(self, specs: tuple[EventSpec, ...] = DEFAULT) -> list[EventSpec]:
        """The specs whose tracepoints this kernel has."""
        return [s for s in specs if (self.root / "events" / s.system / s.name / "enable").exists()]


def probe(root: str | os.PathLike[str] | None = None, specs: tuple[EventSpec, ...] = DEFAULT, *,
          private: bool = False) -> dict[str, Any]:
    """For `kvmsplit probe`: can a TraceSession run here? Makes and removes a trace instance to
    find out, and leaves nothing mounted. `mounted` is the tracefs already mounted (None if it
    had to mount one of its own, or none could be used)."""
    out: dict[str, Any] = {"available": False, "reason": None, "mounted": None, "events": []}
    try:
        fs = Tracefs.open(root, private=private)
    except TracingUnavailable as e:
        out["reason"] = e.reason
        return out
    try:
        if not fs.mounted_here:
            out["mounted"] = str(fs.root)
        out["events"] = [s.name for s in fs.events(specs)]
        if not out["events"]:
            out["reason"] = f"no {SYSTEM} trace events under {fs.root}/events (kvm module not loaded?)"
            return out
        inst = fs.root / "instances" / _instance_name("probe")
        try:
            os.mkdir(inst)
            os.rmdir(inst)
        except OSError as e:
            out["reason"] = f"cannot make a trace instance in {fs.root}: {_why(e)}"
            return out
        out["available"] = True
        return out
    finally:
        fs.close()


def _instance_name(kind: str = "") -> str:
    return f"kvmsplit-{os.getpid()}-{kind}{next(_counter)}-{secrets.token_hex(3)}-ns{pid_namespace()}"


def _write(path: Path, value: str) -> None:
    with open(path, "w") as f:
        f.write(value)


def _cpu_stats(instance: Path) -> dict[str, int]:
    """Per-CPU ring buffer counters summed: events overwritten or dropped."""
    tot = {"overrun": 0, "commit overrun": 0, "dropped events": 0}
    for stats in (instance / "per_cpu").glob("cpu*/stats"):
        try:
            text = stats.read_text()
        except OSError:
            continue
        for line in text.splitlines():
            k, _, v = line.partition(":")
            if k.strip() in tot and v.strip().isdigit():
                tot[k.strip()] += int(v)
    return tot


@dataclass(frozen=True)
class RawTake:
    text: str       # what trace_pipe gave: events of every process the buffer held
    lost: int       # events the kernel dropped since the last take (per-CPU stats)


class TraceSession:
    """kvmmmu events of one process, phase by phase, in a private trace instance.

        with TraceSession(tgid) as ts:
            ...                         # phase 1
            p1 = ts.take()              # PhaseTrace of what happened since the session opened
            ...                         # phase 2
            p2 = ts.take()              # ... since the last take

    tgid None: this process. root: a tracefs root to use (default: found or mounted).
    private_mount: mount a tracefs of our own even if one is mounted. buffer_kb: per CPU.
    filter_pids: also filter in the kernel (set_event_pid + event-fork), so other processes'
    events never take buffer space. fields: print raw fields where the kernel can (the role
    word, hence guest_mode); else the events' print formats.
    Raises TracingUnavailable from open() (and __enter__) with one line saying why.
    close() always removes the instance, is idempotent, and is safe in a finally block after a
    KeyboardInterrupt, also one that struck during open(), take() or an earlier close().
    """

    def __init__(self, tgid: int | None = None, events: tuple[EventSpec, ...] = DEFAULT, *,
                 root: str | os.PathLike[str] | None = None, private_mount: bool = False,
                 buffer_kb: int | None = None, filter_pids: bool = True, fields: bool = True):
        self.tgid = os.getpid() if tgid is None else tgid
        self.specs = events
        self.root = root
        self.private_mount = private_mount
        self.buffer_kb = buffer_kb
        self.filter_pids = filter_pids
        self.want_fields = fields
        self.fs: Tracefs | None = None
        self.instance: Path | None = None
        self.enabled: list[str] = []         # "system/name" of events enabled
        self.fields = False                  # raw fields (role word: guest_mode) in the output
        self._stats = {"overrun": 0, "commit overrun": 0, "dropped events": 0}
        self._closed = False

    # -- set-up ---------------------------------------------------------------------------

    def open(self) -> TraceSession:
        if self._closed:
            raise ValueError("TraceSession is closed")
        if self.instance is not None:
            return self
        try:
            self._open()
        except BaseException as e:
            try:
                self.close()
            except Exception as c:
                e.add_note(f"and removing the half-made trace instance failed: {c}")
            raise
        return self

    def _open(self) -> None:
        self.fs = Tracefs.open(self.root, private=self.private_mount)
        specs = self.fs.events(self.specs)
        if not specs:
            raise TracingUnavailable(
                f"no {SYSTEM} trace events under {self.fs.root}/events (kvm module not loaded?)")
        inst = self.fs.root / "instances" / _instance_name()
        self.instance = inst                # before mkdir: an interrupt after it still gets rmdir
        try:
            os.mkdir(inst)
        except OSError as e:
            raise TracingUnavailable(f"cannot make a trace instance in {self.fs.root}: {_why(e)}") from None
        try:
            self._configure(inst, specs)
        except OSError as e:
            raise TracingUnavailable(f"cannot set up trace instance {inst}: {_why(e)}") from None
        self._stats = _cpu_stats(inst)

    def _configure(self, inst: Path, specs: list[EventSpec]) -> None:
        _write(inst / "options" / "record-tgid", "1")
        if self.want_fields and (inst / "options" / "fields").exists():
            _write(inst / "options" / "fields", "1")
            self.fields = True
        self._size_buffer(inst)
        if self.filter_pids and (inst / "set_event_pid").exists():
            self._follow(inst)
        for s in specs:
            d = inst / "events" / s.system / s.name
            if s.filter:
                try:
                    _write(d / "filter", s.filter)
                except OSError as e:
                    raise OSError(e.errno, f"filter {s.filter!r} on {s.name} refused: {e.strerror}") from None
            _write(d / "enable", "1")
            self.enabled.append(f"{s.system}/{s.name}")

    def _size_buffer(self, inst: Path) -> None:
        ncpu = len(list((inst / "per_cpu").glob("cpu*"))) or os.cpu_count() or 1
        kb = self.buffer_kb or max(1024, min(BUFFER_KB_PER_CPU, BUFFER_KB_TOTAL // ncpu))
        try:
            _write(inst / "buffer_size_kb", str(kb))
        except OSError as e:
            if e.errno != errno.ENOMEM:
                raise                       # ENOMEM: the default size still works, smaller

    def _follow(self, inst: Path) -> None:
        """Record only the process's threads, and the ones they make (event-fork)."""
        _write(inst / "options" / "event-fork", "1")
        seen: set[int] = set()
        while True:                         # a thread made while we wrote was made by one we listed
            try:                            # before it was followed: list again until nothing is new
                tids = {int(t) for t in os.listdir(f"/proc/{self.tgid}/task")}
            except FileNotFoundError:
                tids = {self.tgid}          # gone (or not yet): its pid still filters
            new = tids - seen
            if not new:
                return
            fd = os.open(inst / "set_event_pid", os.O_WRONLY | os.O_APPEND)   # append: keep the ones before
            try:
                os.write(fd, (" ".join(map(str, sorted(new))) + "\n").encode())
            finally:
                os.close(fd)
            seen |= new

    def __enter__(self) -> TraceSession:
        return self.open()

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc is None:
            self.close()
            return
        try:
            self.close()
        except Exception as e:          # never hide the exception that is unwinding
            exc.add_note(f"and closing the trace session failed: {e}")

    # -- reading --------------------------------------------------------------------------

    def take_raw(self) -> RawTake:
        """Everything in the buffer since the last take, consumed, and how much was dropped."""
        if self.instance is None or self._closed:
            raise ValueError("TraceSession is not open")
        chunks = []
        fd = os.open(self.instance / "trace_pipe", os.O_RDONLY | os.O_NONBLOCK)
        try:
            while True:
                try:
                    b = os.read(fd, 1 << 16)
                except BlockingIOError:
                    break
                if not b:
                    break
                chunks.append(b)
        finally:
            os.close(fd)
        now = _cpu_stats(self.instance)
        lost = sum(max(0, now[k] - self._stats.get(k, 0)) for k in now)
        self._stats = now
        return RawTake(b"".join(chunks).decode(errors="replace"), lost)

    def take(self) -> PhaseTrace:
        """The process's kvmmmu events since the session opened or the last take, summarised."""
        raw = self.take_raw()
        return PhaseTrace.from_text(raw.text, self.tgid, lost=raw.lost)

    # -- tear-down ------------------------------------------------------------------------

    def close(self) -> None:
        """Disable the events, remove the instance, unmount what we mounted. Idempotent.
        Every step tolerates having been done already, so a close() cut short (a second
        Ctrl-C) can simply be called again."""
        if self._closed:
            return
        failure: OSError | None = None
        what = ""
        inst = self.instance
        if inst is not None:
            for name in self.enabled:
                try:
                    _write(inst / "events" / name / "enable", "0")
                except OSError:
                    pass                    # the instance's removal disables them anyway
            for attempt in range(5):
                try:
                    os.rmdir(inst)
                    failure = None
                    break
                except FileNotFoundError:
                    failure = None
                    break
                except OSError as e:        # EBUSY: someone has a file of this instance open
                    failure, what = e, f"remove trace instance {inst}"
                    if e.errno != errno.EBUSY:
                        break
                    time.sleep(0.02 * (attempt + 1))
        if self.fs is not None:
            try:
                self.fs.close()
            except OSError as e:
                if failure is None:
                    failure, what = e, f"unmount {self.fs.root}"
        if failure is not None:
            raise TracingUnavailable(f"cannot {what}: {_why(failure)}")
        self._closed = True

    @property
    def closed(self) -> bool:
        return self._closed


def leftover_instances(root: str | os.PathLike[str]) -> list[str]:
    """Instances named by kvmsplit sessions under a tracefs root (for checks and clean-ups)."""
    d = Path(root) / "instances"
    try:
        return sorted(n for n in os.listdir(d) if INSTANCE.fullmatch(n))
    except OSError:
        return []
