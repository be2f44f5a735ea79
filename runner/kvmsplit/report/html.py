"""One self-contained HTML page per run: open it from a CI artifact or a
mail attachment, offline, and everything is there. No script, no external
URL: styles are inline and plots are SVG generated here.

Per scenario, two plots: guest memory mapped by page size at the end of
each phase (stacked, in MiB, so a split shows as 2M turning into 4K and
recovery as it turning back), and the phase times with the share spent in
the guest or in KVM ioctls.
"""
from __future__ import annotations

import json
import math
import time
from html import escape

from kvmsplit.kernellog import corrupted_note
from kvmsplit.runs.compare import AB_PHASES, backend
from kvmsplit.runs.digest import (
    failed,
    host_name,
    kernel_release,
    report_text,
    reports,
    rerun_command,
    series_label,
    slug,
)
from kvmsplit.runs.results import ERROR, FAIL, MISS, PASS, SKIP, UNCONFIRMED, RunResult, ScenarioResult

VERDICT_COLOR = {PASS: "#1a7f37", FAIL: "#cf222e", ERROR: "#8250df", SKIP: "#bf8700", MISS: "#6e7781",
                 UNCONFIRMED: "#d4a72c"}
# (stat, label, bytes per page, colour)
PAGE_SIZES = (("pages_4k", "4K", 4 << 10, "#f28e2b"), ("pages_2m", "2M", 2 << 20, "#4e79a7"),
              ("pages_1g", "1G", 1 << 30, "#76b7b2"))
PHASE_COLOR, KERNEL_COLOR = "#c9d6e3", "#59a14f"

CSS = """
body{font:14px/1.45 system-ui,sans-serif;margin:24px;color:#1f2328;max-width:1200px}
h1{font-size:22px;margin:0 0 4px}h2{font-size:18px;margin:28px 0 8px}h3{font-size:15px;margin:14px 0 6px}
.meta{color:#59636e}
.badge{display:inline-block;min-width:52px;text-align:center;color:#fff;font-weight:600;
border-radius:4px;padding:1px 8px;font-size:13px}
.counts .badge{font-size:15px;padding:4px 12px;margin-right:6px}
table{border-collapse:collapse}
td,th{border-bottom:1px solid #d1d9e0;padding:3px 10px;text-align:left;vertical-align:top}
th{background:#f6f8fa}td.num{text-align:right;font-variant-numeric:tabular-nums}
section.scenario{border-top:2px solid #d1d9e0;margin-top:22px}
.plots{display:flex;flex-wrap:wrap;gap:24px}figure{margin:0}figcaption{color:#59636e;font-size:12px}
pre{background:#f6f8fa;padding:8px;overflow-x:auto;font-size:12px;line-height:1.35}
code.rerun{background:#fff8c5;padding:2px 6px}
.kreport{border-left:4px solid #cf222e;padding-left:10px}
.tag{font-size:11px;background:#ddf4ff;border-radius:3px;padding:0 4px}
"""


def badge(verdict: str, text: str | None = None) -> str:
    return (f'<span class="badge" style="background:{VERDICT_COLOR[verdict]}">'
            f"{escape(text or verdict)}</span>")


# -- SVG plots --------------------------------------------------------------------------
def _nice_max(v: float) -> tuple[float, float]:
    """An axis top at or above v, and a round tick step (1, 2 or 5 x 10^n)."""
    if v <= 0:
        return 1.0, 0.25
    raw = v / 4
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 5, 10) if m * mag >= raw)
    return step * math.ceil(v / step), step


def _num(v: float) -> str:
    return f"{v:.0f}" if v >= 10 else f"{v:.3g}"


