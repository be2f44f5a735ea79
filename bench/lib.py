"""Shared helpers of the bench set: spreads, ratios, goals, machine facts, and
the two programs compared side by side (kvmsplit and the kernel's
dirty_log_perf_test), each run as its own process and parsed phase by phase.

Every figure the bench reports is a ratio of two things measured in the same
run; a `Spread` is the median over repeats with min and max."""
from __future__ import annotations

import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent

# the phases both programs time, in dirty_log_perf_test's words
PHASES = ("populate", "enable", "dirty", "get_clear", "disable", "total")


# -- numbers ---------------------------------------------------------------------------------
def spread(values: Sequence[float | None]) -> dict:
    """Median with min, max and n: how every figure is given."""
    v = [x for x in values if x is not None]
    if not v:
        return {"n": 0}
    return {"median": statistics.median(v), "min": min(v), "max": max(v), "n": len(v)}


def ratios(num: Sequence[float | None], den: Sequence[float | None]) -> dict:
    """Per-repeat ratios (repeat i of one over repeat i of the other), as a spread."""
    return spread([a / b for a, b in zip(num, den) if a is not None and b is not None and b])


def fmt_spread(s: dict, unit: str = "x", digits: int = 2) -> str:
    if not s.get("n"):
        return "n/a"
    f = f"{{:.{digits}f}}"
    return f"{f.format(s['median'])}{unit} ({f.format(s['min'])}-{f.format(s['max'])}, n={s['n']})"


# -- goals ------------------------------------------------------------------------------------
@dataclass
class Goal:
    """One goal, judged on a measured figure. A goal whose figure could not be
    measured is missed (no green without evidence), with the reason."""
    name: str
    want: str                   # e.g. "<= 1.10x"
    got: str                    # the figure, as shown
    met: bool
    why: str = ""               # for a miss: the measured reason

    def line(self) -> str:
        mark = "met" if self.met else "MISSED"
        return f"{mark}: {self.name}: {self.got} (goal {self.want})" + (f" - {self.why}" if self.why else "")


@dataclass
class Goals:
    items: list[Goal] = field(default_factory=list)

    def check(self, name: str, value: float | None, low: float | None, high: float | None,
              shown: str, why: str = "") -> Goal:
        ok = value is not None and (low is None or value >= low) and (high is None or value <= high)
        want = " and ".join(p for p in (f">= {low}" if low is not None else "",
                                        f"<= {high}" if high is not None else "") if p)
        g = Goal(name, want, shown if value is not None else "not measured", ok, "" if ok else why)
        self.items.append(g)
        return g

    @property
    def missed(self) -> list[Goal]:
        return [g for g in self.items if not g.met]


# -- the machine ------------------------------------------------------------------------------
def loadavg() -> list[float]:
    return [float(x) for x in Path("/proc/loadavg").read_text().split()[:3]]


def meminfo(key: str) -> int:
    """A /proc/meminfo field in bytes."""
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(key)


