"""One large scenario in this process, for the scale figures: the harness's
peak memory beyond the guest's (RSS + hugetlb pages, sampled), the dirty
bitmap verification time per pass (the check after KVM_GET/CLEAR_DIRTY_LOG:
unpacking the bitmap and comparing it with the written set), and the
scenario's verdict. Prints one JSON object.

Usage: scale.py --backing thp --vcpus 1 --size 16G [--percent 25] [--passes 1]
The parent (run_all.py) checks MemAvailable before it starts one.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from kvmsplit.host.changes import HostChanges
from kvmsplit.host.facts import probe
from kvmsplit.scenario.engine import RunOptions, ScenarioRun
from kvmsplit.scenario.model import DirtyMode, Scenario, parse_size
from kvmsplit.scenario.witness import Witness
from kvmsplit.vmm.guest.build import guest_image
from kvmsplit.vmm.kvm import Kvm
from kvmsplit.vmm.memory import Backing
from lib import RssSampler


class VerifyTimedRun(ScenarioRun):
    """Times each dirty pass's check, and the dirty-log ioctls inside it, apart."""

    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self.checks: list[dict] = []
        self._ioctl_s = 0.0

    def _get_log(self, sl):
        t = time.monotonic()
        try:
            return super()._get_log(sl)
        finally:
            self._ioctl_s += time.monotonic() - t

    def _clear_log(self, sl, bm):
        t = time.monotonic()
        try:
            return super()._clear_log(sl, bm)
        finally:
            self._ioctl_s += time.monotonic() - t

    def _check_dirty(self, pass_no, pages, guest_s):
        self._ioctl_s = 0.0
        t = time.monotonic()
        super()._check_dirty(pass_no, pages, guest_s)
        total = time.monotonic() - t
        self.checks.append({"pass": pass_no, "check_s": total, "ioctl_s": self._ioctl_s,
                            "verify_s": total - self._ioctl_s, "pages": int(self.s.npages)})


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--backing", default="thp")
    ap.add_argument("--vcpus", type=int, default=1)
    ap.add_argument("--size", default="16G")
    ap.add_argument("--percent", type=int, default=25)
    ap.add_argument("--passes", type=int, default=1)
    a = ap.parse_args()
    size = parse_size(a.size)
    s = Scenario(f"bench/scale/{a.backing}/2m/bitmap/{a.vcpus}vcpu", backing=Backing(a.backing), guest_page="2m",
                 size=size, vcpus=a.vcpus, dirty_mode=DirtyMode.BITMAP, passes=a.passes, pattern="random",
                 percent=a.percent, seed=7)
    kvm = Kvm()
    facts = probe(kvm)
    rss = RssSampler()
    base = rss.sample()
    rss.start()
    t = time.monotonic()
    w = Witness.open()
    try:
        with HostChanges() as host:
            r = VerifyTimedRun(s, facts, guest_image(), host, kvm, RunOptions(), witness=w)
            res = r.run()
    finally:
        w.close()
    wall = time.monotonic() - t
    peak = rss.stop()
    passes = (res.dirty or {}).get("passes", [])
    # PASS, or UNCONFIRMED when millions of tracepoint events overran the witness; never lost pages
    ok = res.verdict.value in ("PASS", "UNCONFIRMED") and bool(passes) and not any(p["missing"] for p in passes)
    print(json.dumps({
        "name": s.name, "size": size, "vcpus": a.vcpus, "backing": a.backing, "percent": a.percent,
        "verdict": res.verdict.value, "reasons": res.reasons, "ok": ok, "wall_s": wall,
        "phases": {p.name: round(p.duration_s, 4) for p in res.phases}, "passes": passes,
        "checks": r.checks, "rss_base": base, "rss_peak": peak, "overhead_bytes": peak - size,
        "overhead_beyond_base_bytes": peak - size - base,
        "host_huge_bytes": r.host_huge_bytes}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
