"""Two runs side by side: what newly fails, what got fixed, where the split
behaviour changed, and which phases got slower beyond noise.

Phase times are noisy (a shared host, THP compaction, a preempted vCPU
thread), so one slow sample against one fast one proves nothing. Each phase
of each scenario of run B is judged over repeats of the same scenario (same
name and parameters) on B's host:

  baseline   every run up to and including A;
  candidate  B, and the runs between A and B with B's kernel and series
             (repeats of what B tests).

With MIN_SAMPLES or more on both sides, the test is a one-sided
Mann-Whitney U (exact, no normality assumed). With one or two candidate
samples, a sample is an outlier when it lies beyond median + NOISE_K robust
standard deviations (from the MAD) of the baseline and beyond every
baseline sample. Either way the slowdown must also clear a floor, which
is higher for a lone sample: one run cannot tell a regression from a
host hiccup of a few milliseconds. With fewer than MIN_SAMPLES baseline
runs nothing is judged, and the report says so.
"""
from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, field
from functools import cache

from kvmsplit.runs.digest import failed, headline, host_name, kernel_release, rerun_command, series_label
from kvmsplit.runs.history import History, Sample, fmt_time
from kvmsplit.runs.results import PASS, RunResult, ScenarioResult

MIN_SAMPLES = 3
# Mann-Whitney: the chance of calling noise a regression, per phase. Three
# repeats can reach it against seven or more baseline runs (1 / C(10, 3)).
ALPHA = 0.01
NOISE_K = 5.0          # outlier test, in robust standard deviations
MAD_TO_SIGMA = 1.4826  # MAD * this estimates the standard deviation of normal noise
MAX_BASELINE = 30      # the most recent runs: the host and kernel drift over months
# The least slowdown worth a developer's time, relative to the baseline median
# and absolute. Needed because a tight baseline (MAD ~ 0) makes any change
# "significant"; a lone sample's floor also absorbs scheduler hiccups.
FLOOR_REPEATS = (0.10, 0.002)
FLOOR_LONE = (0.25, 0.020)


@cache
def _u_counts(n: int, m: int) -> tuple[int, ...]:
    """How many orderings of n + m distinct values give each U (0..n*m), where
    U counts the (x, y) pairs with x > y. The largest value is either an x
    (beating all m y's) or a y."""
    if n == 0 or m == 0:
        return (1,)
    out = [0] * (n * m + 1)
    for u, k in enumerate(_u_counts(n - 1, m)):
        out[u + m] += k
    for u, k in enumerate(_u_counts(n, m - 1)):
        out[u] += k
    return tuple(out)


def mann_whitney_greater(x: list[float], y: list[float]) -> float:
    """Exact one-sided p-value that x tends to be larger than y (ties count half)."""
    u = sum(1.0 if a > b else 0.5 if a == b else 0.0 for a in x for b in y)
    counts = _u_counts(len(x), len(y))
    return sum(counts[math.ceil(u):]) / math.comb(len(x) + len(y), len(x))


@dataclass
class PhaseTime:
    scenario: str
    phase: str
    seconds: float              # in run B
    baseline: list[float]
    candidate: list[float]      # B's, and its repeats since A

    @property
    def enough(self) -> bool:
        return len(self.baseline) >= MIN_SAMPLES

    @property
    def repeated(self) -> bool:
        return len(self.candidate) >= MIN_SAMPLES

    @property
    def median(self) -> float:
        return statistics.median(self.baseline)

    @property
    def spread(self) -> float:
        """The baseline's MAD, scaled to a standard deviation."""
        med = self.median
        return MAD_TO_SIGMA * statistics.median(abs(s - med) for s in self.baseline)

    @property
    def floor(self) -> float:
        rel, absolute = FLOOR_REPEATS if self.repeated else FLOOR_LONE
        return self.median + max(rel * self.median, absolute)

    @property
    def p_value(self) -> float:
        return mann_whitney_greater(self.candidate, self.baseline)

    @property
    def regressed(self) -> bool:
        if not self.enough:
            return False
        if self.repeated:
            return statistics.median(self.candidate) > self.floor and self.p_value < ALPHA
        return (self.seconds > self.floor and self.seconds > max(self.baseline)
                and self.seconds > self.median + NOISE_K * self.spread)

    def describe(self) -> str:
        if self.repeated:
            return (f"median {statistics.median(self.candidate):.3f}s over {len(self.candidate)} runs "
                    f"vs {self.median:.3f}s over {len(self.baseline)} (Mann-Whitney p={self.p_value:.4f})")
        return (f"{self.seconds:.3f}s vs baseline median {self.median:.3f}s +- {self.spread:.3f}s "
                f"over {len(self.baseline)} runs (one sample; repeat the run to confirm)")


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
    # the same scenario on two VMMs (kvmsplit's own and QEMU): the A/B view
    backends: list[tuple[ScenarioResult, ScenarioResult]] = field(default_factory=list)

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
        if sa and backend(sa) != backend(sb):
            c.backends.append((sa, sb))
        c.phases += _phase_times(a, sa, b, sb, history)
    return c


