"""kvmsplit side by side with the kernel's dirty_log_perf_test, phase by phase.

Both run as processes, alternately, repeat after repeat, on the same
configuration: memory per vCPU, vCPUs, backing, dirty iterations and
manual-protect mode (`-g` <-> `dirty_mode = "bitmap"`; the C test's default,
MANUAL_PROTECT_ENABLE|INITIALLY_SET <-> `"manual-init-set"`). The guests
differ: both write one qword per 4K page over their partition, but the C
test's guest runs at CPL0 and kvmsplit's at CPL3, and kvmsplit's guest is
mapped with 4K guest pages like the C test's.

Phase map (kvmsplit's results.json -> the C test's lines):
  populate   populate phase, command -> every vCPU done  | Populate memory time (includes thread start)
  enable     the KVM_SET_USER_MEMORY_REGION calls          | Enabling dirty logging time
  dirty      each pass's guest time, summed                | Iteration N dirty memory time, summed
  get_clear  KVM_GET/CLEAR_DIRTY_LOG calls, summed        | Iteration N get + clear dirty log time
  (harvest   get_clear + unpacking the bitmap: shown, not a goal)
  disable    the KVM_SET_USER_MEMORY_REGION calls          | Disabling dirty logging time
  total      process spawn -> exit                        | the same
With INITIALLY_SET the C test's iteration 1 runs before anything is write
protected (its first clear follows it); kvmsplit clears first
("first-clear") and then dirties. So for manual-init-set the C test runs one
iteration more, its iteration 1 is left out of `dirty`, and kvmsplit's
first-clear is added to its `get_clear`.
"""
from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path

from lib import (
    PHASES,
    kvmsplit_timed_argv,
    parse_kvmsplit_results,
    parse_perf_test,
    perf_test_argv,
    ratios,
    run_timed,
    scenario_toml,
    spread,
)

KERNEL_PHASES = ("populate", "enable", "dirty", "get_clear", "disable")


@dataclass(frozen=True)
class PeerConfig:
    per_vcpu: int           # bytes each vCPU dirties
    vcpus: int = 1
    iterations: int = 3
    backing: str = "thp"
    manual: bool = False    # False: bitmap / -g; True: manual-init-set / the C test's default

    @property
    def dirty_mode(self) -> str:
        return "manual-init-set" if self.manual else "bitmap"

    @property
    def name(self) -> str:
        return f"{self.backing}/{self.dirty_mode}/{self.vcpus}vcpu/{self.per_vcpu >> 20}M-per-vcpu/i{self.iterations}"

    def to_dict(self) -> dict:
        return {"per_vcpu_mib": self.per_vcpu >> 20, "vcpus": self.vcpus, "iterations": self.iterations,
                "backing": self.backing, "dirty_mode": self.dirty_mode,
                "c_test_flags": "" if self.manual else "-g"}


def c_phases(c: dict, cfg: PeerConfig) -> dict:
    """The C test's figures in the shared phase names."""
    dirty = c["dirty_iters"][1:] if cfg.manual else c["dirty_iters"]
    return {"populate": c["populate"], "enable": c["enable"], "dirty": sum(dirty) if dirty else None,
            "get_clear": sum(c["get_clear_iters"]) if c["get_clear_iters"] else None, "disable": c["disable"],
            "dirty_first": dirty[0] if dirty else None}


def k_phases(k: dict, cfg: PeerConfig) -> dict:
    """kvmsplit's figures in the shared phase names: get_clear is the ioctls alone
    (as the C test times them); harvest adds the bitmap's unpacking into a page set."""
    io = k["ioctl_iters"]
    gc = sum(io) + (k["first_clear_ioctl"] or 0.0) if io and None not in io else None
    hv = sum(k["get_clear_iters"]) + (k["first_clear"] or 0.0) if k["get_clear_iters"] else None
    return {"populate": k["populate"], "enable": k["enable"],
            "dirty": sum(k["dirty_iters"]) if k["dirty_iters"] else None, "get_clear": gc,
            "disable": k["disable"], "dirty_first": k["dirty_iters"][0] if k["dirty_iters"] else None,
            "harvest": hv}


