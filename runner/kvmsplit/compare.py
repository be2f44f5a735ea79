"""Two runs side by side: what newly fails, what got fixed, where the split
behaviour changed, and which phases got slower beyond noise.

Phase times are noisy (a shared host, THP compaction, page-cache state), so
one slow sample against one fast one proves nothing. A phase of run B is
judged against the distribution of the same phase of the same scenario
(same name and parameters) in every earlier run on B's host, run A
included: a regression is a time beyond median + K * MAD (the robust
spread; scaled to a standard deviation for normal noise). With fewer than
MIN_SAMPLES earlier runs there is no distribution to judge against, and
the report says so instead of guessing.
"""
from __future__ import annotations

import statistics
from dataclasses import dataclass, field

from .history import History, fmt_time
from .report.digest import (failed, headline, host_name, kernel_release, rerun_command,
                            series_label)
from .results import PASS, RunResult, ScenarioResult

MIN_SAMPLES = 3
NOISE_K = 5.0          # in MADs: far out enough that jitter within the spread never trips it
MAD_TO_SIGMA = 1.4826  # MAD * this estimates the standard deviation of normal noise
# Below these a slowdown is not worth a developer's time even when the
# baseline is so tight (MAD ~ 0: identical samples) that it is "significant".
REL_FLOOR = 0.10
ABS_FLOOR_S = 0.002


@dataclass
class PhaseTime:
    scenario: str
    phase: str
    seconds: float
    samples: list[float]

    @property
    def enough(self) -> bool:
        return len(self.samples) >= MIN_SAMPLES

    @property
    def median(self) -> float:
        return statistics.median(self.samples)

    @property
    def spread(self) -> float:
        """The baseline's MAD, scaled to a standard deviation."""
        med = self.median
        return MAD_TO_SIGMA * statistics.median(abs(s - med) for s in self.samples)

    @property
    def limit(self) -> float:
        med = self.median
        return med + max(NOISE_K * self.spread, REL_FLOOR * med, ABS_FLOOR_S)

    @property
    def regressed(self) -> bool:
        return self.enough and self.seconds > self.limit


@dataclass
class Comparison:
    a: RunResult
    b: RunResult
    new_failures: list[tuple[ScenarioResult, str | None]] = field(default_factory=list)
    fixed: list[tuple[ScenarioResult, ScenarioResult]] = field(default_factory=list)
    split_changes: list[tuple[ScenarioResult, ScenarioResult]] = field(default_factory=list)
    phases: list[PhaseTime] = field(default_factory=list)
    only_a: list[str] = field(default_factory=list)
    only_b: list[str] = field(default_factory=list)

    @property
    def regressions(self) -> list[PhaseTime]:
        return [p for p in self.phases if p.regressed]

    @property
    def unjudged(self) -> list[PhaseTime]:
        return [p for p in self.phases if not p.enough]

    @property
    def worse(self) -> bool:
        return bool(self.new_failures or self.regressions)


def compare(a: RunResult, b: RunResult, history: History) -> Comparison:
    c = Comparison(a, b)
    in_a = {s.name: s for s in a.scenarios}
    in_b = {s.name: s for s in b.scenarios}
    c.only_a = [n for n in in_a if n not in in_b]
    c.only_b = [n for n in in_b if n not in in_a]
    for name, sb in in_b.items():
        sa = in_a.get(name)
        if failed(sb) and not (sa and failed(sa)):
            c.new_failures.append((sb, sa.verdict if sa else None))
        if sa and failed(sa) and sb.verdict == PASS:
            c.fixed.append((sa, sb))
        if sa and sa.observed_split and sb.observed_split and sa.observed_split != sb.observed_split:
            c.split_changes.append((sa, sb))
        c.phases += _phase_times(a, sa, b, sb, history)
    return c


def _phase_times(a: RunResult, sa: ScenarioResult | None, b: RunResult, sb: ScenarioResult,
                 history: History) -> list[PhaseTime]:
    earlier = history.phase_samples(host_name(b), sb, before=b.started)
    # run A counts as one more earlier run when it is not in the history
    # already (a results.json from elsewhere), and is the same scenario on the same host
    a_usable = (sa is not None and sa.scenario == sb.scenario and host_name(a) == host_name(b)
                and a.started < b.started)
    out = []
    for p in sb.phases:
        runs = dict(earlier.get(p.name, {}))
        if a_usable and sa.phase(p.name):
            runs.setdefault((a.run_id, a.started), sa.phase(p.name).duration_s)
        out.append(PhaseTime(sb.name, p.name, p.duration_s, list(runs.values())))
    return out


def _run_line(label: str, rr: RunResult, ref: str) -> str:
    return (f"{label}: {ref} - {fmt_time(rr.started)} on {host_name(rr)}, kernel {kernel_release(rr)}"
            + (f", series {series_label(rr.series)}" if rr.series else ""))


def format_comparison(c: Comparison, ref_a: str, ref_b: str, source_b: str) -> str:
    out = [_run_line("A", c.a, ref_a), _run_line("B", c.b, ref_b), ""]

    def section(title: str, lines: list[str]) -> None:
        out.append(f"{title} ({len(lines)})" + (":" if lines else ""))
        out.extend(lines)

    section("new failures", [
        f"  {sb.verdict:<5} {sb.name} (was {was or 'not run'}): {headline(sb)}\n"
        f"        {rerun_command(source_b, sb.name)}" for sb, was in c.new_failures])
    section("fixed", [f"  {sb.name}: {sa.verdict} -> {sb.verdict}" for sa, sb in c.fixed])
    section("split behaviour changed", [
        f"  {sb.name}: {sa.observed_split} -> {sb.observed_split} (expected "
        f"{sb.expectation.get('split', '?')})" for sa, sb in c.split_changes])
    section(f"phase-time regressions beyond noise, against earlier runs on {host_name(c.b)}", [
        f"  {p.scenario} {p.phase}: {p.seconds:.3f}s, baseline median {p.median:.3f}s "
        f"+- {p.spread:.3f}s over {len(p.samples)} runs (limit {p.limit:.3f}s)"
        for p in c.regressions])
    unjudged = c.unjudged
    if unjudged:
        have = sorted({len(p.samples) for p in unjudged})
        names = sorted({p.scenario for p in unjudged})
        out.append(f"phase times: not enough samples to judge {len(unjudged)} phase(s) of "
                   f"{len(names)} scenario(s): need {MIN_SAMPLES} earlier runs of the same "
                   f"scenario on {host_name(c.b)}, have {'/'.join(map(str, have))}")
    if c.only_a:
        out.append(f"only in A ({len(c.only_a)}): {', '.join(c.only_a)}")
    if c.only_b:
        out.append(f"only in B ({len(c.only_b)}): {', '.join(c.only_b)}")
    return "\n".join(out)