def backend(s: ScenarioResult) -> str:
    """The VMM a scenario ran on: kvm (kvmsplit's own) or qemu; '-' for other kinds (selftests)."""
    return str(s.scenario.get("backend", "kvm")) if "dirty_mode" in s.scenario else "-"


AB_PHASES = ("boot", "populate", "enable", "dirty-1", "recovery", "verify")


def ab_line(sa: ScenarioResult, sb: ScenarioResult) -> str:
    """One scenario on two VMMs: verdicts, splits, and the phase times side by side."""
    ta, tb = ({p.name: p.duration_s for p in s.phases} for s in (sa, sb))
    times = ", ".join(f"{n} {ta[n]:.2f}/{tb[n]:.2f}s" for n in AB_PHASES if n in ta and n in tb)
    return (f"  {sb.name}: {sa.verdict}/{sb.verdict}, split {sa.observed_split or '-'}/"
            f"{sb.observed_split or '-'}" + (f"; {times}" if times else ""))


def _phase_times(a: RunResult, sa: ScenarioResult | None, b: RunResult, sb: ScenarioResult,
                 history: History) -> list[PhaseTime]:
    cut = min(a.started, b.started)
    group_b = (kernel_release(b), b.series)
    samples = history.phase_samples(host_name(b), sb, before=b.started)
    # run A is a baseline sample of its own when it is not stored (a
    # results.json from elsewhere) and ran the same scenario on the same host
    if sa is not None and sa.scenario == sb.scenario and host_name(a) == host_name(b) and \
            not any(s.run == (a.run_id, a.started) for s in samples):
        samples += [Sample((a.run_id, a.started), kernel_release(a), a.series, p.name, p.duration_s)
                    for p in sa.phases]
    out = []
    for p in sb.phases:
        mine = sorted((s for s in samples if s.phase == p.name), key=lambda s: s.run[1])
        base = [s.seconds for s in mine if s.run[1] <= cut][-MAX_BASELINE:]
        repeats = [s.seconds for s in mine if s.run[1] > cut and (s.kernel, s.series) == group_b]
        out.append(PhaseTime(sb.name, p.name, p.duration_s, base, (repeats + [p.duration_s])[-MAX_BASELINE:]))
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
    section(f"phase-time regressions beyond noise, against earlier runs on {host_name(c.b)}",
            [f"  {p.scenario} {p.phase}: {p.describe()}" for p in c.regressions])
    unjudged = c.unjudged
    if unjudged:
        have = sorted({len(p.baseline) for p in unjudged})
        names = sorted({p.scenario for p in unjudged})
        out.append(f"phase times: not enough samples to judge {len(unjudged)} phase(s) of "
                   f"{len(names)} scenario(s): need {MIN_SAMPLES} earlier runs of the same "
                   f"scenario on {host_name(c.b)}, have {'/'.join(map(str, have))}")
    if c.backends:
        pairs = sorted({f"A {backend(sa)}, B {backend(sb)}" for sa, sb in c.backends})
        section(f"the same scenarios on two VMMs ({'; '.join(pairs)}): A/B verdict, split, phase times",
                [ab_line(sa, sb) for sa, sb in c.backends])
    if c.only_a:
        out.append(f"only in A ({len(c.only_a)}): {', '.join(c.only_a)}")
    if c.only_b:
        out.append(f"only in B ({len(c.only_b)}): {', '.join(c.only_b)}")
    return "\n".join(out)