def page_size_plot(sr: ScenarioResult) -> str | None:
    phases = [p for p in sr.phases if any(k in p.vm_stats for k, *_ in PAGE_SIZES)]
    if not phases:
        return None
    mib = [[p.vm_stats.get(k, 0) * size / 2**20 for k, _, size, _ in PAGE_SIZES] for p in phases]
    top, step = _nice_max(max(sum(m) for m in mib))
    left, plot_h, slot = 56, 180, 58
    w, h = left + slot * len(phases) + 10, plot_h + 70

    def y(v: float) -> float:
        return 20 + plot_h * (1 - v / top)

    out = [f'<svg class="pagesizes" width="{w}" height="{h}" role="img" '
           f'aria-label="guest memory mapped by page size per phase">']
    t = 0.0
    while t <= top + 1e-9:
        out.append(f'<line x1="{left}" x2="{w - 10}" y1="{y(t):.1f}" y2="{y(t):.1f}" stroke="#e1e4e8"/>'
                   f'<text x="{left - 6}" y="{y(t) + 4:.1f}" font-size="11" text-anchor="end">{_num(t)}</text>')
        t += step
    out.append(f'<text x="12" y="{20 + plot_h / 2}" font-size="11" text-anchor="middle" '
               f'transform="rotate(-90 12 {20 + plot_h / 2})">MiB mapped</text>')
    for i, (p, parts) in enumerate(zip(phases, mib)):
        x = left + i * slot + 8
        base = 0.0
        for (key, label, _, color), v in zip(PAGE_SIZES, parts):
            if v > 0:
                tip = f"{p.name}: {p.vm_stats.get(key, 0)} {label} pages ({v:.1f} MiB)"
                out.append(f'<rect x="{x}" y="{y(base + v):.1f}" width="{slot - 16}" '
                           f'height="{y(base) - y(base + v):.1f}" fill="{color}"><title>{escape(tip)}</title></rect>')
            base += v
        events = _trace_label(p.trace)
        if events:      # the second witness, on the same timeline: what the tracepoints saw in the phase
            out.append(f'<text x="{x + (slot - 16) / 2}" y="{y(base) - 4:.1f}" font-size="10" '
                       f'text-anchor="middle" fill="#24292f">{escape(events)}<title>{escape(p.name)}: '
                       f'{escape(json.dumps(p.trace))}</title></text>')
        lx, ly = x + (slot - 16) / 2, 20 + plot_h + 12
        out.append(f'<text x="{lx}" y="{ly}" font-size="11" text-anchor="end" '
                   f'transform="rotate(-35 {lx} {ly})">{escape(p.name)}</text>')
    for j, (_, label, _, color) in enumerate(PAGE_SIZES):
        out.append(f'<rect x="{left + j * 60}" y="2" width="12" height="12" fill="{color}"/>'
                   f'<text x="{left + j * 60 + 16}" y="12" font-size="11">{label}</text>')
    out.append("</svg>")
    return "".join(out)


def _trace_label(trace: dict | None) -> str:
    """A phase's tracepoint counts in a few characters: s=splits, t=new 4K shadow tables, h=huge mapped."""
    if not trace:
        return ""
    splits = sum(int(v) for v in trace.get("splits_by_level", {}).values())
    huge = sum(int(v) for v in trace.get("huge_mapped_by_level", {}).values())
    parts = [f"s{splits}"] if splits else []
    parts += [f"t{trace['new_direct_l1']}"] if trace.get("new_direct_l1") else []
    parts += [f"h{huge}"] if huge else []
    return " ".join(parts)


