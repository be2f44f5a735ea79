"""`kvmsplit history`, `compare`, `report` and `kernellog`: reading runs and
kernel logs that already exist."""
from __future__ import annotations

import json
import socket
import sys
from pathlib import Path

from kvmsplit.cli.options import add_db
from kvmsplit.errors import EXIT_FAILED, EXIT_OK, UsageError, read_input
from kvmsplit.kernellog import parse_log_text, parse_reports
from kvmsplit.report.html import html_report
from kvmsplit.report.outputs import write_atomic
from kvmsplit.runs.compare import compare, format_comparison
from kvmsplit.runs.digest import series_label
from kvmsplit.runs.history import History, fmt_time, open_run
from kvmsplit.runs.results import Verdict

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


def cmd_report(args) -> int:
    run = open_run(args.run, History(args.db))
    if args.output:
        out = Path(args.output)
    elif run.path:
        out = run.path.with_name("report.html")
    else:
        out = Path(f"kvmsplit-{run.rr.run_id}.html")
    try:
        write_atomic(out, html_report(run.rr, run.source))
    except OSError as e:
        raise UsageError(f"cannot write {out}: {e.strerror}") from None
    print(f"report: {out}")
    return EXIT_OK


def cmd_kernellog(args) -> int:
    """Scan a saved kernel log (dmesg, console, /dev/kmsg dump) for reports."""
    text = sys.stdin.read() if args.file == "-" else read_input(args.file, errors="replace")
    reports = parse_reports(parse_log_text(text))
    if args.json:
        print(json.dumps([r.to_dict() for r in reports], indent=1))
    else:
        for r in reports:
            print(f"{r.title}\n  " + "\n  ".join(r.frames[:8]) if r.frames else r.title)
        print(f"{len(reports)} report(s) in {args.file}")
    return EXIT_FAILED if reports else EXIT_OK


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

    sp = sub.add_parser("report", help="write a self-contained HTML report of a run")
    add_db(sp)
    sp.add_argument("run", metavar="RUN", help=RUN_HELP)
    sp.add_argument("--output", "-o", metavar="FILE.html",
                    help="default: report.html next to results.json, or kvmsplit-<run>.html here")
    sp.set_defaults(func=cmd_report)

    sp = sub.add_parser("kernellog", help="list the kernel reports (WARNING, BUG, KASAN...) in a saved log")
    sp.add_argument("file", help="dmesg output, a console log or a /dev/kmsg dump; - for stdin")
    sp.add_argument("--json", action="store_true")
    sp.set_defaults(func=cmd_kernellog)
