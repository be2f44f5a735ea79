"""Soak: many real small scenarios in one process must leave the process as
they found it: no fd, thread, mapping or hugetlb page more, and RSS grown by a
bounded amount (the allocator keeps some; a leak of a scenario's memory or of
its VM would show as tens of MiB per scenario, thousands over a soak).

KVMSPLIT_SOAK_N scenarios (default 50, CI); `make soak` runs 500. The numbers
are printed (pytest -s shows them) and recorded as junit properties.
"""
from __future__ import annotations

import gc
import glob
import os
import threading
import time

import pytest

from kvmsplit.runs.results import PASS, SKIP
from kvmsplit.scenario.model import DirtyMode, Scenario
from kvmsplit.vmm.memory import Backing

N = int(os.environ.get("KVMSPLIT_SOAK_N", "50"))
MB = 1 << 20
RSS_GROWTH_MAX_KIB = 64 * 1024
MAPS_GROWTH_MAX = 16     # glibc and Python's allocators may keep an arena or two more
MODES = list(DirtyMode)
SHAPES = [("anon/4k", Backing.ANON, "4k"), ("thp/2m", Backing.THP, "2m")]
WARMUP = len(SHAPES) * len(MODES)   # every shape and mode once: one-time costs are not leaks


def scenario(i: int) -> Scenario:
    # 2 shapes x 5 modes, coprime: every 10 scenarios run every pairing once
    name, backing, page = SHAPES[i % len(SHAPES)]
    mode = MODES[i % len(MODES)]
    return Scenario(f"soak{i}/{name}/{mode.value}", backing=backing, guest_page=page, size=16 * MB,
                    dirty_mode=mode, passes=1, ring_size=16384)


def snapshot() -> dict:
    gc.collect()
    fds = {}
    for fd in os.listdir("/proc/self/fd"):
        try:
            fds[fd] = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            pass            # listdir's own fd, closed by now
    with open("/proc/self/status") as f:
        rss = next(int(ln.split()[1]) for ln in f if ln.startswith("VmRSS:"))
    with open("/proc/self/maps") as f:
        maps = sum(1 for _ in f)
    huge = {}
    for p in sorted(glob.glob("/sys/kernel/mm/hugepages/*/nr_hugepages")):
        with open(p) as f:
            huge[p.split("/")[-2]] = int(f.read())
    return {"fds": fds, "threads": sorted(t.name for t in threading.enumerate()), "rss_kib": rss,
            "maps": maps, "hugetlb": huge}


def summary(b: dict, a: dict) -> str:
    return (f"fds {len(b['fds'])}->{len(a['fds'])} threads {len(b['threads'])}->{len(a['threads'])} "
            f"rss {b['rss_kib'] / 1024:.1f}->{a['rss_kib'] / 1024:.1f} MiB maps {b['maps']}->{a['maps']} "
            f"hugetlb {b['hugetlb']}->{a['hugetlb']}")


@pytest.mark.kvm
@pytest.mark.timeout(300 + 10 * N)
def test_soak_leaves_the_process_as_found(run_scenario, record_property):
    for i in range(WARMUP):
        assert run_scenario(scenario(i)).verdict in (PASS, SKIP)
    before = snapshot()
    t = time.monotonic()
    verdicts: dict[str, int] = {}
    bad = []
    for i in range(WARMUP, WARMUP + N):
        res = run_scenario(scenario(i))
        verdicts[str(res.verdict)] = verdicts.get(str(res.verdict), 0) + 1
        if res.verdict not in (PASS, SKIP):
            bad.append((res.name, res.verdict, res.reasons[:2]))
        del res
    took = time.monotonic() - t
    after = snapshot()
    line = f"soak: {N} scenarios in {took:.0f}s {dict(sorted(verdicts.items()))}; {summary(before, after)}"
    print(f"\n{line}")
    record_property("soak", line)
    assert not bad, bad[:5]
    assert verdicts.get(str(PASS), 0) > 0, verdicts
    new_fds = {fd: t for fd, t in after["fds"].items() if before["fds"].get(fd) != t}
    assert not new_fds, f"fds left open: {new_fds}"
    assert after["threads"] == before["threads"], line
    assert after["hugetlb"] == before["hugetlb"], line
    assert after["maps"] - before["maps"] <= MAPS_GROWTH_MAX, line
    assert after["rss_kib"] - before["rss_kib"] < RSS_GROWTH_MAX_KIB, line
