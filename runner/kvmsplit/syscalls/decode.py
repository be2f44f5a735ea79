"""KVM ioctls as a tracer sees them: which fd, which request, what argument,
and what they add up to (memslot dirty-logging windows, counts, vCPU runs).

Pure: the tracer (ptracer.py) hands in the link text of the fd, the bytes it
read from the tracee's memory and the two timestamps; everything here is
tested without a tracee.

Times are `time.monotonic_ns()` values taken by the tracer when it saw the
syscall-entry and syscall-exit stops, so a call's duration includes two
ptrace round trips (a few to tens of microseconds, see ptracer.py).
"""
from __future__ import annotations

import ctypes as C
import errno as errno_mod
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from kvmsplit.vmm.kvm import uapi

KVMIO = 0xAE
BY_NUMBER: dict[int, uapi.Ioctl] = {io.number: io for io in uapi.IOCTLS.values()}
CAP_NAMES: dict[int, str] = {v: k for k, v in uapi.CAPABILITIES.items()}
EVENTS_CAP = 1000      # events kept in the list; the summary counts them all
# the counts every summary carries, zero or not
COUNTED = ("KVM_GET_DIRTY_LOG", "KVM_CLEAR_DIRTY_LOG", "KVM_RESET_DIRTY_RINGS", "KVM_RUN")
# calls that go into the summary only, never one event each
SUMMARY_ONLY = frozenset({"KVM_RUN"})

# bytes read from the tracee for each decoded argument struct: only the head
# with the fields shown (region2's head is region's layout)
_REGION_HEAD = C.sizeof(uapi.kvm_userspace_memory_region)
READ_SIZE: dict[str, int] = {
    "KVM_SET_USER_MEMORY_REGION": _REGION_HEAD,
    "KVM_SET_USER_MEMORY_REGION2": _REGION_HEAD,
    "KVM_GET_DIRTY_LOG": C.sizeof(uapi.kvm_dirty_log),
    "KVM_CLEAR_DIRTY_LOG": C.sizeof(uapi.kvm_clear_dirty_log),
    "KVM_ENABLE_CAP": C.sizeof(uapi.kvm_enable_cap),
}
KVM_RUN_EXIT_REASON = uapi.kvm_run.exit_reason.offset


def is_kvm_request(request: int) -> bool:
    """The ioctl type byte is KVMIO: worth looking at the fd."""
    return (request >> 8) & 0xFF == KVMIO


def fd_kind(link: str) -> str | None:
    """'system', 'vm' or 'vcpu' from /proc/PID/fd/N's link text; None for anything else."""
    if link == "/dev/kvm":
        return "system"
    if link == "anon_inode:kvm-vm":
        return "vm"
    if link.startswith("anon_inode:kvm-vcpu:"):
        return "vcpu"
    return None


def ioctl_name(request: int) -> str:
    io = BY_NUMBER.get(request & 0xFFFFFFFF)
    return io.name if io else f"KVM_IOC_{request & 0xFFFFFFFF:#x}"


def cap_name(cap: int) -> str:
    return CAP_NAMES.get(cap, str(cap))


def decode_args(name: str, arg: int, data: bytes | None) -> dict[str, Any]:
    """The fields shown for one call, from the integer argument and (for a
    struct argument) the bytes read at `arg` when the call entered."""
    if name in ("KVM_CHECK_EXTENSION",):
        return {"cap": cap_name(arg)}
    if name == "KVM_CREATE_VCPU":
        return {"vcpu_id": arg}
    if data is None or name not in READ_SIZE or len(data) < READ_SIZE[name]:
        return {}
    if name in ("KVM_SET_USER_MEMORY_REGION", "KVM_SET_USER_MEMORY_REGION2"):
        r = uapi.kvm_userspace_memory_region.from_buffer_copy(data[:_REGION_HEAD])
        return {"slot": r.slot, "flags": r.flags, "guest_phys_addr": r.guest_phys_addr,
                "memory_size": r.memory_size}
    if name == "KVM_GET_DIRTY_LOG":
        d = uapi.kvm_dirty_log.from_buffer_copy(data)
        return {"slot": d.slot}
    if name == "KVM_CLEAR_DIRTY_LOG":
        c = uapi.kvm_clear_dirty_log.from_buffer_copy(data)
        return {"slot": c.slot, "first_page": c.first_page, "num_pages": c.num_pages}
    if name == "KVM_ENABLE_CAP":
        e = uapi.kvm_enable_cap.from_buffer_copy(data)
        return {"cap": cap_name(e.cap), "cap_flags": e.flags, "args": list(e.args)}
    return {}


def _ms(ns: int) -> float:
    return round(ns / 1e6, 3)


def _us(ns: int) -> float:
    return round(ns / 1e3, 1)


@dataclass
class Call:
    """One KVM ioctl, from its entry stop to its exit stop."""
    tgid: int
    tid: int
    fd: int
    kind: str               # system | vm | vcpu
    link: str
    name: str
    request: int
    arg: int
    t_entry: int
    args: dict[str, Any] = field(default_factory=dict)
    t_exit: int | None = None
    ret: int | None = None
    run_exit: str | None = None     # KVM_RUN: kvm_run.exit_reason, when it could be read


