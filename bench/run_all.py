"""`make bench`: the whole bench set, one run, every figure a ratio of two things
measured in this run (median over repeats, with min-max and n), the machine's
facts and load average with each section; writes bench/results.json (after
every section, so an interrupted run keeps what finished) and
bench/RESULTS.md, and exits 1 when a goal is missed (each printed with the
measured reason), else 0.

Sections, in order (the 16 GiB scale run last, as it needs most of the
box's memory; it checks MemAvailable first):
  startup    process start -> the guest's first line, kvmsplit's VMM and QEMU
  harness    a dirty pass's wall time over the vCPUs' KVM_RUN time (bench_bitmap_thp.py)
  peer       kvmsplit vs dirty_log_perf_test on this host, phase by phase
  ring       dirty-ring harvesting rate against the bitmap's, same pages
  suite      the default suite's wall time here, and what dominates it
  vm         the 6.12 build under kvmsplit vm, eager_page_split=1 and =0: side by side
             there, eager vs lazy (and nested), the `kvmsplit vm ... -- kvmsplit run` round trip
  trace      kvmsplit trace's (ptrace) overhead on dirty_log_perf_test and a QEMU migration
  scale      16 GiB guests, THP and hugetlb 2M, 1 and 2 vCPUs: verification time, memory overhead

Usage: run_all.py [--quick] [--only S,...] [--skip S,...] [--repeats N]
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import report
from lib import (
    HERE,
    Goal,
    Goals,
    LoadSampler,
    find_perf_test,
    fmt_spread,
    kvmsplit_argv,
    kvmsplit_env,
    machine_facts,
    meminfo,
    parse_kvmsplit_results,
    parse_perf_test,
    perf_test_argv,
    ratios,
    run_timed,
    scenario_toml,
    spread,
)
from peer import KERNEL_PHASES, PeerConfig, side_by_side

MB, GB = 1 << 20, 1 << 30
GOAL_STARTUP_S = 0.2
GOAL_SUITE_S = 60.0
GOAL_VERIFY_S = 0.030
PHASE_BAND = (0.90, 1.10)
TRACE_CLAIM = 4.0       # README: "a traced run takes 2-4 times as long"
PUBLISHED: dict[str, dict[str, Any]] = {
    "tdp_mmu_v2": {"what": "TDP MMU eager split v2, 96 vCPUs, 1 GiB/vCPU, 1G HugeTLB, INITIALLY_SET off",
                   "enable_s": (0.0017, 1.55), "dirty1_s": (2.94, 0.15)},
    "shadow_mmu_v3": {"what": "shadow MMU eager split v3, tdp_mmu=N, 64 vCPUs", "dirty1_s": (17.9, 0.08)},
}


class Bench:
    def __init__(self, a: argparse.Namespace):
        self.a = a
        self.goals = Goals()
        self.env = kvmsplit_env(tempfile.mkdtemp(prefix="kvmsplit-bench-data-"))
        os.environ.update(self.env)
        self.doc: dict = {"facts": machine_facts(), "argv": sys.argv, "quick": a.quick, "sections": {}}
        self.perf_test = find_perf_test("6.12")

    def repeats(self, n: int) -> int:
        return self.a.repeats or (2 if self.a.quick else n)

    def save(self) -> None:
        self.doc["goals"] = [g.__dict__ for g in self.goals.items]
        Path(self.a.json).write_text(json.dumps(self.doc, indent=1, default=str))

    # -- start-up ---------------------------------------------------------------------------
    def startup(self) -> dict:
        kv = [first_line_s([sys.executable, str(HERE / "first_line.py")]) for _ in range(self.repeats(7))]
        qm = [first_line_s([sys.executable, str(HERE / "qemu_first_line.py")], timeout=120)
              for _ in range(self.repeats(3))]
        k, q = spread([x for x in kv if x]), spread([x for x in qm if x])
        r = {"kvmsplit_s": k, "qemu_s": q, "ratio_qemu_over_kvmsplit": ratios(qm, kv),
             "kvmsplit_samples": kv, "qemu_samples": qm}
        self.goals.check("start-up: process start -> guest's first line (kvmsplit's VMM, median)",
                         k.get("median"), None, GOAL_STARTUP_S, fmt_spread(k, "s", 3),
                         why=startup_why(k))
        return r

    # -- the harness's own overhead in a dirty pass (bench_bitmap_thp.py) --------------------------
    def harness(self) -> dict:
        import bench_bitmap_thp as bt
        h = bt.harness_overhead((64 if self.a.quick else 256) * MB, 3, self.repeats(3))
        d = h["dirty"]
        ov = spread([x["overhead"] for x in d])
        out: dict[str, Any] = {"size_mib": 64 if self.a.quick else 256, "overhead": ov,
               "overhead_all_kvm_run": spread([x["overhead_all_kvm_run"] for x in d]),
               "share_medians": {k: spread([x[f"share_{k}"] for x in d]).get("median")
                                 for k in ("kvm_run", "exit_handling", "dirty_log", "other")},
               "verdicts": [r["verdict"] for r in h["runs"]]}
        self.goals.check("harness overhead: dirty pass wall / KVM_RUN while the guest works (median)",
                         ov.get("median"), None, bt.GOAL_OVERHEAD, fmt_spread(ov, "x", 3),
                         why="shares of the wall: " + ", ".join(f"{k} {v:.1%}" for k, v in out["share_medians"].items()
                                                                if v is not None))
        self.goals.check("harness runs all PASS", float(all(v == "PASS" for v in out["verdicts"])), 1.0, None,
                         str(out["verdicts"]))
        return out

    # -- side by side on this host ----------------------------------------------------------------
    def peer(self) -> dict:
        if self.perf_test is None:
            self.goals.check("side by side with dirty_log_perf_test (host)", None, None, None, "",
                             why="dirty_log_perf_test not built: run `kvmsplit selftests build`")
            return {"available": False}
        per = (8 if self.a.quick else 32) * MB
        out: dict[str, Any] = {"available": True, "note": HOST_PEER_NOTE, "configs": []}
        for manual in (False, True):
            cfg = PeerConfig(per_vcpu=per, vcpus=1, iterations=3, backing="thp", manual=manual)
            r = side_by_side(self.perf_test, cfg, self.repeats(3), self.env)
            out["configs"].append(r)
            self.peer_goals(r, "host (lazy)", HOST_PEER_WHY)
            self.save()
        return out

    def peer_goals(self, r: dict, where: str, why: dict) -> None:
        rr = r["ratio_kvmsplit_over_c"]
        if not r["good_repeats"]:
            self.goals.check(f"side by side {where} {r['name']}", None, None, None, "",
                             why=f"no repeat where both ended well: {r['failures'][:1]}")
            return
        for ph in KERNEL_PHASES:
            s = rr[ph]
            self.goals.check(f"{where} {r['name']}: {ph} kvmsplit/C", s.get("median"), *PHASE_BAND,
                             fmt_spread(s), why=_why(why.get(ph, ""), s.get("median")) + seconds_note(r, ph))
        s = rr["total"]
        self.goals.check(f"{where} {r['name']}: total process wall kvmsplit/C", s.get("median"), None, 1.0,
                         fmt_spread(s), why=why.get("total", "") + seconds_note(r, "total"))

    # -- kvmsplit trace's overhead -------------------------------------------------------------
    def trace(self) -> dict:
        out: dict = {}
        n = self.repeats(3)
        if self.perf_test is not None:
            argv = perf_test_argv(self.perf_test, per_vcpu=(8 if self.a.quick else 16) * MB, vcpus=1, iterations=2,
                                  backing="thp", manual=False)
            out["dirty_log_perf_test"] = traced_vs_plain(argv, n, self.env, parse_c=True)
        if not self.a.quick:    # a minute plain and 2-3 traced per repeat here: one repeat by default
            qargv = kvmsplit_argv("run", "--backend", "qemu", "-k", "[t]hp/2m/bitmap", "--output")
            out["qemu_migration"] = traced_vs_plain(qargv, self.a.qemu_trace_repeats, self.env, parse_c=False,
                                                    out_dir=True)
        for k, r in out.items():
            s = r["ratio_wall_traced_over_plain"]
            self.goals.check(f"kvmsplit trace overhead on {k}: process wall traced/plain (README says 2-4x)",
                             s.get("median"), None, TRACE_CLAIM, fmt_spread(s),
                             why=r.get("why", "") or "measured above the README's claim")
        return out

    # -- dirty-ring harvesting ------------------------------------------------------------------
    def ring(self) -> dict:
        size = (32 if self.a.quick else 128) * MB
        res: dict[str, list[dict]] = {}
        with tempfile.TemporaryDirectory(prefix="kvmsplit-bench-ring-") as d:
            for mode in ("ring", "bitmap"):
                toml = Path(d) / f"{mode}.toml"
                toml.write_text(scenario_toml(f"bench/ring/{mode}", size=size, vcpus=1, passes=2, backing="thp",
                                              dirty_mode=mode, guest_page="4k",
                                              extra={"ring_size": "1M"} if mode == "ring" else None))
                runs: list[dict] = []
                for i in range(self.repeats(3)):
                    out = Path(d) / f"{mode}-{i}"
                    t = run_timed(kvmsplit_argv("run", "--scenario", str(toml), "--output", str(out)), 600, self.env)
                    try:
                        runs.append(parse_kvmsplit_results(out / "results.json") | {"rc": t.rc})
                    except (OSError, ValueError, KeyError, IndexError) as e:
                        runs.append({"rc": t.rc, "verdict": "ERROR", "reasons": [str(e)]})
                res[mode] = runs
        ok = {m: [r for r in v if r["verdict"] == "PASS"] for m, v in res.items()}
        pages = size >> 12
        ring_rate = [sum(r["ring_entries"]) / sum(r["get_clear_iters"]) for r in ok["ring"]
                     if r.get("ring_entries") and sum(r["get_clear_iters"])]
        bm_rate = [pages * len(r["get_clear_iters"]) / sum(r["get_clear_iters"]) for r in ok["bitmap"]
                   if sum(r["get_clear_iters"])]
        r_out: dict[str, Any] = {"size_mib": size >> 20, "ring_size": "1M (65536 entries)", "runs": res,
                 "ring_entries_per_s": spread(ring_rate), "bitmap_pages_per_s": spread(bm_rate),
                 "ratio_ring_over_bitmap_rate": ratios(ring_rate, bm_rate),
                 "verdicts": {m: [r["verdict"] for r in v] for m, v in res.items()}}
        s = r_out["ring_entries_per_s"]
        self.goals.check("dirty-ring harvest: every ring scenario PASS (a rate from a broken run means nothing)",
                         float(len(ok["ring"]) == len(res["ring"]) and s.get("n", 0) > 0), 1.0, None,
                         fmt_spread(s, " entries/s", 0), why=f"verdicts {r_out['verdicts']}")
        return r_out

    # -- the default suite ----------------------------------------------------------------------
    def suite(self) -> dict:
        runs: list[dict[str, Any]] = []
        for _ in range(self.repeats(1)):
            with tempfile.TemporaryDirectory(prefix="kvmsplit-bench-suite-") as d:
                argv = kvmsplit_argv("run", "--output", d) + (["-k", "thp/2m"] if self.a.quick else [])
                t = run_timed(argv, 1800, self.env)
                try:
                    doc = json.loads((Path(d) / "results.json").read_text())
                except (OSError, ValueError):
                    doc = {"scenarios": []}
                runs.append({"rc": t.rc, "wall_s": t.wall_s, "dominant": dominant(doc, t.wall_s),
                             "verdicts": verdict_counts(doc), "failed": failed_names(doc),
                             "failed_why": failed_reasons(doc)})
        w = spread([r["wall_s"] for r in runs])
        out = {"runs": runs, "wall_s": w, "ratio_wall_over_goal": spread([r["wall_s"] / GOAL_SUITE_S for r in runs])}
        why = ""
        if runs:
            dom = runs[0]["dominant"]
            why = "dominated by " + "; ".join(f"{k} {v['s']:.1f}s ({v['share']:.0%})" for k, v in
                                               list(dom["by_group"].items())[:4])
        # --quick runs a subset: its wall says nothing about the goal, so it never meets it
        self.goals.check("default suite wall on this host (kvmsplit run)", None if self.a.quick else w.get("median"),
                         None, GOAL_SUITE_S, fmt_spread(w, "s", 1),
                         why="--quick runs -k thp/2m only, not the default suite" if self.a.quick else why)
        self.goals.check("default suite exit code 0", float(all(r["rc"] == 0 for r in runs)) if runs else None,
                         1.0, None, str([r["rc"] for r in runs]),
                         why=f"{[r['verdicts'] for r in runs]}; " + "; ".join(runs[0]["failed_why"] if runs else []))
        return out

    # -- the 6.12 build under kvmsplit vm ---------------------------------------------------------
    def vm(self) -> dict:
        from vm_bench import boot_and_measure, cache_root, find_kernel  # only this section needs virtme-ng
        kernel = find_kernel(cache_root())
        exe = find_perf_test("6.12")
        if kernel is None or exe is None:
            why = "no unpatched 6.12 image (kvmsplit kernel build)" if kernel is None else \
                "dirty_log_perf_test not built (kvmsplit selftests build)"
            self.goals.check("kvmsplit vm sections", None, None, None, "", why=why)
            return {"available": False, "why": why}
        inner = ["--per-vcpu", "16M" if self.a.quick else "64M", "--repeats", str(self.repeats(3)),
                 "--nested-repeats", str(self.repeats(3))]
        boots = {}
        for eager in (1, 0):
            extra = ["--suite"] if eager and not self.a.quick else []
            boots[f"eager={eager}"] = boot_and_measure(kernel, exe, f"kvm.eager_page_split={eager}", inner + extra)
            self.doc["sections"]["vm"] = {"boots": boots}
            self.save()
        return self.vm_figures(boots, kernel, exe)

    def vm_figures(self, boots: dict, kernel: Path, exe: Path) -> dict:
        out: dict = {"kernel": str(kernel), "perf_test": str(exe), "boots": boots}
        e, lz = boots["eager=1"].get("inside"), boots["eager=0"].get("inside")
        for tag, b in boots.items():
            if not b.get("inside"):
                self.goals.check(f"kvmsplit vm boot {tag}", None, None, None, "",
                                 why=f"{b['state']}: {b['detail']} {b['console_tail'][-3:]}")
        if e:
            self.peer_goals(e["peer"], "kvmsplit vm 6.12 (eager)", VM_PEER_WHY)
        if e and lz:
            out["eager_vs_lazy"] = eager_vs_lazy(e, lz)
            for who, r in out["eager_vs_lazy"].items():
                if who == "published":
                    continue
                self.goals.check(f"eager vs lazy ({who}): enable-time cost eager/lazy > 1",
                                 r["enable_cost"].get("median"), 1.0, None, fmt_spread(r["enable_cost"]),
                                 why="eager splitting did not make enabling slower (measured)")
                self.goals.check(f"eager vs lazy ({who}): first-pass gain lazy/eager > 1",
                                 r["first_pass_gain"].get("median"), 1.0, None, fmt_spread(r["first_pass_gain"]),
                                 why="eager splitting did not make the first dirty pass faster (measured)")
        b = boots["eager=1"]
        if e and e.get("suite"):
            out["round_trip"] = round_trip(b)
            rt = out["round_trip"]
            self.goals.check("kvmsplit vm -- kvmsplit run round trip: the default suite's exit code 0 inside",
                             float(rt["suite_rc"] == 0), 1.0, None, str(rt["suite_rc"]),
                             why=str(rt["verdicts"]))
        return out

    # -- scale -----------------------------------------------------------------------------------
    def scale(self) -> dict:
        size = 1 * GB if self.a.quick else 16 * GB
        runs: list[dict[str, Any]] = []
        for backing in ("thp", "hugetlb-2m"):
            for vcpus in (1, 2):
                avail = meminfo("MemAvailable")
                need = size + 4 * GB     # the guest, the harness, and room for the others on this box
                if avail < need:
                    runs.append({"backing": backing, "vcpus": vcpus, "skipped":
                                 f"MemAvailable {avail / GB:.1f} GiB < {need / GB:.1f} GiB needed "
                                 f"(guest {size / GB:.0f} GiB + 4 GiB headroom)", "mem_available": avail})
                    continue
                t = run_timed([sys.executable, str(HERE / "scale.py"), "--backing", backing, "--vcpus", str(vcpus),
                               "--size", f"{size >> 20}M"], 1200, self.env)
                try:
                    r = json.loads(t.stdout.strip().splitlines()[-1])
                except (ValueError, IndexError):
                    r = {"backing": backing, "vcpus": vcpus, "ok": False, "error": (t.stdout + t.stderr)[-2000:]}
                r["mem_available_before"] = avail
                r["process_wall_s"] = t.wall_s
                runs.append(r)
                self.doc["sections"]["scale"] = {"runs": runs}
                self.save()
        done = [r for r in runs if "checks" in r]
        ver = spread([c["verify_s"] for r in done for c in r["checks"]])
        pages = max((c["pages"] for r in done for c in r["checks"]), default=0)
        out = {"size": size, "runs": runs, "verify_s": ver, "verify_pages": pages,
               "ratio_verify_over_goal": spread([c["verify_s"] / GOAL_VERIFY_S for r in done for c in r["checks"]]),
               "overhead_mib": {r["name"]: round(r["overhead_bytes"] / MB, 1) for r in done}}
        skipped = [r["skipped"] for r in runs if "skipped" in r]
        self.goals.check(f"dirty-bitmap verification of {pages / (1 << 20):.0f}M pages (median per pass)",
                         ver.get("median"), None, GOAL_VERIFY_S, fmt_spread(ver, "s", 4),
                         why="; ".join(skipped) or "measured above the goal")
        for r in runs:
            if "skipped" not in r:
                self.goals.check(f"scale {r.get('name', r.get('backing'))}: no lost page, verdict "
                                 f"{r.get('verdict')}", float(bool(r.get("ok"))), 1.0, None, str(r.get("verdict")),
                                 why=str(r.get("reasons") or r.get("error", ""))[:300])
        return out


# -- helpers of the sections ----------------------------------------------------------------------
HOST_PEER_NOTE = ("dirty_log_perf_test's guest runs at CPL0, which this PVM host emulates instruction by "
                  "instruction; kvmsplit's guest runs at CPL3, natively. The guest-work phases therefore compare "
                  "an emulated guest with a native one here; enable/disable/get/clear are KVM's own work in both.")
PVM_GUEST = "the C guest is emulated at CPL0 on PVM, kvmsplit's runs natively at CPL3 (host fact pvm=true)"
NO_SHADOW = ("KVM write-protects or drops the 4K shadow mappings of kvmsplit's native guest; the C guest, "
             "emulated at CPL0 on PVM, has none for it to touch")
HOST_PEER_WHY = {"populate": PVM_GUEST, "dirty": PVM_GUEST, "enable": NO_SHADOW, "get_clear": NO_SHADOW,
                 "disable": NO_SHADOW,
                 "total": "kvmsplit's process also starts Python, reads the kernel log, sets up tracefs and "
                          "writes 5 report files"}
# inside the VM the reason depends on which side was slower: (kvmsplit slower, kvmsplit faster)
TCG_BUSY_WAIT = ("the VM has 1 CPU (TCG); dirty_log_perf_test's main thread busy-waits on it for its vCPU "
                 "threads, kvmsplit's controller blocks")
TCG_UART = ("kvmsplit's guest gets each pass's command and answers over an emulated UART, a port I/O exit "
            "per byte handled by kvmsplit's Python, each costing ms under TCG; the C guest syncs with one "
            "ucall exit")
TCG_PYTHON = ("kvmsplit's Python around the same ioctl (dirty-bitmap bookkeeping, stats reads), which TCG "
              "runs some 50x slower than the host")
VM_PEER_WHY = {
    "populate": (TCG_UART, TCG_BUSY_WAIT),
    "dirty": (TCG_UART, TCG_BUSY_WAIT),
    "enable": (TCG_PYTHON, ""),
    "get_clear": (TCG_PYTHON, ""),
    "disable": (TCG_PYTHON, ""),
    "total": "kvmsplit's Python start-up under TCG (its imports read over virtio-9p, emulated) is minutes; "
             "counted once in every repeat",
}


def _why(why: str | tuple[str, str], ratio: float | None) -> str:
    """A reason, or (the reason when kvmsplit was slower, the one when it was faster)."""
    if isinstance(why, str):
        return why
    return why[0] if ratio is not None and ratio > 1 else why[1]


def seconds_note(r: dict, ph: str) -> str:
    s = r["seconds"][ph]
    k, c = s["kvmsplit"], s["c"]
    if not k.get("n") or not c.get("n"):
        return ""
    return f" [kvmsplit {k['median']:.4f}s, C {c['median']:.4f}s]"


def first_line_s(argv: list[str], timeout: float = 30) -> float | None:
    """Spawn -> the child's first stdout line (the guest's HELLO)."""
    import subprocess
    t = time.monotonic()
    p = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    assert p.stdout is not None
    line = p.stdout.readline()
    dt = time.monotonic() - t
    try:
        p.wait(timeout)
    except subprocess.TimeoutExpired:
        p.kill()
        p.wait()
    return dt if "HELLO" in line else None


def startup_why(k: dict) -> str:
    return "Python's start and imports (numpy, the kvm package) come before the guest's first instruction"


def traced_vs_plain(argv: list[str], n: int, env: dict, parse_c: bool, out_dir: bool = False) -> dict:
    """Alternate plain and `kvmsplit trace -q -o FILE --` runs of one command."""
    runs: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="kvmsplit-bench-trace-") as d:
        for i in range(n):
            row: dict[str, Any] = {}
            for mode in ("plain", "traced"):
                cmd = argv + ([f"{d}/{mode}-{i}"] if out_dir else [])
                if mode == "traced":
                    cmd = kvmsplit_argv("trace", "-q", "-o", f"{d}/trace-{i}.json", "--") + cmd
                t = run_timed(cmd, 900, env)
                row[mode] = {"rc": t.rc, "wall_s": t.wall_s,
                             "dirty_s": sum(parse_perf_test(t.stdout)["dirty_iters"]) if parse_c else None,
                             "tail": "" if t.rc == 0 else (t.stdout + t.stderr)[-800:]}
            try:
                tr = json.loads(Path(f"{d}/trace-{i}.json").read_text())
                row["trace_summary"] = {"kvm_ioctls": tr.get("kvm_ioctls"), "wall_s": tr.get("wall_s")}
            except (OSError, ValueError):
                row["trace_summary"] = None
            runs.append(row)
    good = [r for r in runs if r["plain"]["rc"] == 0 and r["traced"]["rc"] == 0]
    out: dict[str, Any] = {"argv": argv, "runs": runs, "good_repeats": len(good),
           "ratio_wall_traced_over_plain": ratios([r["traced"]["wall_s"] for r in good],
                                                  [r["plain"]["wall_s"] for r in good])}
    # the traced program's own wall as the tracer saw it: without kvmsplit trace's start-up
    out["ratio_program_wall_traced_over_plain"] = ratios(
        [(r["trace_summary"] or {}).get("wall_s") for r in good], [r["plain"]["wall_s"] for r in good])
    if parse_c:
        out["ratio_dirty_traced_over_plain"] = ratios([r["traced"]["dirty_s"] for r in good],
                                                      [r["plain"]["dirty_s"] for r in good])
    if len(good) < n:
        out["why"] = f"{n - len(good)} of {n} repeats failed: {[r for r in runs if r not in good][:1]}"
    return out


def group_of(name: str) -> str:
    parts = name.split("/")
    if parts[0] in ("nested", "emulated", "emulated-string"):
        return parts[0]
    if len(parts) > 3:
        return "multi-vCPU/slot variants"
    return parts[0]


def dominant(doc: dict, wall: float) -> dict:
    """Where a suite's wall time went: by scenario group, by phase, the slowest
    scenarios, and what is outside every scenario (start-up, reports, history)."""
    sc = doc.get("scenarios", [])
    by_group: dict = defaultdict(float)
    by_phase: dict = defaultdict(float)
    for s in sc:
        by_group[group_of(s["name"])] += s.get("duration_s") or 0.0
        for p in s.get("phases", []):
            by_phase[p["name"] if not p["name"].startswith("dirty-") else "dirty-N"] += p["duration_s"]
    by_group.update(outside_scenarios(doc, wall))
    order = lambda d: {k: {"s": round(v, 2), "share": v / wall if wall else 0.0}
                       for k, v in sorted(d.items(), key=lambda kv: -kv[1])}
    slow = sorted(sc, key=lambda s: -(s.get("duration_s") or 0.0))[:6]
    return {"by_group": order(by_group), "by_phase": order(by_phase),
            "slowest": [(s["name"], round(s.get("duration_s") or 0.0, 2), s["verdict"]) for s in slow],
            "scenarios": len(sc)}


def outside_scenarios(doc: dict, wall: float) -> dict:
    """The suite's wall time outside every scenario, from the results' timestamps: the
    process's start-up and exit, before the first scenario, and between scenarios
    (where the run loop rewrites results.json, feeds the sinks and the history)."""
    sc = [s for s in doc.get("scenarios", []) if s.get("started")]
    if not sc or not doc.get("started") or not doc.get("finished"):
        return {"outside scenarios": max(wall - sum(s.get("duration_s") or 0.0 for s in sc), 0.0)}
    run = doc["finished"] - doc["started"]
    gaps = [b["started"] - (a["started"] + (a.get("duration_s") or 0.0)) for a, b in zip(sc, sc[1:])]
    last = sc[-1]["started"] + (sc[-1].get("duration_s") or 0.0)
    return {"between scenarios (results.json, sinks, history after each)": max(sum(gaps), 0.0),
            "process start-up and exit (Python, probe, final reports)": max(wall - run, 0.0)
            + max(sc[0]["started"] - doc["started"], 0.0) + max(doc["finished"] - last, 0.0)}


def failed_names(doc: dict) -> list[str]:
    return [s["name"] for s in doc.get("scenarios", []) if s["verdict"] in ("FAIL", "ERROR", "MISS")]


def failed_reasons(doc: dict, width: int = 160) -> list[str]:
    """Each failed scenario's name and the start of its first reason, as results.json says."""
    return [f"{s['name']}: {(s['reasons'] or ['?'])[0][:width]}" for s in doc.get("scenarios", [])
            if s["verdict"] in ("FAIL", "ERROR", "MISS")]


