"""What several commands share, declared once: the parser class, the
options (-k, --db, run options, series), the probe-or-exit step, the sinks
a run records itself with, and the epilogue that prints its table."""
from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from pathlib import Path

from kvmsplit.errors import NoKvmError, UsageError
from kvmsplit.host.facts import HostFacts, KvmUnavailable, probe
from kvmsplit.report.ktap import KtapStream
from kvmsplit.report.outputs import FileSink, RunStamp
from kvmsplit.runs.history import History, HistorySink
from kvmsplit.runs.results import RunResult


class Parser(argparse.ArgumentParser):
    def error(self, message):  # argparse's own exit code 2 would read as "no /dev/kvm"
        raise UsageError(f"{self.prog}: {message}")


def say(msg: str) -> None:
    print(f"kvmsplit: {msg}", file=sys.stderr)


def host_facts() -> HostFacts:
    """The probed host, or the one-line 'no usable /dev/kvm' exit."""
    try:
        return probe()
    except KvmUnavailable as e:
        raise NoKvmError(str(e)) from None


# -- options ------------------------------------------------------------------------------
def add_db(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--db", metavar="PATH",
                        help="history database (default: history.sqlite in kvmsplit's data dir)")


def add_selection(parser: argparse.ArgumentParser, source: str = "--scenario") -> None:
    parser.add_argument("-k", action="append", metavar="PATTERN",
                        help="only scenarios whose name contains PATTERN (glob allowed; repeatable)")
    if source == "--scenario":
        parser.add_argument("--scenario", action="append", metavar="FILE.toml",
                            help="scenarios from a TOML file instead of the default suite")
        parser.add_argument("--full", action="store_true",
                            help="the full suite: the default one and the 4K-over-1G variants it leaves out "
                                 "(-k always picks from the full suite)")
    else:
        parser.add_argument("--manifest", metavar="FILE.toml",
                            help="the selftests to run (default: kselftests/manifest.toml)")


def add_backend(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--backend", choices=("kvm", "qemu"),
                        help="the VMM: kvm (kvmsplit's own on /dev/kvm; the default) or qemu "
                             "(qemu-system-x86_64 -accel kvm: live migration, calc-dirty-rate); "
                             "overrides scenario files' backend")


def add_expect(parser: argparse.ArgumentParser, help: str = "override the host rule's split expectation") -> None:
    parser.add_argument("--expect", choices=("eager", "lazy", "none"), help=help)


def add_run_options(parser: argparse.ArgumentParser, default_output: str) -> None:
    """What every command that runs scenarios takes: where results go, the
    host-change policy, and how the run records itself."""
    parser.add_argument("--output", "-o", metavar="DIR", help=f"write results here (default {default_output})")
    parser.add_argument("--no-host-changes", action="store_true",
                        help="never grow hugetlb pools; skip scenarios that would need it")
    parser.add_argument("--no-wait", action="store_true",
                        help="if another kvmsplit run is changing a hugetlb pool, skip the scenario "
                             "instead of waiting for it")
    parser.add_argument("--accept-user-log", action="store_true",
                        help="also treat user-written /dev/kmsg lines as kernel reports (for testing kvmsplit)")
    parser.add_argument("--allow-unchecked", action="store_true",
                        help="exit 0 even where a witness was missing (UNCONFIRMED: an unreadable kernel log, "
                             "no tracepoints); e.g. a rerun without root")
    add_db(parser)
    parser.add_argument("--ktap", action="store_true", help="print KTAP on stdout as scenarios finish")
    g = parser.add_argument_group("patch series under test (recorded in every report)")
    g.add_argument("--series", metavar="NAME", help="series name, e.g. its cover letter subject")
    g.add_argument("--series-version", metavar="N", type=_version, help="series version (the N in vN)")
    g.add_argument("--message-id", metavar="ID", help="message-id of the series' cover letter")
    g.add_argument("--base-commit", metavar="SHA", help="commit the series applies to")


def add_phase_timeout(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--phase-timeout", type=float, metavar="S",
                        help="seconds a guest may take in one phase before the scenario is an ERROR")


def add_repeat(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--repeat", type=_repeat, metavar="M",
                        help="run the scenarios M times (each run its own results, under DIR/repeat-N/) "
                             "and print, per scenario, how many of the M repeats failed")


def _repeat(text: str) -> int:
    if not text.isdigit() or not 1 <= int(text) <= 1000:
        raise argparse.ArgumentTypeError(f"expected a number of repeats 1..1000, got {text!r}")
    return int(text)


def _version(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"expected a version number like 3, got {text!r}")
    return int(text)


def series_from_args(args) -> dict | None:
    s = {"name": args.series, "version": args.series_version, "message_id": args.message_id,
         "base_commit": args.base_commit}
    return {k: v for k, v in s.items() if v is not None} or None


# -- running ------------------------------------------------------------------------------
def output_dir(args, suffix: str = "") -> Path:
    """--output, or a new results/<time><suffix>[-N] made here and now: two runs
    started in the same second never share (and overwrite) one directory."""
    if args.output:
        return Path(args.output)
    base = Path("results") / (time.strftime("%Y%m%d-%H%M%S") + suffix)
    base.parent.mkdir(parents=True, exist_ok=True)
    for n in range(1000):
        d = base if n == 0 else base.with_name(f"{base.name}-{n}")
        try:
            d.mkdir()
            return d
        except FileExistsError:
            continue
    raise UsageError(f"cannot make a new results directory next to {base}")


def default_sinks(args, series: dict | None = None) -> list:
    """What a run records itself with: report files in the output directory,
    the history database, and KTAP on stdout with --ktap.
    series: recorded when the command line names none (a rerun keeps its original's)."""
    sinks = [RunStamp(series_from_args(args) or series), FileSink(), HistorySink(History(args.db))]
    if args.ktap:
        sinks.append(KtapStream(sys.stdout))
    return sinks


def finish(args, rr: RunResult, out: Path, table: Callable[[RunResult, bool], str]) -> int:
    """The epilogue of every run: its table and where the results are, on
    stdout (stderr with --ktap, which owns stdout), coloured only if that
    stream is a terminal; then the exit code."""
    human = sys.stderr if args.ktap else sys.stdout
    print(table(rr, human.isatty()), file=human)
    print(f"\nresults: {out / 'results.json'}", file=human)
    code = rr.exit_code(allow_unchecked=args.allow_unchecked)
    for sr in rr.internal_errors:
        print(f"kvmsplit: internal error in {sr.name} (a kvmsplit bug; traceback in results.json):\n"
              f"{sr.extra['internal_error']}", file=sys.stderr)
    return code
