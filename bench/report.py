"""bench/RESULTS.md from run_all.py's document: the machine, then each
section's figures (ratios with median, min-max and n), then every goal met
or missed with its measured reason."""
from __future__ import annotations

from lib import Goals, fmt_spread

GiB, MiB = 1 << 30, 1 << 20


def markdown(doc: dict, goals: Goals) -> str:
    f = doc["facts"]
    out = ["# kvmsplit bench results", "",
           "Written by `make bench` (`bench/run_all.py`); the raw figures, every repeat, are in "
           "`bench/results.json`. Every figure is a ratio of two things measured in this run, given as "
           "median (min-max, n repeats). Load average (1 min) is given per section: the box is shared.", "",
           "## Machine", "",
           f"- {f['date']}, kernel {f['kernel']}{' (PVM)' if f['pvm'] else ''}, {f['cpus']} CPUs ({f['cpu']}), "
           f"{f['mem_total'] / GiB:.1f} GiB, MemAvailable {f['mem_available'] / GiB:.1f} GiB at the start",
           f"- kvm: {', '.join(f'{k}={v}' for k, v in f['kvm_params'].items())}; THP {f['thp']}; "
           f"load average at the start {f['loadavg']}",
           f"- whole run: {doc.get('total_s', 0):.0f} s" + (" (--quick: small sizes, 2 repeats)"
                                                             if doc["quick"] else ""),
           ""]
    s = doc["sections"]
    for name, fn in (("startup", _startup), ("harness", _harness), ("peer", _peer_host), ("trace", _trace),
                     ("ring", _ring), ("suite", _suite), ("vm", _vm), ("scale", _scale)):
        if name in s:
            out += [f"## {TITLES[name]}", "", _load(s[name]), ""]
            out += fn(s[name]) if "error" not in s[name] else ["Section failed:", "", "```", s[name]["error"], "```"]
            out.append("")
    out += ["## Goals", "", f"{len(goals.items) - len(goals.missed)} met, {len(goals.missed)} missed.", ""]
    out += [f"- {g.line()}" for g in goals.items]
    return "\n".join(out) + "\n"


TITLES = {"startup": "Start-up: process start -> the guest's first line",
          "harness": "Harness overhead in a dirty pass (kvmsplit's own VMM)",
          "peer": "Side by side with dirty_log_perf_test on this host (lazy)",
          "trace": "kvmsplit trace (ptrace) overhead (issue 12)",
          "ring": "Dirty-ring harvesting", "suite": "The default suite on this host",
          "vm": "The 6.12 build under kvmsplit vm: side by side (eager), eager vs lazy, the round trip",
          "scale": "Scale: the largest guest this box holds"}


def _load(r: dict) -> str:
    ld = r.get("load", {})
    kept = f" Measured in an earlier run of this bench on {r['kept_from']}, kept with --keep." \
        if r.get("kept_from") else ""
    return (f"_Section took {r.get('section_s', 0):.0f} s; load average {ld.get('load1_start')} at its start, "
            f"{ld.get('load1_end')} at its end.{kept}_")


def _startup(r: dict) -> list[str]:
    return [f"- kvmsplit's VMM: {fmt_spread(r['kvmsplit_s'], 's', 3)} (goal <= 0.2 s)",
            f"- QEMU backend (`QemuVm`: qemu-system-x86_64 -accel kvm, SeaBIOS, the same guest): "
            f"{fmt_spread(r['qemu_s'], 's', 2)}",
            f"- QEMU / kvmsplit: **{fmt_spread(r['ratio_qemu_over_kvmsplit'])}**"]


def _harness(r: dict) -> list[str]:
    sh = ", ".join(f"{k} {v:.1%}" for k, v in r["share_medians"].items() if v is not None)
    return [f"{r['size_mib']} MiB THP, 2M guest pages, bitmap, 3 dirty passes per run; verdicts {r['verdicts']}", "",
            f"- dirty pass wall / KVM_RUN while the guest works: **{fmt_spread(r['overhead'], 'x', 3)}** "
            f"(goal <= 1.05); with all KVM_RUN in the phase (a lower bound): "
            f"{fmt_spread(r['overhead_all_kvm_run'], 'x', 3)}",
            f"- where the pass's wall goes (medians): {sh}"]


