"""The `history`, `compare`, `rerun` and `report` commands, the options
`kvmsplit run` gains for them, and the sinks a run records itself with.

kvmsplit.cli hooks these in with add_parsers(), add_run_options() and
default_sinks(); heavy imports wait until a command runs.
"""
from __future__ import annotations

import argparse
import socket
import sys
from pathlib import Path

from kvmsplit.errors import EXIT_FAILED, EXIT_OK, UsageError


# -- kvmsplit run -------------------------------------------------------------------------
def add_run_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--db", metavar="PATH",
                        help="history database (default: history.sqlite in kvmsplit's data dir)")
    parser.add_argument("--ktap", action="store_true", help="print KTAP on stdout as scenarios finish")
    g = parser.add_argument_group("patch series under test (recorded in every report)")
    g.add_argument("--series", metavar="NAME", help="series name, e.g. its cover letter subject")
    g.add_argument("--series-version", metavar="N", type=_version, help="series version (the N in vN)")
    g.add_argument("--message-id", metavar="ID", help="message-id of the series' cover letter")
    g.add_argument("--base-commit", metavar="SHA", help="commit the series applies to")


def _version(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"expected a version number like 3, got {text!r}")
    return int(text)


def series_from_args(args) -> dict | None:
    s = {"name": args.series, "version": args.series_version, "message_id": args.message_id,
         "base_commit": args.base_commit}
    return {k: v for k, v in s.items() if v is not None} or None


def default_sinks(args, series: dict | None = None) -> list:
    """What `kvmsplit run` records itself with: report files in the output
    directory, the history database, and KTAP on stdout with --ktap.
    series: recorded when the command line names none (a rerun keeps its original's)."""
    from kvmsplit.runs.history import History, HistorySink
    from kvmsplit.report.ktap import KtapStream
    from kvmsplit.report.outputs import FileSink, RunStamp
    sinks = [RunStamp(series_from_args(args) or series), FileSink(), HistorySink(History(args.db))]
    if args.ktap:
        sinks.append(KtapStream(sys.stdout))
    return sinks


# -- commands -------------------------------------------------------------------------------
def cmd_history(args) -> int:
    from kvmsplit.runs.history import History, fmt_time
    from kvmsplit.runs.digest import series_label
    h = History(args.db)
    rows = h.runs(host=args.host, limit=args.n)
    if not rows:
        print(f"no runs recorded in {h.path}" + (f" for host {args.host}" if args.host else ""))
        return EXIT_OK
    verdicts = ("PASS", "FAIL", "ERROR", "SKIP", "MISS")
    head = ("id", "started", "host", "kernel", *[v.lower() for v in verdicts], "state", "series")
    table = [head] + [(str(r.id), fmt_time(r.started), r.host, r.kernel,
                       *[str(r.counts.get(v, 0)) for v in verdicts], r.state, series_label(r.series))
                      for r in rows]
    widths = [max(len(row[i]) for row in table) for i in range(len(head))]
    right = {0, 4, 5, 6, 7, 8}
    for row in table:
        print("  ".join(c.rjust(w) if i in right else c.ljust(w)
                        for i, (c, w) in enumerate(zip(row, widths))).rstrip())
    return EXIT_OK


def cmd_compare(args) -> int:
    from kvmsplit.runs.compare import compare, format_comparison
    from kvmsplit.runs.history import History, open_run
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
    from kvmsplit.runs.history import History, open_run
    from kvmsplit.report.html import html_report
    from kvmsplit.report.outputs import write_atomic
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


def add_parsers(sub, parser_class) -> None:
    """The history, compare, rerun and report subcommands on kvmsplit's subparsers."""
    from kvmsplit.cli.rerun import cmd_rerun
    db = parser_class(add_help=False)
    db.add_argument("--db", metavar="PATH",
                    help="history database (default: history.sqlite in kvmsplit's data dir)")
    run_help = "a run id from `kvmsplit history`, or a results.json (or its directory)"

    sp = sub.add_parser("history", parents=[db], help="list the runs recorded in the history")
    sp.add_argument("--host", help="only runs on this host")
    sp.add_argument("-n", type=int, default=20, metavar="N", help="the N most recent runs (default 20)")
    sp.set_defaults(func=cmd_history)

    sp = sub.add_parser("compare", parents=[db],
                        help="new failures, fixes, split changes and phase-time regressions between two runs",
                        description="Compare run B with run A (default: the last two runs on this host; "
                                    "one RUN: that run with the latest). Phase times are judged over "
                                    "repeats: B, and its repeats since A, against every run up to A of "
                                    "the same scenario on B's host.")
    sp.add_argument("run_a", nargs="?", metavar="RUN_A", help=run_help)
    sp.add_argument("run_b", nargs="?", metavar="RUN_B", help=run_help)
    sp.add_argument("--exit-code", action="store_true",
                    help="exit 1 when B has new failures or phase-time regressions")
    sp.set_defaults(func=cmd_compare)

    sp = sub.add_parser("rerun", help="run the scenarios of an earlier run again, with the same parameters")
    sp.add_argument("run", metavar="RUN", help=run_help)
    sp.add_argument("--failed", action="store_true", help="only the scenarios that failed (FAIL or ERROR)")
    sp.add_argument("--only", action="append", metavar="NAME", help="only this scenario (repeatable)")
    sp.add_argument("--output", "-o", metavar="DIR", help="write results here (default results/<time>-rerun)")
    sp.add_argument("--expect", choices=("eager", "lazy", "none"),
                    help="override the split expectation (default: the original run's override, if any)")
    sp.add_argument("--phase-timeout", type=float, metavar="S",
                    help="seconds a guest may take in one phase before the scenario is an ERROR")
    sp.add_argument("--no-host-changes", action="store_true",
                    help="never grow hugetlb pools; skip scenarios that would need it")
    add_run_options(sp)
    sp.set_defaults(func=cmd_rerun)

    sp = sub.add_parser("report", parents=[db], help="write a self-contained HTML report of a run")
    sp.add_argument("run", metavar="RUN", help=run_help)
    sp.add_argument("--output", "-o", metavar="FILE.html",
                    help="default: report.html next to results.json, or kvmsplit-<run>.html here")
    sp.set_defaults(func=cmd_report)