def verdict_counts(doc: dict) -> dict:
    c: dict = defaultdict(int)
    for s in doc.get("scenarios", []):
        c[s["verdict"]] += 1
    return dict(c)


def ratio_of_spreads(num: dict, den: dict) -> dict:
    """Median/median, with the extreme combinations as the spread (two separate boots)."""
    if not num.get("n") or not den.get("n") or not den["min"]:
        return {"n": 0}
    return {"median": num["median"] / den["median"], "min": num["min"] / den["max"],
            "max": num["max"] / den["min"], "n": min(num["n"], den["n"])}


def eager_vs_lazy(e: dict, lz: dict) -> dict:
    """Enable-time cost (eager/lazy) and first-pass gain (lazy/eager) from the two boots."""
    out: dict = {}
    for who in ("c", "kvmsplit"):
        se, sl = e["peer"]["seconds"], lz["peer"]["seconds"]
        out[f"{who} ({e['peer']['name']})"] = {
            "enable_s": {"eager": se["enable"][who], "lazy": sl["enable"][who]},
            "dirty1_s": {"eager": se["dirty_first"][who], "lazy": sl["dirty_first"][who]},
            "enable_cost": ratio_of_spreads(se["enable"][who], sl["enable"][who]),
            "first_pass_gain": ratio_of_spreads(sl["dirty_first"][who], se["dirty_first"][who])}
    ne, nl = e.get("nested"), lz.get("nested")
    if ne and nl and ne["good_repeats"] and nl["good_repeats"]:
        out["kvmsplit nested (L2 behind 2M NPT, shadow MMU)"] = {
            "enable_s": {"eager": ne["enable_s"], "lazy": nl["enable_s"]},
            "dirty1_s": {"eager": ne["dirty_first_s"], "lazy": nl["dirty_first_s"]},
            "observed": {"eager": ne["observed_split"], "lazy": nl["observed_split"]},
            "enable_cost": ratio_of_spreads(ne["enable_s"], nl["enable_s"]),
            "first_pass_gain": ratio_of_spreads(nl["dirty_first_s"], ne["dirty_first_s"])}
    p = PUBLISHED
    out["published"] = {
        "tdp_mmu_v2": {"what": p["tdp_mmu_v2"]["what"],
                       "enable_cost": p["tdp_mmu_v2"]["enable_s"][1] / p["tdp_mmu_v2"]["enable_s"][0],
                       "first_pass_gain": p["tdp_mmu_v2"]["dirty1_s"][0] / p["tdp_mmu_v2"]["dirty1_s"][1]},
        "shadow_mmu_v3": {"what": p["shadow_mmu_v3"]["what"],
                          "first_pass_gain": p["shadow_mmu_v3"]["dirty1_s"][0] / p["shadow_mmu_v3"]["dirty1_s"][1]}}
    return out