def _peer_table(r: dict) -> list[str]:
    rows = ["| phase | kvmsplit / C | kvmsplit s (median) | C s (median) |", "|---|---|---|---|"]
    for ph in ("populate", "enable", "dirty", "dirty_first", "get_clear", "harvest", "disable", "total"):
        sec = r["seconds"][ph]
        k, c = sec["kvmsplit"], sec["c"]
        rows.append(f"| {ph} | {fmt_spread(r['ratio_kvmsplit_over_c'][ph])} | "
                    f"{k.get('median', float('nan')):.4f} | {c.get('median', float('nan')):.4f} |")
    cfg = r["config"]
    head = (f"**{r['name']}**: {cfg['per_vcpu_mib']} MiB/vCPU, {cfg['vcpus']} vCPU, {cfg['iterations']} "
            f"iterations, {cfg['backing']}, kvmsplit `{cfg['dirty_mode']}` vs C "
            f"`{cfg['c_test_flags'] or '(default)'}`; "
            f"{r['good_repeats']} of {r['repeats']} repeats good; {_peak_rss(r)}; kvmsplit saw split "
            f"{sorted(set(map(str, r['kvmsplit_observed'])))}")
    return [head, "", *rows, ""]


def _peak_rss(r: dict) -> str:
    if r.get("maxrss_source") != "VmHWM":
        return ("peak RSS not shown: this run took it from wait4's ru_maxrss, which carries the bench's own "
                "peak into the child across fork")
    k, c = r["maxrss_kb"]["kvmsplit"], r["maxrss_kb"]["c"]
    if not k.get("n") or not c.get("n"):
        return "peak RSS n/a"
    return f"peak RSS (VmHWM) kvmsplit {k['median'] / 1024:.0f} MiB, C {c['median'] / 1024:.0f} MiB"


def _peer_host(r: dict) -> list[str]:
    if not r.get("available"):
        return ["Not available: dirty_log_perf_test not built."]
    out = [r["note"], "", f"Binary: `{r['configs'][0]['binary']}`.", ""]
    for c in r["configs"]:
        out += _peer_table(c)
    return out


def _trace(r: dict) -> list[str]:
    out = []
    for k, v in r.items():
        if not isinstance(v, dict) or "ratio_wall_traced_over_plain" not in v:
            continue
        line = (f"- {k}: process wall traced/plain **{fmt_spread(v['ratio_wall_traced_over_plain'])}** "
                f"(`kvmsplit trace`'s own Python start included); the program's wall as the tracer saw it / "
                f"plain {fmt_spread(v.get('ratio_program_wall_traced_over_plain', {}))}")
        if v.get("ratio_dirty_traced_over_plain"):
            line += f"; its own dirty-iteration time traced/plain {fmt_spread(v['ratio_dirty_traced_over_plain'])}"
        out.append(line + f" (`{' '.join(v['argv'][-6:])}`)")
    return out


def _ring(r: dict) -> list[str]:
    return [f"{r['size_mib']} MiB THP, 4K guest pages, 2 passes, ring {r['ring_size']}; verdicts {r['verdicts']}",
            "",
            f"- ring harvest (entries read + KVM_RESET_DIRTY_RINGS + page set): "
            f"{fmt_spread(r['ring_entries_per_s'], ' entries/s', 0)}",
            f"- bitmap harvest (KVM_GET_DIRTY_LOG + page set), same pages: "
            f"{fmt_spread(r['bitmap_pages_per_s'], ' pages/s', 0)}",
            f"- ring rate / bitmap rate: **{fmt_spread(r['ratio_ring_over_bitmap_rate'])}**"]


def _dominant(d: dict, top: int = 6) -> list[str]:
    out = ["| where | seconds | share of wall |", "|---|---|---|"]
    out += [f"| {k} | {v['s']:.1f} | {v['share']:.0%} |" for k, v in list(d["by_group"].items())[:top]]
    out += ["", "By phase (summed over scenarios): " +
            ", ".join(f"{k} {v['s']:.1f}s ({v['share']:.0%})" for k, v in list(d["by_phase"].items())[:6]),
            "", "Slowest scenarios: " + ", ".join(f"{n} {s}s" for n, s, _ in d["slowest"])]
    return out


def _suite(r: dict) -> list[str]:
    out = [f"- `kvmsplit run` wall: **{fmt_spread(r['wall_s'], 's', 1)}**; wall / goal (60 s): "
           f"{fmt_spread(r['ratio_wall_over_goal'])}; verdicts {[x['verdicts'] for x in r['runs']]}"
           + (f"; failed: {sorted({n for x in r['runs'] for n in x.get('failed', [])})}" if r["runs"] else ""), ""]
    if r["runs"]:
        out += [f"What dominates ({r['runs'][0]['dominant']['scenarios']} scenarios):", ""]
        out += _dominant(r["runs"][0]["dominant"])
    return out


