"""Runs inside `kvmsplit vm` (started by vm_bench.py): the side-by-side with
dirty_log_perf_test and the nested scenario, against the kernel under test's
KVM, repeat after repeat; everything goes to OUT/inside.json.

Usage: inside_vm.py --out DIR --perf-test PATH [--per-vcpu 64M] [--repeats 3] [--nested-repeats 3]
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from kvmsplit.scenario.model import parse_size
from lib import (
    kvmsplit_argv,
    kvmsplit_env,
    kvmsplit_timed_argv,
    loadavg,
    parse_kvmsplit_results,
    run_timed,
    scenario_toml,
    spread,
)
from peer import PeerConfig, compare, kvmsplit_run_entry, run_c


def kvm_params() -> dict:
    d = Path("/sys/module/kvm/parameters")
    return {n: (d / n).read_text().strip() for n in ("tdp_mmu", "eager_page_split") if (d / n).exists()}


PEER_NAME, NESTED_NAME = "bench/peer", "bench/nested/thp/l2-2m/bitmap"


def batch_toml(cfg: PeerConfig, nested_size: int) -> str:
    """The side-by-side scenario and the nested one (an SVM L1 whose L2 dirties memory
    behind 2M nested pages: the shadow MMU's split path), in one file."""
    text = scenario_toml(PEER_NAME, size=cfg.per_vcpu * cfg.vcpus, vcpus=cfg.vcpus, passes=cfg.iterations,
                         backing=cfg.backing, dirty_mode=cfg.dirty_mode)
    if nested_size:
        text += "\n" + scenario_toml(NESTED_NAME, size=nested_size, vcpus=1, passes=2, backing="thp",
                                     dirty_mode="bitmap", guest_page="2m", extra={"nested": "auto", "l2_page": "2m"})
    return text


def kvmsplit_batch(cfg: PeerConfig, nested_size: int, repeats: int, env: dict, out: Path) -> dict:
    """ONE kvmsplit process runs both scenarios `repeats` times (--repeat): under TCG its
    Python start-up costs minutes (every import over virtio-9p, emulated), so it is paid
    once and measured apart (spawn -> the run's start, from results.json's clock)."""
    toml = out / "batch.toml"
    toml.write_text(batch_toml(cfg, nested_size))
    spawn = time.time()
    t = run_timed(kvmsplit_timed_argv("run", "--scenario", str(toml), "--repeat", str(repeats),
                                      "--output", str(out / "k")), 5400, env)
    docs = [out / "k" / (f"repeat-{i}" if repeats > 1 else "") / "results.json" for i in range(1, repeats + 1)]
    peer, nested, starts = [], [], []
    for path in docs:
        try:
            p = parse_kvmsplit_results(path, PEER_NAME)
            starts.append(p["run_started"])
            peer.append(p)
            if nested_size:
                nested.append(parse_kvmsplit_results(path, NESTED_NAME))
        except (OSError, ValueError, KeyError, StopIteration) as e:
            peer.append({"verdict": "ERROR", "reasons": [f"{path}: {e}"]})
    startup = (min(starts) - spawn) if starts else None
    return {"rc": t.rc, "wall_s": t.wall_s, "maxrss_kb": t.maxrss_kb, "startup_s": startup, "peer": peer,
            "nested": nested, "tail": "" if t.rc == 0 else (t.stdout + t.stderr)[-2000:]}


def peer_in_vm(exe: Path, cfg: PeerConfig, batch: dict, repeats: int) -> dict:
    """The C test `repeats` times, each its own process, against kvmsplit's repeats from
    the batch. kvmsplit's `total` per repeat: its process's start-up (paid once, counted
    in every repeat) + the scenario's own duration."""
    cs = [run_c(exe, cfg, 900) for _ in range(repeats)]
    runs = []
    for c, k in zip(cs, batch["peer"]):
        if "populate" not in k:
            runs.append({"c": c, "kvmsplit": {"ok": False, "raw": k, "tail": str(k.get("reasons"))}})
            continue
        total = (batch["startup_s"] or 0.0) + (k["duration_s"] or 0.0)
        runs.append({"c": c, "kvmsplit": kvmsplit_run_entry(k, cfg, total, batch["maxrss_kb"])})
    r = compare(exe, cfg, runs)
    r["kvmsplit_process"] = {"wall_s": batch["wall_s"], "startup_s": batch["startup_s"], "rc": batch["rc"],
                             "tail": batch["tail"]}
    return r


def nested_figures(nested: list[dict]) -> dict:
    good = [r for r in nested if r.get("verdict") == "PASS"]
    return {"repeats": len(nested), "good_repeats": len(good),
            "verdicts": [r.get("verdict") for r in nested], "reasons": [r.get("reasons") for r in nested
                                                                        if r.get("verdict") != "PASS"],
            "enable_s": spread([r["enable"] for r in good]),
            "dirty_first_s": spread([r["dirty_iters"][0] for r in good if r["dirty_iters"]]),
            "observed_split": [r["observed_split"] for r in good]}


def default_suite(env: dict, out: Path) -> dict:
    """`kvmsplit run` (the default suite sized for this VM), timed as a process."""
    t = run_timed(kvmsplit_argv("run", "--output", str(out / "suite")), 5400, env)
    try:
        doc = json.loads((out / "suite" / "results.json").read_text())
    except (OSError, ValueError):
        return {"rc": t.rc, "wall_s": t.wall_s, "tail": (t.stdout + t.stderr)[-2000:]}
    return {"rc": t.rc, "wall_s": t.wall_s, "doc": suite_summary(doc)}


def suite_summary(doc: dict) -> dict:
    """What the round trip's breakdown needs of the suite's results.json (not its evidence)."""
    return {"started": doc.get("started"), "finished": doc.get("finished"),
            "scenarios": [{"name": s["name"], "verdict": s["verdict"], "duration_s": s.get("duration_s") or 0.0,
                           "started": s.get("started"),
                           "phases": [{"name": p["name"], "duration_s": p["duration_s"]} for p in s.get("phases", [])]}
                          for s in doc.get("scenarios", [])]}


def say(what: str) -> None:
    print(f"inside_vm: {what} (load {loadavg()[0]:.2f})", flush=True)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--perf-test", required=True)
    ap.add_argument("--per-vcpu", default="64M")
    ap.add_argument("--iterations", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--nested-repeats", type=int, default=3, help="0: no nested scenario (else: --repeats)")
    ap.add_argument("--nested-size", default="32M")
    ap.add_argument("--suite", action="store_true", help="also run the default suite (the round trip's command)")
    a = ap.parse_args()
    out = Path(a.out)
    env = kvmsplit_env(os.environ.get("KVMSPLIT_DATA_DIR"))
    t0 = time.monotonic()
    doc: dict = {"kernel": os.uname().release, "kvm_params": kvm_params(), "loadavg_start": loadavg()}
    t = time.monotonic()
    say(f"kernel {doc['kernel']}, kvm {doc['kvm_params']}: kvmsplit, {a.repeats} repeats in one process")
    cfg = PeerConfig(per_vcpu=parse_size(a.per_vcpu), vcpus=1, iterations=a.iterations, backing="thp")
    batch = kvmsplit_batch(cfg, parse_size(a.nested_size) if a.nested_repeats else 0, a.repeats, env, out)
    doc["batch_s"] = time.monotonic() - t0
    say("dirty_log_perf_test")
    doc["peer"] = peer_in_vm(Path(a.perf_test), cfg, batch, a.repeats)
    doc["nested"] = nested_figures(batch["nested"]) if a.nested_repeats else None
    if a.suite:
        say("the default suite")
        t = time.monotonic()
        doc["suite"] = default_suite(env, out)
        doc["suite_s"] = time.monotonic() - t
    doc["loadavg_end"] = loadavg()
    doc["inside_s"] = time.monotonic() - t0
    (out / "inside.json").write_text(json.dumps(doc, indent=1))
    print(f"inside_vm: wrote {out / 'inside.json'}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