def run_c(exe: Path, cfg: PeerConfig, timeout: float) -> dict:
    iters = cfg.iterations + (1 if cfg.manual else 0)
    t = run_timed(perf_test_argv(exe, per_vcpu=cfg.per_vcpu, vcpus=cfg.vcpus, iterations=iters,
                                 backing=cfg.backing, manual=cfg.manual), timeout)
    raw = parse_perf_test(t.stdout)
    ok = t.rc == 0 and raw["disable"] is not None
    return {"ok": ok, "rc": t.rc, "wall_s": t.wall_s, "maxrss_kb": t.maxrss_kb, "raw": raw,
            "phases": {**c_phases(raw, cfg), "total": t.wall_s},
            "tail": "" if ok else (t.stdout + t.stderr)[-1500:]}


def run_kvmsplit(cfg: PeerConfig, workdir: Path, tag: str, env: dict, timeout: float) -> dict:
    toml = workdir / f"{tag}.toml"
    toml.write_text(scenario_toml(f"peer/{cfg.name}", size=cfg.per_vcpu * cfg.vcpus, vcpus=cfg.vcpus,
                                  passes=cfg.iterations, backing=cfg.backing, dirty_mode=cfg.dirty_mode))
    out = workdir / tag
    t = run_timed(kvmsplit_timed_argv("run", "--scenario", str(toml), "--output", str(out)), timeout, env)
    try:
        raw = parse_kvmsplit_results(out / "results.json")
    except (OSError, ValueError, KeyError, IndexError) as e:
        return {"ok": False, "rc": t.rc, "wall_s": t.wall_s, "tail": f"{e}\n{(t.stdout + t.stderr)[-1500:]}"}
    ok = t.rc == 0 and raw["verdict"] == "PASS"
    return {"ok": ok, "rc": t.rc, "wall_s": t.wall_s, "maxrss_kb": t.maxrss_kb, "raw": raw,
            "phases": {**k_phases(raw, cfg), "total": t.wall_s},
            "tail": "" if ok else (t.stdout + t.stderr)[-1500:]}


def side_by_side(exe: Path, cfg: PeerConfig, repeats: int, env: dict, timeout: float = 600) -> dict:
    """`repeats` alternating runs of each; per-phase ratios kvmsplit / C (per repeat), as spreads."""
    runs = []
    with tempfile.TemporaryDirectory(prefix="kvmsplit-bench-peer-") as d:
        for i in range(repeats):
            c = run_c(exe, cfg, timeout)
            k = run_kvmsplit(cfg, Path(d), f"r{i}", env, timeout)
            runs.append({"c": c, "kvmsplit": k})
    return compare(exe, cfg, runs)


def compare(exe: Path, cfg: PeerConfig, runs: list[dict]) -> dict:
    """Per-phase ratios kvmsplit / C, repeat by repeat, as spreads."""
    good = [r for r in runs if r["c"]["ok"] and r["kvmsplit"]["ok"]]
    phase_ratio = {}
    phase_s = {}
    for ph in (*PHASES, "dirty_first", "harvest"):
        kv = [r["kvmsplit"]["phases"][ph] for r in good]
        cv = [r["c"]["phases"]["get_clear" if ph == "harvest" else ph] for r in good]
        phase_ratio[ph] = ratios(kv, cv)
        phase_s[ph] = {"kvmsplit": spread(kv), "c": spread(cv)}
    return {"config": cfg.to_dict(), "name": cfg.name, "binary": str(exe), "repeats": len(runs),
            "good_repeats": len(good), "ratio_kvmsplit_over_c": phase_ratio, "seconds": phase_s,
            "failures": [{"c": r["c"].get("tail"), "kvmsplit": r["kvmsplit"].get("tail")}
                         for r in runs if r not in good],
            "kvmsplit_observed": [r["kvmsplit"]["raw"].get("observed_split") for r in good],
            "maxrss_source": "VmHWM",
            "maxrss_kb": {"kvmsplit": spread([r["kvmsplit"].get("maxrss_kb") for r in good]),
                          "c": spread([r["c"]["maxrss_kb"] for r in good])},
            "runs": runs}


def kvmsplit_run_entry(raw: dict, cfg: PeerConfig, total: float, maxrss_kb: int | None) -> dict:
    """One repeat of kvmsplit as compare() takes it, from its parsed results."""
    ok = raw["verdict"] == "PASS"
    return {"ok": ok, "raw": raw, "maxrss_kb": maxrss_kb, "phases": {**k_phases(raw, cfg), "total": total},
            "tail": "" if ok else "; ".join(raw.get("reasons", []))}