def vmm_timeline(sr: ScenarioResult) -> str | None:
    """A traced QEMU scenario's timeline: its phases, each QEMU's dirty-logging windows on the test
    DIMM (from `kvmsplit trace`, CLOCK_MONOTONIC like the phase starts) and, under each phase, the
    kernel's split events in it (kvmmmu tracepoints)."""
    traces = (sr.extra or {}).get("vmm_trace") or {}
    starts = (sr.extra or {}).get("phase_starts_monotonic_s") or {}
    bases = [tr["t0_monotonic_s"] for tr in traces.values() if tr.get("t0_monotonic_s") is not None]
    if not bases:
        return None
    t0 = min([*starts.values(), *bases])
    bars = [(p.name, starts[p.name] - t0, starts[p.name] - t0 + p.duration_s) for p in sr.phases if p.name in starts]
    rows = []
    for name, tr in traces.items():
        base = tr.get("t0_monotonic_s")
        for w in tr.get("windows", []) if base is not None else []:
            on = base + w["enabled_ms"] / 1000 - t0
            off = base + (w["disabled_ms"] if w["disabled_ms"] is not None else w["enabled_ms"]) / 1000 - t0
            rows.append((name, on, off, w.get("ended_by")))
    end = max([b[2] for b in bars] + [r[2] for r in rows] + [1e-3])
    width, left, lane = 760, 90, 22

    def x(t: float) -> float:
        return left + (width - left - 10) * max(t, 0.0) / end
    out = [f'<svg class="timeline" width="{width}" height="{3 * lane + 40}" role="img" '
           'aria-label="phases, dirty-logging windows and split events over time">']
    by_phase = {p.name: p for p in sr.phases}
    for name, a, b in bars:
        label = _trace_label(by_phase[name].trace) if name in by_phase else ""
        out.append(f'<rect x="{x(a):.1f}" y="4" width="{max(x(b) - x(a), 1):.1f}" height="{lane - 6}" '
                   f'fill="#ddf4ff" stroke="#54aeff"><title>{escape(name)} {b - a:.3f}s</title></rect>'
                   f'<text x="{x(a) + 2:.1f}" y="{lane - 6}" font-size="9">{escape(name)}</text>')
        if label:
            out.append(f'<text x="{x(a) + 2:.1f}" y="{3 * lane + 8}" font-size="9" fill="#cf222e">'
                       f"{escape(label)}</text>")
    for i, (name, on, off, why) in enumerate(rows):
        y = lane + 4 + (i % 2) * lane
        out.append(f'<rect x="{x(on):.1f}" y="{y}" width="{max(x(off) - x(on), 2):.1f}" height="{lane - 8}" '
                   f'fill="#fd8c73"><title>{escape(name)}: dirty logging {on:.3f}s to {off:.3f}s '
                   f"({escape(str(why))})</title></rect>"
                   f'<text x="4" y="{y + 11}" font-size="10">{escape(name)} logging</text>')
    out.append(f'<text x="4" y="{3 * lane + 8}" font-size="10">kernel</text>'
               f'<text x="{width - 10}" y="{3 * lane + 30}" font-size="10" text-anchor="end">{_num(end)} s</text>'
               "</svg>")
    return "".join(out)


def phase_time_plot(sr: ScenarioResult) -> str | None:
    if not sr.phases:
        return None
    top, step = _nice_max(max(p.duration_s for p in sr.phases))
    left, bar_w, row = 96, 300, 20
    w, h = left + bar_w + 70, 26 + row * len(sr.phases) + 20

    def x(v: float) -> float:
        return left + bar_w * v / top

    out = [f'<svg class="phasetimes" width="{w}" height="{h}" role="img" aria-label="phase times">',
           f'<rect x="{left}" y="2" width="12" height="12" fill="{PHASE_COLOR}"/>'
           f'<text x="{left + 16}" y="12" font-size="11">phase</text>'
           f'<rect x="{left + 70}" y="2" width="12" height="12" fill="{KERNEL_COLOR}"/>'
           f'<text x="{left + 86}" y="12" font-size="11">in guest / KVM</text>']
    for i, p in enumerate(sr.phases):
        yy = 24 + i * row
        tip = f"{p.name}: {p.duration_s:.4f} s, {p.kernel_s:.4f} s in the guest or KVM"
        out.append(f'<text x="{left - 6}" y="{yy + 13}" font-size="11" text-anchor="end">{escape(p.name)}</text>'
                   f'<rect x="{left}" y="{yy + 2}" width="{max(x(p.duration_s) - left, 1):.1f}" height="{row - 5}" '
                   f'fill="{PHASE_COLOR}"><title>{escape(tip)}</title></rect>')
        if p.kernel_s:
            out.append(f'<rect x="{left}" y="{yy + 6}" width="{x(min(p.kernel_s, p.duration_s)) - left:.1f}" '
                       f'height="{row - 13}" fill="{KERNEL_COLOR}"/>')
        out.append(f'<text x="{x(p.duration_s) + 4:.1f}" y="{yy + 13}" font-size="11">{p.duration_s:.3f} s</text>')
    axis_y = 24 + row * len(sr.phases) + 2
    t = 0.0
    while t <= top + 1e-9:
        out.append(f'<line x1="{x(t):.1f}" x2="{x(t):.1f}" y1="22" y2="{axis_y}" stroke="#e1e4e8"/>'
                   f'<text x="{x(t):.1f}" y="{axis_y + 12}" font-size="10" text-anchor="middle">{_num(t)}</text>')
        t += step
    out.append("</svg>")
    return "".join(out)


