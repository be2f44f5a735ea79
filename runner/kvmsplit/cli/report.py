"""`kvmsplit history`, `compare`, `report` and `kernellog`: reading runs and
kernel logs that already exist."""
from __future__ import annotations

import difflib
import json
import re
import socket
import sys
from pathlib import Path

from kvmsplit.cli.options import add_db
from kvmsplit.errors import EXIT_FAILED, EXIT_OK, UsageError, read_input
from kvmsplit.kernellog import Report, corrupted_note, parse_log_text, parse_reports
from kvmsplit.kernellog.follow import QUIET_S, End, follow
from kvmsplit.report.html import html_report
from kvmsplit.report.outputs import write_atomic
from kvmsplit.runs.compare import compare, format_comparison
from kvmsplit.runs.digest import FAILED, kind, series_label
from kvmsplit.runs.history import History, LoadedRun, fmt_time, open_run
from kvmsplit.runs.results import ScenarioResult, Verdict
from kvmsplit.scenario.model import Scenario, to_toml

RUN_HELP = "a run id from `kvmsplit history`, or a results.json (or its directory)"


# -- commands -------------------------------------------------------------------------------
def cmd_history(args) -> int:
    h = History(args.db)
    rows = h.runs(host=args.host, limit=args.n)
    if not rows:
        print(f"no runs recorded in {h.path}" + (f" for host {args.host}" if args.host else ""))
        return EXIT_OK
    verdicts = tuple(Verdict)
    head = ("id", "started", "host", "kernel", *[v.lower() for v in verdicts], "state", "series")
    table = [head] + [(str(r.id), fmt_time(r.started), r.host, r.kernel,
                       *[str(r.counts.get(v, 0)) for v in verdicts], r.state, series_label(r.series))
                      for r in rows]
    widths = [max(len(row[i]) for row in table) for i in range(len(head))]
    right = {0, *range(4, 4 + len(verdicts))}
    for row in table:
        print("  ".join(c.rjust(w) if i in right else c.ljust(w)
                        for i, (c, w) in enumerate(zip(row, widths))).rstrip())
    return EXIT_OK


def cmd_compare(args) -> int:
    h = History(args.db)
    if args.run_b:
        a, b = open_run(args.run_a, h), open_run(args.run_b, h)
    else:
        here = socket.gethostname()
        latest = [str(r.id) for r in h.runs(host=here, limit=2)]
        # one RUN: that run against the latest; none: the last two
        refs = [args.run_a] + latest[:1] if args.run_a else latest[::-1]
        if len(refs) < 2:
            print(f"fewer than two runs to compare: {len(latest)} recorded for {here} in {h.path}")
            return EXIT_OK
        a, b = open_run(refs[0], h), open_run(refs[1], h)
    c = compare(a.rr, b.rr, h)
    print(format_comparison(c, a.ref, b.ref, b.source))
    return EXIT_FAILED if args.exit_code and c.worse else EXIT_OK


def _failing(run: LoadedRun, name: str | None) -> ScenarioResult:
    """The scenario a reproducer is for: NAME, or the run's first failing one of kvmsplit's own."""
    ours = [s for s in run.rr.scenarios if kind(s) == "scenario"]
    if name:
        hit = next((s for s in ours if s.name == name), None)
        if hit is None:
            close = difflib.get_close_matches(name, [s.name for s in ours], n=1)
            raise UsageError(f"--scenario {name}: no such kvmsplit scenario in {run.ref}"
                             + (f" (did you mean '{close[0]}'?)" if close else ""))
        return hit
    hit = next((s for s in ours if s.verdict in FAILED), None)
    if hit is None:
        raise UsageError(f"no failing kvmsplit scenario in {run.ref}: name one with --scenario NAME")
    return hit


def reproducer(run: LoadedRun, sr: ScenarioResult, path: Path) -> str:
    """A self-contained scenario file for one scenario: the scenario itself, then as
    comments the exact command, what it showed, the kernel and the host facts."""
    scenario = Scenario.from_dict(sr.scenario, where=f"{run.ref}: scenario '{sr.name}'")
    exp = sr.expectation or {}
    forced = exp.get("split") if exp.get("overridden") and exp.get("split") != scenario.expect else None
    host = run.rr.host
    kernel = host.get("kernel", {})
    command = f"kvmsplit run --scenario {path}" + (f" --expect {forced}" if forced else "")
    header = [f"kvmsplit reproducer: scenario '{sr.name}' from {run.ref}",
              f"run it:  {command}",
              f"also:    kvmsplit run --scenario {path} --repeat 10   (how often it fails here)",
              f"verdict: {sr.verdict.value}" + (f" (phase {sr.error_phase})" if sr.error_phase else "")]
    header += [f"  {r}" for r in sr.reasons]
    header += [f"kernel report: {r.get('title')}" for r in (sr.kernel_log or {}).get("reports", [])]
    header += [f"kernel: {kernel.get('release')} {kernel.get('version', '')}".rstrip(),
               f"kvmsplit: {run.rr.kvmsplit_version}; original command: {' '.join(run.rr.argv)}",
               "host facts (kvmsplit probe --json):"]
    header += [f"  {line}" for line in json.dumps(host, indent=1, sort_keys=True, default=str).splitlines()]
    return to_toml([scenario], header)


def cmd_reproducer(args) -> int:
    run = open_run(args.run, History(args.db))
    sr = _failing(run, args.scenario)
    slug = re.sub(r"[^A-Za-z0-9_.-]+", "-", sr.name).strip("-")
    out = Path(args.output) if args.output else \
        (run.path.parent if run.path else Path(".")) / f"reproducer-{slug}.toml"
    try:
        write_atomic(out, reproducer(run, sr, out))
    except OSError as e:
        raise UsageError(f"cannot write {out}: {e.strerror}") from None
    print(f"reproducer: {out}\nrun it:     kvmsplit run --scenario {out}")
    return EXIT_OK


