"""`kvmsplit series`: does a patch series break KVM's dirty logging or splitting?

  kvmsplit series [OPTIONS] SERIES.mbx [-- RUN ARGS]
  kvmsplit series --tree ~/linux v6.12..my-branch -- -k thp
  kvmsplit series --bisect --matrix "kvm.eager_page_split=0,1" SERIES.mbx
  kvmsplit series --remote nightly SERIES.mbx
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from kvmsplit.cli.options import add_db
from kvmsplit.cli.remote import add_connection, remote_run_options
from kvmsplit.errors import EXIT_FAILED, EXIT_OK, UsageError
from kvmsplit.kernel import vm as virtme
from kvmsplit.remote.inventory import Inventory
from kvmsplit.series import source as sources
from kvmsplit.series.pipeline import SeriesRun, Target, matrix
from kvmsplit.series.report import summary, write


def say(msg: str) -> None:
    print(f"kvmsplit series: {msg}", file=sys.stderr, flush=True)


def split_words(words: list[str]) -> tuple[str, list[str]]:
    """SOURCE [-- RUN ARGS]: the source and `kvmsplit run`'s arguments."""
    if not words or words[0] == "--":
        raise UsageError("usage: kvmsplit series [OPTIONS] SOURCE [-- RUN ARGS] (options before SOURCE)")
    src, rest = words[0], words[1:]
    if rest and rest[0] != "--":
        raise UsageError(f"{rest[0]}: put options before SOURCE, and `kvmsplit run`'s after '--'")
    run_args = rest[1:]
    if run_args[:2] == ["kvmsplit", "run"]:
        run_args = run_args[2:]
    if any(a in ("--output", "-o") or a.startswith("--output=") for a in run_args):
        raise UsageError("--output belongs before SOURCE: each run's output goes under it")
    return src, ["run", *run_args]


def cmd_series(args) -> int:
    src, run_args = split_words(args.words)
    if args.repeat < 1:
        raise UsageError(f"--repeat {args.repeat}: at least 1")
    out = Path(args.output or Path("results") / time.strftime("series-%Y%m%d-%H%M%S"))
    if not args.remote:
        virtme.check_shareable(out)          # each run's folder is under it, shared with a VM
    out.mkdir(parents=True, exist_ok=True)
    tree = Path(args.tree) if args.tree else None
    series = sources.load(src, tree, out / "source")
    appends = matrix(args.matrix)
    target = Target(vm_timeout=args.timeout, accel=args.accel, boot_deadline=args.boot_deadline)
    if args.remote:
        boxes = Inventory.load(args.inventory).select([args.remote])
        if len(boxes) != 1:
            raise UsageError(f"--remote {args.remote} names {len(boxes)} boxes; a series runs on one "
                             "(run one job per box, see contrib/)")
        target.box, target.how = boxes[0], remote_run_options(args, args.timeout)
    say(f"{series.name}: {len(series.patches)} patch(es), {len(appends)} combination(s), on {target.describe()}; "
        f"results in {out}/")
    outcome = SeriesRun(series, tree, out, run_args, target, args.db, say).execute(appends, args.bisect,
                                                                                  args.repeat)
    text = summary(outcome)
    print(text)
    files = write(outcome, out, text)
    say("wrote " + ", ".join(str(f) for f in files))
    return EXIT_FAILED if outcome.worse else EXIT_OK


def add_parsers(sub) -> None:
    sp = sub.add_parser("series", help="a patch series vs its base: build both, run the suite under each, compare",
                        description="kvmsplit series [OPTIONS] SOURCE [-- RUN ARGS]; SOURCE is an mbox, a git "
                                    "range A..B (with --tree) or a lore message-id (needs b4 and network)")
    sp.add_argument("--tree", metavar="PATH", help="the kernel git tree (default: Debian's linux-source-*)")
    sp.add_argument("--bisect", action="store_true", help="find the first patch that introduces a new failure")
    sp.add_argument("--matrix", metavar="SPEC",
                    help='module parameters, each combination one boot: "kvm.eager_page_split=0,1 kvm.tdp_mmu=0,1"')
    sp.add_argument("--repeat", type=int, default=1, metavar="N",
                    help="run each kernel N times, so phase times are judged against the spread of repeats "
                         "(3 or more; default 1: phase times are reported, not judged)")
    sp.add_argument("--remote", metavar="BOX|LABEL", help="run on this box (booted into each kernel) instead of "
                                                         "kvmsplit vm here")
    add_connection(sp)
    sp.add_argument("--boot-deadline", type=float, default=900, metavar="S",
                    help="--remote: how long a box may take to come back on a kernel (default 900)")
    sp.add_argument("--accel", choices=("auto", "kvm", "tcg"), default="auto", help="kvmsplit vm's accelerator")
    sp.add_argument("--timeout", type=float, default=3600, metavar="S", help="each run's time limit")
    sp.add_argument("--output", "-o", metavar="DIR", help="default results/series-<time>/")
    add_db(sp)
    sp.add_argument("words", nargs=argparse.REMAINDER, metavar="SOURCE [-- RUN ARGS]")
    sp.set_defaults(func=cmd_series)