def round_trip(b: dict) -> dict:
    """`kvmsplit vm -- kvmsplit run` as measured in the eager boot: boot (vng start -> the
    command), the suite (the `kvmsplit run` process inside), the shutdown (the rest of
    the VM's wall time after the bench's own work inside)."""
    ins = b["inside"]
    doc = ins["suite"].get("doc", {})
    boot, suite = b["boot_s"] or 0.0, ins["suite"]["wall_s"]
    shutdown = max(b["vm_wall_s"] - boot - ins["inside_s"], 0.0)
    total = boot + suite + shutdown
    return {"boot_s": boot, "suite_s": suite, "shutdown_s": shutdown, "round_trip_s": total,
            "boot_share": boot / total, "suite_share": suite / total, "suite_rc": ins["suite"]["rc"],
            "verdicts": verdict_counts(doc), "failed": failed_names(doc), "dominant": dominant(doc, suite)}


SECTIONS = ("startup", "harness", "peer", "ring", "suite", "vm", "trace", "scale")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="small sizes, 2 repeats: checks the bench itself")
    ap.add_argument("--only", default="", help=f"comma-separated sections of {','.join(SECTIONS)}")
    ap.add_argument("--skip", default="")
    ap.add_argument("--repeats", type=int, default=0, help="override every section's repeat count")
    ap.add_argument("--qemu-trace-repeats", type=int, default=1, help="repeats of the traced QEMU migration")
    ap.add_argument("--render", action="store_true", help="only rewrite --md from an existing --json")
    ap.add_argument("--keep", metavar="JSON", help="take the sections not run now (and their goals) from an "
                    "earlier run's JSON, said in the report (--only vm --json vm.json; --skip vm --keep vm.json)")
    ap.add_argument("--json", default=str(HERE / "results.json"))
    ap.add_argument("--md", default=str(HERE / "RESULTS.md"))
    a = ap.parse_args()
    only = [s for s in a.only.split(",") if s] or list(SECTIONS)
    todo = [s for s in SECTIONS if s in only and s not in a.skip.split(",")]
    if a.render:
        doc = json.loads(Path(a.json).read_text())
        Path(a.md).write_text(report.markdown(doc, Goals([Goal(**g) for g in doc["goals"]])))
        return 0
    b = Bench(a)
    try:
        run_sections(b, todo)
        if a.keep:
            keep_sections(b, json.loads(Path(a.keep).read_text()), todo)
    finally:
        shutil.rmtree(b.env["KVMSPLIT_DATA_DIR"], ignore_errors=True)     # the bench's own history
    for g in b.goals.items:
        print(g.line())
    missed = b.goals.missed
    print(f"bench: {len(b.goals.items) - len(missed)} goals met, {len(missed)} missed; "
          f"{b.doc['total_s']:.0f}s; {a.json}, {a.md}")
    return 1 if missed else 0