def cmd_report(args) -> int:
    if args.reproducer:
        return cmd_reproducer(args)
    if args.scenario:
        raise UsageError("--scenario picks the scenario of a --reproducer")
    run = open_run(args.run, History(args.db))
    if args.output:
        out = Path(args.output)
    elif run.path:
        out = run.path.with_name("report.html")
    else:
        out = Path(f"kvmsplit-{run.rr.run_id}.html")
    against = open_run(args.against, History(args.db)).rr if args.against else None
    try:
        write_atomic(out, html_report(run.rr, run.source, against))
    except OSError as e:
        raise UsageError(f"cannot write {out}: {e.strerror}") from None
    print(f"report: {out}")
    return EXIT_OK


def cmd_kernellog(args) -> int:
    """Scan a saved kernel log (dmesg, console, /dev/kmsg dump) for reports, or
    follow a live one and print each report as it completes."""
    if args.follow:
        return _follow_kernellog(args)
    if args.file is None:
        raise UsageError("kernellog: name a FILE (or - for stdin), or --follow [FILE|/dev/kmsg]")
    text = sys.stdin.read() if args.file == "-" else read_input(args.file, errors="replace")
    reports = parse_reports(parse_log_text(text))
    if args.json:
        print(json.dumps([r.to_dict() for r in reports], indent=1))
    else:
        for r in reports:
            _print_report(r)
        print(f"{len(reports)} report(s) in {args.file}")
    return EXIT_FAILED if reports else EXIT_OK


def _print_report(r: Report) -> None:
    title = r.title + corrupted_note(r.to_dict())
    print(f"{title}\n  " + "\n  ".join(r.frames[:8]) if r.frames else title, flush=True)


def _follow_kernellog(args) -> int:
    """Until the input ends or Ctrl-C: both end the command normally, after the
    reports still pending are printed. JSON: one report object per line."""
    if not args.quiet > 0:
        raise UsageError(f"kernellog: --quiet must be more than 0 seconds, not {args.quiet:g}")
    source = args.file or "/dev/kmsg"
    found = []

    def show(r: Report) -> None:
        found.append(r)
        if args.json:
            print(json.dumps(r.to_dict()), flush=True)
        else:
            _print_report(r)
    end = follow(source, show, quiet_s=args.quiet)
    if not args.json:
        print(f"{len(found)} report(s) in {source} ({'interrupted' if end is End.INTERRUPTED else end})",
              flush=True)
    return EXIT_FAILED if found else EXIT_OK


def add_parsers(sub) -> None:
    sp = sub.add_parser("history", help="list the runs recorded in the history")
    add_db(sp)
    sp.add_argument("--host", help="only runs on this host")
    sp.add_argument("-n", type=int, default=20, metavar="N", help="the N most recent runs (default 20)")
    sp.set_defaults(func=cmd_history)

    sp = sub.add_parser("compare",
                        help="new failures, fixes, split changes and phase-time regressions between two runs",
                        description="Compare run B with run A (default: the last two runs on this host; "
                                    "one RUN: that run with the latest). Phase times are judged over "
                                    "repeats: B, and its repeats since A, against every run up to A of "
                                    "the same scenario on B's host.")
    add_db(sp)
    sp.add_argument("run_a", nargs="?", metavar="RUN_A", help=RUN_HELP)
    sp.add_argument("run_b", nargs="?", metavar="RUN_B", help=RUN_HELP)
    sp.add_argument("--exit-code", action="store_true",
                    help="exit 1 when B has new failures or phase-time regressions")
    sp.set_defaults(func=cmd_compare)

    sp = sub.add_parser("report", help="write a self-contained HTML report of a run, or a reproducer")
    add_db(sp)
    sp.add_argument("run", metavar="RUN", help=RUN_HELP)
    sp.add_argument("--output", "-o", metavar="FILE",
                    help="default: report.html next to results.json, or kvmsplit-<run>.html here; with "
                         "--reproducer: reproducer-<scenario>.toml next to results.json")
    sp.add_argument("--reproducer", action="store_true",
                    help="instead: a self-contained scenario file for one failing scenario (what `kvmsplit "
                         "run --scenario FILE` runs again), with the exact command, the kernel and the host "
                         "facts: what to attach to a bug report")
    sp.add_argument("--scenario", metavar="NAME", help="with --reproducer: this scenario (default: the "
                                                       "first that failed)")
    sp.add_argument("--against", metavar="RUN_A",
                    help="an A/B view: the scenarios RUN_A ran on another VMM (--backend), side by side")
    sp.set_defaults(func=cmd_report)

    sp = sub.add_parser("kernellog", help="list the kernel reports (WARNING, BUG, KASAN...) in a saved log, "
                                          "or follow a live one")
    sp.add_argument("file", nargs="?", metavar="FILE",
                    help="dmesg output, a console log or a /dev/kmsg dump; - for stdin. With --follow: "
                         "a console being written (a FIFO, a pty, a growing file) or /dev/kmsg (the "
                         "default: new records only)")
    sp.add_argument("--follow", "-f", action="store_true",
                    help="print each report as it completes, until the input ends or Ctrl-C")
    sp.add_argument("--quiet", type=float, default=QUIET_S, metavar="SECONDS",
                    help=f"with --follow: a report with no end marker is printed once the log has been "
                         f"quiet this long (default {QUIET_S:g})")
    sp.add_argument("--json", action="store_true", help="reports as JSON (with --follow: one per line)")
    sp.set_defaults(func=cmd_kernellog)