def machine_facts() -> dict:
    """What the figures depend on: kernel, CPUs, memory, KVM's parameters, load."""
    params = {}
    pdir = Path("/sys/module/kvm/parameters")
    for name in ("tdp_mmu", "eager_page_split", "nx_huge_pages"):
        p = pdir / name
        params[name] = p.read_text().strip() if p.exists() else None
    cpu = next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                if ln.startswith("model name")), "unknown")
    return {"kernel": os.uname().release, "cpu": cpu, "cpus": os.cpu_count(),
            "mem_total": meminfo("MemTotal"), "mem_available": meminfo("MemAvailable"),
            "kvm_params": params, "pvm": Path("/sys/module/kvm_pvm").exists(),
            "thp": _thp_mode(), "loadavg": loadavg(), "python": sys.version.split()[0],
            "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}


def _thp_mode() -> str:
    text = Path("/sys/kernel/mm/transparent_hugepage/enabled").read_text()
    m = re.search(r"\[(\w+)\]", text)
    return m.group(1) if m else text.strip()


class LoadSampler:
    """The 1-minute load average at the start and end of a measurement."""

    def __enter__(self):
        self.start = loadavg()[0]
        return self

    def __exit__(self, *exc):
        self.end = loadavg()[0]

    def to_dict(self) -> dict:
        return {"load1_start": self.start, "load1_end": getattr(self, "end", None)}


# -- processes ----------------------------------------------------------------------------------
@dataclass
class Timed:
    rc: int
    wall_s: float
    maxrss_kb: int
    stdout: str
    stderr: str


def run_timed(argv: list[str], timeout: float, env: dict | None = None) -> Timed:
    """Run a process to its end: wall time from spawn to reap, and its own peak
    RSS (wait4's rusage). Output goes through temp files, so a chatty child never blocks."""
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        t = time.monotonic()
        p = subprocess.Popen(argv, stdout=out, stderr=err, text=True, env={**os.environ, **(env or {})},
                             start_new_session=True)
        rc, maxrss = _reap(p, t + timeout)
        wall = time.monotonic() - t
        out.seek(0)
        err.seek(0)
        return Timed(rc, wall, maxrss, out.read(), err.read() + ("" if rc != -9 else f"\n(killed after {timeout}s)"))


def _reap(p: subprocess.Popen, deadline: float) -> tuple[int, int]:
    """Wait for p (killing its session at the deadline); its exit code and peak RSS in KiB.
    The peak is the child's own VmHWM, polled while it lives: wait4's ru_maxrss would
    carry this (large) process's peak into the child across fork."""
    hwm = 0
    while True:
        hwm = max(hwm, _vm_hwm_kb(p.pid))
        pid, status, _ = os.wait4(p.pid, os.WNOHANG)
        if pid:
            p.returncode = os.waitstatus_to_exitcode(status)
            return p.returncode, hwm
        if time.monotonic() > deadline:
            os.killpg(p.pid, 9)
            os.wait4(p.pid, 0)
            p.returncode = -9
            return -9, hwm
        time.sleep(0.005)


def _vm_hwm_kb(pid: int) -> int:
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return 0
    return next((int(ln.split()[1]) for ln in text.splitlines() if ln.startswith("VmHWM:")), 0)


def kvmsplit_env(data_dir: str | None = None) -> dict:
    """kvmsplit's caches and history for the bench: never the user's real ones."""
    env = {"KVMSPLIT_CACHE_DIR": os.environ.get("KVMSPLIT_CACHE_DIR",
                                                str(Path.home() / ".cache" / "kvmsplit-test"))}
    env["KVMSPLIT_DATA_DIR"] = data_dir or os.environ.get("KVMSPLIT_DATA_DIR") or tempfile.mkdtemp(
        prefix="kvmsplit-bench-data-")
    return env


def kvmsplit_argv(*args: str) -> list[str]:
    return [sys.executable, "-m", "kvmsplit", *args]


def kvmsplit_timed_argv(*args: str) -> list[str]:
    """kvmsplit's CLI with the dirty-log ioctls timed apart (kvmsplit_timed.py)."""
    return [sys.executable, str(HERE / "kvmsplit_timed.py"), *args]


# -- dirty_log_perf_test ---------------------------------------------------------------------------
def find_perf_test(version: str | None = None) -> Path | None:
    """The dirty_log_perf_test `kvmsplit selftests build` made (KVMSPLIT_SELFTESTS_DIR
    or the cache), preferring one built from kernel `version` (e.g. 6.12.118)."""
    env = os.environ.get("KVMSPLIT_SELFTESTS_DIR")
    root = Path(env) if env else Path(kvmsplit_env("/nonexistent")["KVMSPLIT_CACHE_DIR"]) / "selftests"
    found = [p for p in sorted(root.glob("**/dirty_log_perf_test"), key=lambda p: p.stat().st_mtime)
             if os.access(p, os.X_OK)]
    if version:
        found = [p for p in found if version in str(p)] or found
    return found[-1] if found else None


_C_LINES = {
    "populate": r"Populate memory time: (\d+\.\d+)s",
    "enable": r"Enabling dirty logging time: (\d+\.\d+)s",
    "disable": r"Disabling dirty logging time: (\d+\.\d+)s",
}


def parse_perf_test(stdout: str) -> dict:
    """dirty_log_perf_test's phase times (seconds); per-iteration lists for the dirty,
    get and clear times."""
    out: dict = {}
    for k, rx in _C_LINES.items():
        m = re.search(rx, stdout)
        out[k] = float(m.group(1)) if m else None
    its = lambda what: [float(x) for x in re.findall(rf"Iteration \d+ {what} time: (\d+\.\d+)s", stdout)]
    out["dirty_iters"] = its("dirty memory")
    get, clear = its("get dirty log"), its("clear dirty log")
    out["get_clear_iters"] = [g + (clear[i] if i < len(clear) else 0.0) for i, g in enumerate(get)]
    return out


def perf_test_argv(exe: Path, *, per_vcpu: int, vcpus: int, iterations: int, backing: str,
                   manual: bool) -> list[str]:
    """The C test's command line for one configuration (-g: no manual protect)."""
    src = {"thp": "anonymous_thp", "hugetlb-2m": "anonymous_hugetlb_2mb", "anon": "anonymous"}[backing]
    argv = [str(exe), "-b", f"{per_vcpu >> 20}M", "-v", str(vcpus), "-i", str(iterations), "-s", src]
    return argv if manual else [*argv, "-g"]


# -- kvmsplit, the same configuration ------------------------------------------------------------
def scenario_toml(name: str, *, size: int, vcpus: int, passes: int, backing: str, dirty_mode: str,
                  guest_page: str = "4k", extra: dict | None = None) -> str:
    """One scenario as a TOML file's text."""
    keys = {"name": name, "backing": backing, "guest_page": guest_page, "size": f"{size >> 20}M",
            "vcpus": vcpus, "dirty_mode": dirty_mode, "passes": passes, **(extra or {})}
    body = "\n".join(f"{k} = {json.dumps(v)}" for k, v in keys.items())
    return f"[[scenario]]\n{body}\n"


def parse_kvmsplit_results(path: Path, name: str | None = None) -> dict:
    """kvmsplit's phase times from its results.json, in the C test's terms:
    populate = the guest's populate pass (command sent -> every vCPU done),
    enable/disable = the KVM_SET_USER_MEMORY_REGION calls, dirty = each pass's
    guest time, get_clear = each pass's harvest (KVM_GET/CLEAR_DIRTY_LOG or
    the rings), first_clear = manual-init-set's first get+clear."""
    doc = json.loads(path.read_text())
    s = next(x for x in doc["scenarios"] if x["name"] == name) if name else doc["scenarios"][0]
    ph = {p["name"]: p for p in s["phases"]}
    passes = (s.get("dirty") or {}).get("passes") or []
    return {
        "verdict": s["verdict"], "reasons": s.get("reasons", []),
        "populate": ph["populate"]["kernel_s"] if "populate" in ph else None,
        "enable": ph["enable"]["duration_s"] if "enable" in ph else None,
        "first_clear": ph["first-clear"]["duration_s"] if "first-clear" in ph else None,
        "disable": ph["disable"]["duration_s"] if "disable" in ph else None,
        "dirty_iters": [p["guest_s"] for p in passes],
        "get_clear_iters": [p["harvest_s"] for p in passes],
        "ring_entries": [p.get("ring_entries") for p in passes],
        # KVM_GET/CLEAR_DIRTY_LOG alone, per dirty pass and in first-clear (kvmsplit_timed.py)
        "ioctl_iters": [_ioctl_s(s, f"dirty-{p['pass']}") for p in passes],
        "first_clear_ioctl": _ioctl_s(s, "first-clear") if "first-clear" in ph else None,
        "duration_s": s.get("duration_s"), "started": s.get("started"), "run_started": doc.get("started"),
        "pages_2m_after_populate": ph.get("populate", {}).get("vm_stats", {}).get("pages_2m"),
        "pages_4k_after_enable": ph.get("enable", {}).get("vm_stats", {}).get("pages_4k"),
        "pages_2m_after_enable": ph.get("enable", {}).get("vm_stats", {}).get("pages_2m"),
        "observed_split": s.get("observed_split"),
    }


def _ioctl_s(s: dict, phase: str) -> float | None:
    acc = (s.get("extra") or {}).get("bench_ioctl_s")
    if acc is None:
        return None
    return acc.get(f"{phase}:get", 0.0) + acc.get(f"{phase}:clear", 0.0)


class RssSampler(threading.Thread):
    """Peak of a process's RSS plus its hugetlb pages (/proc/PID/status), sampled."""

    def __init__(self, pid: int | str = "self", every: float = 0.05):
        super().__init__(daemon=True)
        self.path, self.every = Path(f"/proc/{pid}/status"), every
        self.peak = 0
        self._done = threading.Event()

    def sample(self) -> int:
        try:
            text = self.path.read_text()
        except OSError:
            return 0
        kb = {ln.split(":")[0]: int(ln.split()[1]) for ln in text.splitlines()
              if ln.startswith(("VmRSS:", "HugetlbPages:"))}
        return (kb.get("VmRSS", 0) + kb.get("HugetlbPages", 0)) * 1024

    def run(self) -> None:
        while not self._done.is_set():
            self.peak = max(self.peak, self.sample())
            self._done.wait(self.every)

    def stop(self) -> int:
        self._done.set()
        self.join()
        self.peak = max(self.peak, self.sample())
        return self.peak