def _vm(r: dict) -> list[str]:
    if not r.get("boots"):
        return [f"Not available: {r.get('why')}"]
    out = [f"Kernel `{r.get('kernel')}`, dirty_log_perf_test `{r.get('perf_test')}` (both from "
           f"linux-source-6.12), TCG with SVM+NPT, 1 CPU, 4 GiB.", ""]
    for b in r["boots"].values():
        ins = b.get("inside") or {}
        out.append(f"- boot `{b['append']}`: {b['state']}, boot {b['boot_s'] or 0:.0f} s, VM wall "
                   f"{b['vm_wall_s']:.0f} s, inside: kvm params {ins.get('kvm_params')}, load "
                   f"{ins.get('loadavg_start')} -> {ins.get('loadavg_end')}")
    out.append("")
    e = (r["boots"].get("eager=1") or {}).get("inside")
    if e:
        out += ["### Side by side inside the VM (eager)", ""] + _peer_table(e["peer"])
    lz = (r["boots"].get("eager=0") or {}).get("inside")
    if lz:
        out += ["Same, `kvm.eager_page_split=0` (lazy):", ""] + _peer_table(lz["peer"])
    ev = r.get("eager_vs_lazy")
    if ev:
        out += ["### Eager vs lazy, reproduced", "",
                "| who | enable eager/lazy (cost) | first dirty pass lazy/eager (gain) |", "|---|---|---|"]
        for who, x in ev.items():
            if who == "published":
                continue
            out.append(f"| {who} | {fmt_spread(x['enable_cost'])} | {fmt_spread(x['first_pass_gain'])} |")
        p = ev["published"]
        out.append(f"| published: {p['tdp_mmu_v2']['what']} | {p['tdp_mmu_v2']['enable_cost']:.0f}x "
                   f"(0.0017 s -> 1.55 s) | {p['tdp_mmu_v2']['first_pass_gain']:.1f}x (2.94 s -> 0.15 s) |")
        out.append(f"| published: {p['shadow_mmu_v3']['what']} | - | "
                   f"{p['shadow_mmu_v3']['first_pass_gain']:.0f}x (17.9 s -> 0.08 s) |")
        out.append("")
        for who, x in ev.items():
            if who != "published":
                out.append(f"- {who}: enable {_pair(x['enable_s'])}; first pass {_pair(x['dirty1_s'])}"
                           + (f"; observed split {x['observed']}" if "observed" in x else ""))
        out.append("")
    rt = r.get("round_trip")
    if rt:
        out += ["### `kvmsplit vm ... -- kvmsplit run` round trip (the default suite inside, eager boot)", "",
                f"- round trip {rt['round_trip_s']:.0f} s = boot {rt['boot_s']:.0f} s "
                f"(**{rt['boot_share']:.0%}**) + suite {rt['suite_s']:.0f} s (**{rt['suite_share']:.0%}**) + "
                f"shutdown {rt['shutdown_s']:.0f} s; suite exit {rt['suite_rc']}, verdicts {rt['verdicts']}, "
                f"failed {rt.get('failed')}", ""]
        out += _dominant(rt["dominant"])
    return out


def _pair(d: dict) -> str:
    fmt = lambda s: f"{s['median']:.4f}s" if s.get("n") else "n/a"
    return f"eager {fmt(d['eager'])}, lazy {fmt(d['lazy'])}"


def _scale(r: dict) -> list[str]:
    out = [f"Guest {r['size'] / GiB:.0f} GiB, 2M guest pages, bitmap, one dirty pass over 25 % of the pages "
           "(random), in one process per scenario (bench/scale.py).", "",
           "| scenario | verdict | populate s | dirty pass guest s | verify s (4K pages) | harness RSS beyond guest |",
           "|---|---|---|---|---|---|"]
    for x in r["runs"]:
        if "skipped" in x:
            out.append(f"| {x['backing']} {x['vcpus']} vCPU | skipped: {x['skipped']} | | | | |")
            continue
        if "checks" not in x:
            out.append(f"| {x.get('backing')} {x.get('vcpus')} vCPU | error | | | | |")
            continue
        c = x["checks"][0] if x["checks"] else {}
        p = x["passes"][0] if x["passes"] else {}
        out.append(f"| {x['name']} | {x['verdict']} | {x['phases'].get('populate', 0):.1f} | "
                   f"{p.get('guest_s', 0):.1f} | {c.get('verify_s', 0):.4f} ({c.get('pages', 0) / (1 << 20):.0f}M) | "
                   f"{x['overhead_bytes'] / MiB:.0f} MiB |")
    out += ["", f"- dirty-bitmap verification: **{fmt_spread(r['verify_s'], 's', 4)}** per pass; / goal (30 ms): "
            f"{fmt_spread(r['ratio_verify_over_goal'])}"]
    return out
