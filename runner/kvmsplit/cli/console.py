"""What a person sees: a live progress line and the verdict table."""
from __future__ import annotations

import shutil
import sys

from kvmsplit.runs.results import RunResult, ScenarioResult, Verdict

COLOR = {Verdict.PASS: "32", Verdict.FAIL: "31", Verdict.ERROR: "35", Verdict.SKIP: "33", Verdict.MISS: "90",
         Verdict.UNCONFIRMED: "93"}


class Progress:
    """One line, rewritten in place on a terminal; plain lines otherwise."""

    def __init__(self, total: int, stream=None, verbose: bool = False):
        # looked up per call, not bound at import: pytest's capture swaps sys.stderr
        self.total, self.stream = total, stream or sys.stderr
        self.tty = self.stream.isatty()
        self.verbose = verbose
        self.done = 0

    def phase(self, name: str, phase: str) -> None:
        if self.verbose:
            clear = "\r\x1b[K" if self.tty else ""
            self.stream.write(f"{clear}[{self.done + 1}/{self.total}] {name}: {phase}\n")
            self.stream.flush()
        elif self.tty:
            line = f"[{self.done + 1}/{self.total}] {name}: {phase}"
            width = shutil.get_terminal_size().columns - 1
            self.stream.write("\r\x1b[K" + line[:width])
            self.stream.flush()

    def result(self, res: ScenarioResult) -> None:
        self.done += 1
        dur = f"{res.duration_s:.1f}s" if res.duration_s is not None else ""
        line = f"[{self.done}/{self.total}] {paint(res.verdict, self.tty)} {res.name} {dur}"
        if res.verdict is not Verdict.PASS and res.reasons:
            line += f" - {res.reasons[0]}"
        self.stream.write(("\r\x1b[K" if self.tty else "") + line + "\n")
        self.stream.flush()


def paint(verdict: Verdict, tty: bool) -> str:
    return f"\x1b[{COLOR[verdict]}m{verdict:<5}\x1b[0m" if tty else f"{verdict:<5}"


def _phase_s(r: ScenarioResult, prefix: str) -> str:
    t = sum(p.duration_s for p in r.phases if p.name == prefix or p.name.startswith(prefix + "-"))
    return f"{t:.2f}" if any(p.name == prefix or p.name.startswith(prefix + "-") for p in r.phases) else "-"


def table(rr: RunResult, tty: bool = False) -> str:
    head = ("scenario", "verdict", "split observed", "expected", "dirty harvested/written",
            "populate", "enable", "dirty", "recovery")
    rows = []
    for r in rr.scenarios:
        exp = r.expectation or {}
        want = exp.get("split", "-")
        if want == "eager":
            want = f"eager@{exp.get('when')}"
        passes = (r.dirty or {}).get("passes") or []
        if passes:
            h, w = sum(p["harvested"] for p in passes), sum(p["written"] for p in passes)
            miss = sum(p["missing"] for p in passes)
            dirty = f"{h}/{w}" + (f" ({miss} missing)" if miss else "")
        else:
            dirty = "-"
        verdict = str(r.verdict)
        rows.append((r.name, verdict, r.observed_split or "-", want, dirty,
                     _phase_s(r, "populate"), _phase_s(r, "enable"), _phase_s(r, "dirty"),
                     _phase_s(r, "recovery")))
    widths = [max(len(str(x[i])) for x in rows + [head]) for i in range(len(head))]
    def fmt(row, color=False):
        cells = [str(c).ljust(w) for c, w in zip(row, widths)]
        if color:
            cells[1] = f"\x1b[{COLOR[Verdict(row[1])]}m{cells[1]}\x1b[0m"
        return "  ".join(cells).rstrip()
    lines = [fmt(head), "  ".join("-" * w for w in widths)]
    lines += [fmt(r, tty) for r in rows]
    lines += ["", summary(rr)]
    notes = [(r.name, x) for r in rr.scenarios if r.verdict is not Verdict.PASS or r.reasons for x in r.reasons[:3]]
    if notes:
        lines.append("")
        lines += [f"{name}: {why}" for name, why in notes]
    return "\n".join(lines)


def summary(rr: RunResult) -> str:
    counts = ", ".join(f"{n} {v.lower()}" for v, n in rr.counts().items() if n)
    return f"{counts} in {len(rr.scenarios)} scenarios"


def selftest_table(rr: RunResult, tty: bool = False) -> str:
    head = ("scenario", "verdict", "time", "exit", "why")
    rows = []
    for r in rr.scenarios:
        x = r.extra or {}
        code = "timeout" if x.get("timed_out") else x.get("signal") or x.get("exit_code")
        dur = f"{r.duration_s:.1f}s" if r.duration_s else "-"
        rows.append((r.name, r.verdict, dur, "-" if code is None else str(code),
                     r.reasons[0] if r.reasons else ""))
    w = [max(len(row[i]) for row in rows + [head]) for i in range(4)]

    def fmt(row, color=False):
        verdict = paint(row[1], True) + " " * (w[1] - 5) if color else row[1].ljust(w[1])
        return "  ".join([row[0].ljust(w[0]), verdict, row[2].rjust(w[2]), row[3].rjust(w[3]), row[4]]).rstrip()
    lines = [fmt(head), fmt(["-" * n for n in w] + ["-" * 3])] + [fmt(r, tty) for r in rows]
    return "\n".join(lines + ["", summary(rr)])