@dataclass
class _Slot:
    tgid: int
    vm_fd: int
    vm_gen: int
    slot: int
    guest_phys_addr: int = 0
    memory_size: int = 0
    flags: int = 0
    logging: bool = False
    windows: list[dict[str, Any]] = field(default_factory=list)
    get_dirty_log: int = 0
    clear_dirty_log: int = 0
    cleared_pages: int = 0

    def to_dict(self, t0: int) -> dict[str, Any]:
        return {"pid": self.tgid, "vm_fd": self.vm_fd, "vm": self.vm_gen, "slot": self.slot,
                "guest_phys_addr": self.guest_phys_addr, "memory_size": self.memory_size,
                "flags": self.flags, "dirty_log_windows": [_window(w, t0) for w in self.windows],
                "get_dirty_log": self.get_dirty_log, "clear_dirty_log": self.clear_dirty_log,
                "cleared_pages": self.cleared_pages}


def _window(w: dict[str, Any], t0: int) -> dict[str, Any]:
    on, off = w["on"], w.get("off")
    return {"enabled_ms": _ms(on - t0), "disabled_ms": None if off is None else _ms(off - t0),
            "duration_ms": None if off is None else _ms(off - on),
            "enable_ioctl_us": w["enable_us"], "disable_ioctl_us": w.get("disable_us"),
            "ended_by": w.get("ended_by")}


@dataclass
class _Vcpu:
    tgid: int
    tid: int
    fd: int
    link: str
    runs: int = 0
    run_ns: int = 0
    exits: Counter = field(default_factory=Counter)


class Recorder:
    """What the KVM ioctls of the traced processes add up to.

    A memslot is (pid, VM fd, VM generation, slot): the generation counts
    KVM_CREATE_VMs that returned that fd number in that process, so a VM
    made after another one was closed is never merged with it. A dirty-logging
    window opens when a successful KVM_SET_USER_MEMORY_REGION(2) turns
    KVM_MEM_LOG_DIRTY_PAGES on and closes when one turns it off or deletes
    the slot; both ends are the times those ioctls returned.
    """

    def __init__(self, t0: int, events_cap: int = EVENTS_CAP):
        self.t0 = t0
        self.events_cap = events_cap
        self.events: list[dict[str, Any]] = []
        self.events_dropped = 0
        self.counts: Counter = Counter()
        self.errors: Counter = Counter()
        self.time_ns: Counter = Counter()
        self.max_ns: Counter = Counter()
        self.slots: dict[tuple[int, int, int, int], _Slot] = {}
        self.vm_gen: Counter = Counter()
        self.vcpus: dict[tuple[int, int, int], _Vcpu] = {}
        self.caps: list[dict[str, Any]] = []

    # -- one call ----------------------------------------------------------
    def finish(self, c: Call) -> dict[str, Any] | None:
        """Account a call whose exit was seen; the event it makes (None for
        KVM_RUN, which is summarised only)."""
        assert c.t_exit is not None and c.ret is not None
        dur = c.t_exit - c.t_entry
        self.counts[c.name] += 1
        self.time_ns[c.name] += dur
        self.max_ns[c.name] = max(self.max_ns[c.name], dur)
        ok = c.ret >= 0
        if not ok:
            self.errors[c.name] += 1
        ev: dict[str, Any] = {"t_ms": _ms(c.t_entry - self.t0), "pid": c.tgid, "tid": c.tid, "fd": c.fd,
                              "on": c.kind, "ioctl": c.name, "us": _us(dur), "ret": c.ret, **c.args}
        if not ok:
            ev["errno"] = errno_mod.errorcode.get(-c.ret, str(-c.ret))
        if c.name == "KVM_CREATE_VM" and ok:
            self.vm_gen[(c.tgid, c.ret)] += 1
            self._close_vm(c.tgid, c.ret, c.t_exit, "vm fd reused")
        elif c.name == "KVM_RUN":
            self._run(c, dur)
            return None
        elif ok and c.name in ("KVM_SET_USER_MEMORY_REGION", "KVM_SET_USER_MEMORY_REGION2") and "slot" in c.args:
            change = self._set_region(c, dur)
            if change:
                ev["dirty_log"] = change
        elif c.name == "KVM_GET_DIRTY_LOG" and "slot" in c.args:
            self._slot(c).get_dirty_log += 1
        elif c.name == "KVM_CLEAR_DIRTY_LOG" and "slot" in c.args:
            s = self._slot(c)
            s.clear_dirty_log += 1
            if ok:
                s.cleared_pages += c.args["num_pages"]
        elif c.name == "KVM_ENABLE_CAP" and "cap" in c.args:
            self.caps.append({"t_ms": ev["t_ms"], "pid": c.tgid, "fd": c.fd, "on": c.kind, "cap": c.args["cap"],
                              "args": c.args["args"], "ret": c.ret, "us": ev["us"]})
        self._keep(ev)
        return ev

    def _keep(self, ev: dict[str, Any]) -> None:
        if len(self.events) < self.events_cap:
            self.events.append(ev)
        else:
            self.events_dropped += 1

    def _slot(self, c: Call) -> _Slot:
        gen = self.vm_gen.get((c.tgid, c.fd), 0)
        key = (c.tgid, c.fd, gen, c.args["slot"])
        s = self.slots.get(key)
        if s is None:
            s = self.slots[key] = _Slot(c.tgid, c.fd, gen, c.args["slot"])
        return s

    def _set_region(self, c: Call, dur: int) -> str | None:
        assert c.t_exit is not None
        s = self._slot(c)
        flags, size = c.args["flags"], c.args["memory_size"]
        log = bool(flags & uapi.MEM_LOG_DIRTY_PAGES) and size != 0
        change = None
        if log and not s.logging:
            s.windows.append({"on": c.t_exit, "enable_us": _us(dur)})
            change = "on"
        elif s.logging and not log:
            s.windows[-1].update(off=c.t_exit, disable_us=_us(dur), ended_by="flags" if size else "slot deleted")
            change = "off"
        s.logging = log
        if size:
            s.flags, s.guest_phys_addr, s.memory_size = flags, c.args["guest_phys_addr"], size
        return change

    def _close_vm(self, tgid: int, fd: int, t: int, why: str) -> None:
        for s in self.slots.values():
            if s.tgid == tgid and s.vm_fd == fd and s.logging:
                s.windows[-1].update(off=t, ended_by=why)
                s.logging = False

    def _run(self, c: Call, dur: int) -> None:
        v = self.vcpus.get((c.tgid, c.tid, c.fd))
        if v is None:
            v = self.vcpus[(c.tgid, c.tid, c.fd)] = _Vcpu(c.tgid, c.tid, c.fd, c.link.removeprefix("anon_inode:"))
        v.runs += 1
        v.run_ns += dur
        ret = c.ret or 0
        v.exits[c.run_exit if ret == 0 and c.run_exit else
                "EINTR" if ret == -errno_mod.EINTR else
                "error" if ret < 0 else "unread"] += 1

    def process_gone(self, tgid: int, t: int) -> None:
        """A traced process ended: its VMs went with it."""
        for s in self.slots.values():
            if s.tgid == tgid and s.logging:
                s.windows[-1].update(off=t, ended_by="process exit")
                s.logging = False

    # -- the summary -------------------------------------------------------
    def summary(self) -> dict[str, Any]:
        counts = {n: 0 for n in COUNTED} | dict(sorted(self.counts.items()))
        return {
            "counts": counts,
            "errors": dict(self.errors),
            "ioctl_time_us": {n: {"count": self.counts[n], "total": _us(self.time_ns[n]), "max": _us(self.max_ns[n])}
                              for n in sorted(self.counts)},
            "memslots": [s.to_dict(self.t0) for s in sorted(self.slots.values(),
                                                             key=lambda s: (s.tgid, s.vm_fd, s.vm_gen, s.slot))],
            "vcpu_threads": [{"pid": v.tgid, "tid": v.tid, "fd": v.fd, "vcpu": v.link, "runs": v.runs,
                              "run_ms": _ms(v.run_ns), "exits": dict(v.exits.most_common())}
                             for v in self.vcpus.values()],
            "caps_enabled": self.caps,
        }

    def to_dict(self) -> dict[str, Any]:
        return {"summary": self.summary(), "events": self.events, "events_dropped": self.events_dropped}