# -- page parts ---------------------------------------------------------------------------
def _split_cell(sr: ScenarioResult) -> str:
    exp = sr.expectation or {}
    want = exp.get("split", "-") + (f"@{exp['when']}" if exp.get("when") else "")
    return f"{escape(sr.observed_split or '-')} / {escape(want)}"


def _dirty_cell(sr: ScenarioResult) -> str:
    passes = (sr.dirty or {}).get("passes") or []
    if not passes:
        return "-"
    h, w = sum(p.get("harvested", 0) for p in passes), sum(p.get("written", 0) for p in passes)
    miss = sum(p.get("missing", 0) for p in passes)
    return f"{h}/{w}" + (f" ({miss} missing)" if miss else "")


def _vmm_tag(sr: ScenarioResult) -> str:
    return ' <span class="tag">qemu</span>' if backend(sr) == "qemu" else ""


def _summary(rr: RunResult) -> str:
    rows = []
    for sr in rr.scenarios:
        dur = f"{sr.duration_s:.2f}" if sr.duration_s is not None else "-"
        why = escape(sr.reasons[0]) if sr.reasons else ""
        rows.append(f'<tr><td><a href="#s-{slug(sr.name)}">{escape(sr.name)}</a>{_vmm_tag(sr)}</td>'
                    f"<td>{badge(sr.verdict)}</td><td>{_split_cell(sr)}</td><td class=num>{_dirty_cell(sr)}</td>"
                    f"<td class=num>{dur}</td><td>{why}</td></tr>")
    return ("<table><tr><th>scenario</th><th>verdict</th><th>split observed / expected</th>"
            "<th>dirty harvested/written</th><th>seconds</th><th>reason</th></tr>"
            + "".join(rows) + "</table>")


def _scenario(sr: ScenarioResult, source: str) -> str:
    out = [f'<section class="scenario" id="s-{slug(sr.name)}"><h2>{badge(sr.verdict)} {escape(sr.name)}</h2>']
    if sr.reasons:
        out.append("<ul>" + "".join(f"<li>{escape(r)}</li>" for r in sr.reasons) + "</ul>")
    if failed(sr):
        out.append(f'<p>rerun: <code class="rerun">{escape(rerun_command(source, sr.name))}</code></p>')
    plots = [(page_size_plot(sr), "guest memory mapped, by page size, at the end of each phase; above each "
                                  "bar the kvmmmu tracepoints of the phase (s: huge-page splits, t: new 4K "
                                  "shadow tables, h: huge mappings installed)"),
             (phase_time_plot(sr), "phase times (seconds)"),
             (vmm_timeline(sr), "timeline: phases (top), when each QEMU had dirty logging on for the test "
                                "DIMM, from `kvmsplit trace` (middle), and the kernel's tracepoints per phase "
                                "(bottom; s: splits, t: new 4K shadow tables, h: huge mappings installed)")]
    figs = [f"<figure>{svg}<figcaption>{cap}</figcaption></figure>" for svg, cap in plots if svg]
    if figs:
        out.append('<div class="plots">' + "".join(figs) + "</div>")
    for rep in reports(sr):
        frames = rep.get("frames") or []
        out.append(f'<div class="kreport"><h3>kernel: {escape(rep.get("title", "report") + corrupted_note(rep))}</h3>'
                   + (f"<p>call trace: {escape(' < '.join(frames))}</p>" if frames else "")
                   + f"<pre>{escape(report_text(rep))}</pre></div>")
    if sr.checks:
        rows = "".join(f"<tr><td>{escape(c.name)}</td><td>{escape(c.status)}</td><td>{escape(c.summary)}</td></tr>"
                       for c in sr.checks)
        out.append(f"<details><summary>checks</summary><table>{rows}</table></details>")
    if failed(sr) and sr.console_tail:
        out.append("<details><summary>guest console (last lines)</summary><pre>"
                   + escape("\n".join(sr.console_tail)) + "</pre></details>")
    out.append("<details><summary>parameters</summary><pre>"
               + escape(json.dumps(sr.scenario, indent=1)) + "</pre></details>")
    out.append("</section>")
    return "".join(out)