def keep_sections(b: Bench, old: dict, ran: list[str]) -> None:
    """Sections of an earlier run that this one did not run, with their goals (a run of one
    section: all its goals), in SECTIONS order."""
    kept = [n for n in old.get("sections", {}) if n not in ran]
    for name in kept:
        r = dict(old["sections"][name])
        if name == "vm" and r.get("boots"):      # its figures and goals, judged again from its raw data
            r.update(b.vm_figures(r["boots"], Path(r["kernel"]), Path(r["perf_test"])))
        else:
            goals = r.get("goals") or (old.get("goals", []) if len(old["sections"]) == 1 else [])
            b.goals.items += [Goal(**g) for g in goals]
        r["kept_from"] = r.get("kept_from") or old.get("facts", {}).get("date", "?")   # when it was measured
        b.doc["sections"][name] = r
        b.doc["total_s"] = b.doc.get("total_s", 0) + r.get("section_s", 0)
    b.doc["sections"] = {n: b.doc["sections"][n] for n in SECTIONS if n in b.doc["sections"]}
    b.save()
    Path(b.a.md).write_text(report.markdown(b.doc, b.goals))


def run_sections(b: Bench, todo: list[str]) -> None:
    a = b.a
    t0 = time.monotonic()
    for name in todo:
        print(f"bench: {name} (load {os.getloadavg()[0]:.2f}) ...", flush=True)
        t = time.monotonic()
        first_goal = len(b.goals.items)
        with LoadSampler() as ls:
            try:
                r = getattr(b, name)()
            except Exception as e:          # one broken section never hides the others' figures
                import traceback
                r = {"error": traceback.format_exc()}
                b.goals.check(f"section {name} ran", None, None, None, "", why=f"{type(e).__name__}: {e}")
        r["load"] = ls.to_dict()
        r["section_s"] = time.monotonic() - t
        r["goals"] = [g.__dict__ for g in b.goals.items[first_goal:]]
        b.doc["sections"][name] = r
        b.save()
        Path(a.md).write_text(report.markdown(b.doc, b.goals))     # after every section: a cut-short run keeps it
        print(f"bench: {name} done in {r['section_s']:.0f}s", flush=True)
    b.doc["total_s"] = time.monotonic() - t0
    b.doc["facts_end"] = {"loadavg": os.getloadavg(), "mem_available": meminfo("MemAvailable")}
    b.save()
    Path(a.md).write_text(report.markdown(b.doc, b.goals))


if __name__ == "__main__":
    sys.exit(main())