def describe(ev: dict[str, Any]) -> str:
    """One event as a line, strace-like."""
    skip = {"t_ms", "pid", "tid", "fd", "on", "ioctl", "us", "ret", "errno", "dirty_log"}
    parts = [f"{ev['on']} fd {ev['fd']}"]
    for k, v in ev.items():
        if k in skip:
            continue
        if k in ("guest_phys_addr", "flags", "memory_size"):
            v = hex(v)
        parts.append(f"{k}={v}")
    ret = f"-1 {ev['errno']}" if "errno" in ev else str(ev["ret"])
    dl = f"  dirty logging {ev['dirty_log'].upper()}" if "dirty_log" in ev else ""
    return (f"[{ev['t_ms']:>10.3f} ms] {ev['pid']}/{ev['tid']} {ev['ioctl']}({', '.join(parts)}) = {ret}"
            f" <{ev['us']} us>{dl}")


def logging_windows(doc: dict[str, Any], gpa: int | None = None) -> dict[str, Any]:
    """From a `kvmsplit trace` JSON document: the dirty-logging windows of the memslot(s) at
    `gpa` (a test region; None: every memslot that had one), each with its slot's GPA and size,
    and the call counts: what a report's timeline needs."""
    summary = doc.get("summary", {})
    slots = [m for m in summary.get("memslots", []) if gpa is None or m.get("guest_phys_addr") == gpa]
    return {"t0_monotonic_s": doc.get("t0_monotonic_s"), "kvm_ioctls": doc.get("kvm_ioctls"),
            "exit_code": doc.get("exit_code"), "counts": summary.get("counts", {}),
            "windows": [{**w, "gpa": m.get("guest_phys_addr"), "size": m.get("memory_size")}
                        for m in slots for w in m.get("dirty_log_windows", [])]}