def _host(rr: RunResult) -> str:
    f = rr.host
    virt, cpu = f.get("virtualization", {}), f.get("cpu", {})
    params = f.get("kvm", {}).get("params", {})
    rows = [("host", host_name(rr)), ("kernel", f"{kernel_release(rr)} {f.get('kernel', {}).get('version', '')}"),
            ("cpu", f"{cpu.get('vendor', '')} {cpu.get('model', '')} x{cpu.get('count', '?')}"),
            ("virtualization", f"{virt.get('kind', '?')}; paging {virt.get('paging', '?')}"),
            *[(f"kvm.{k}", str(p.get("raw", p.get("value"))) if isinstance(p, dict) else "absent")
              for k, p in params.items()],
            ("thp", str(f.get("thp"))),
            ("kvmsplit", rr.kvmsplit_version), ("command", " ".join(rr.argv))]
    if rr.host_changes:
        rows.append(("host changes", "; ".join(rr.host_changes)))
    table = "".join(f"<tr><th>{escape(k)}</th><td>{escape(v)}</td></tr>" for k, v in rows)
    return (f'<section id="host"><h2>Host</h2><table>{table}</table><details><summary>all host facts'
            f"</summary><pre>{escape(json.dumps(f, indent=1, default=str))}</pre></details></section>")


def _ab(rr: RunResult, against: RunResult | None) -> str:
    """The A/B view: each scenario that ran on another VMM in `against` (A) than here (B)."""
    if against is None:
        return ""
    in_a = {s.name: s for s in against.scenarios}
    pairs = [(in_a[sb.name], sb) for sb in rr.scenarios if sb.name in in_a and backend(in_a[sb.name]) != backend(sb)]
    if not pairs:
        return f"<h2>A/B</h2><p>no scenario of this run ran on another VMM in run {escape(against.run_id)}</p>"
    rows = []
    for sa, sb in pairs:
        ta, tb = ({p.name: p.duration_s for p in x.phases} for x in (sa, sb))
        times = ", ".join(f"{n} {ta[n]:.2f}/{tb[n]:.2f}" for n in AB_PHASES if n in ta and n in tb)
        rows.append(f"<tr><td>{escape(sb.name)}</td><td>{badge(sa.verdict)} {escape(backend(sa))}</td>"
                    f"<td>{badge(sb.verdict)} {escape(backend(sb))}</td><td>{_split_cell(sa)}</td>"
                    f"<td>{_split_cell(sb)}</td><td class=num>{escape(times)}</td></tr>")
    return (f"<h2>A/B: the same scenarios on two VMMs (A = run {escape(against.run_id)})</h2>"
            "<table><tr><th>scenario</th><th>A</th><th>B (this run)</th><th>A split observed / expected</th>"
            "<th>B split observed / expected</th><th>phase seconds A/B</th></tr>" + "".join(rows) + "</table>")


def html_report(rr: RunResult, source: str, against: RunResult | None = None) -> str:
    c = rr.counts()
    when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(rr.started))
    took = f", {rr.finished - rr.started:.0f} s" if rr.finished else ", unfinished"
    state = " (interrupted)" if rr.interrupted else ""
    series = f" &middot; series {escape(series_label(rr.series))}" if rr.series else ""
    title = f"kvmsplit {rr.run_id} on {host_name(rr)}"
    counts = "".join(badge(v, f"{n} {v}") for v, n in c.items() if n)
    return (f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>{escape(title)}</title>'
            f"<style>{CSS}</style></head><body>"
            f"<h1>kvmsplit report: {escape(host_name(rr))}, kernel {escape(kernel_release(rr))}</h1>"
            f'<p class="meta">run {escape(rr.run_id)} &middot; {when}{took}{state}{series} &middot; '
            f"kvmsplit {escape(rr.kvmsplit_version)}</p>"
            f'<p class="counts">{counts}</p>'
            f"<h2>Summary</h2>{_summary(rr)}{_ab(rr, against)}"
            + "".join(_scenario(sr, source) for sr in rr.scenarios)
            + _host(rr) + "</body></html>\n")
