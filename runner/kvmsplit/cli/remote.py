"""`kvmsplit remote`: kvmsplit on the boxes of an inventory, over SSH.

  kvmsplit remote list
  kvmsplit remote run BOX|LABEL... -- kvmsplit run -k thp
  kvmsplit remote boot BOX --kernel bzImage [--initrd FILE] [--append ARGS]
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from kvmsplit.cli.options import add_db
from kvmsplit.errors import EXIT_OK, UsageError
from kvmsplit.remote.boot import boot
from kvmsplit.remote.inventory import Inventory
from kvmsplit.remote.run import BoxRun, Interrupted, RemoteRun, command_on_box, run_on_boxes
from kvmsplit.remote.ssh import HostKeyTrust, Liveness
from kvmsplit.report.outputs import FileSink
from kvmsplit.runs.digest import FAILED, headline
from kvmsplit.runs.history import History, HistorySink
from kvmsplit.runs.loop import replay
from kvmsplit.runs.results import MISS


def add_inventory(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--inventory", metavar="FILE.toml",
                        help="the boxes (default: $KVMSPLIT_INVENTORY or ~/.config/kvmsplit/boxes.toml)")


def add_connection(parser: argparse.ArgumentParser) -> None:
    """How boxes are reached: host-key trust and the deadlines that keep a dead box from hanging us."""
    add_inventory(parser)
    parser.add_argument("--accept-new-host-key", action="store_true",
                        help="accept (and save) a host key known_hosts lacks, saying so; a changed key is "
                             "always refused")
    parser.add_argument("--connect-timeout", type=float, default=15.0, metavar="S")
    parser.add_argument("--alive-interval", type=float, default=10.0, metavar="S",
                        help="after this much silence, ask the box for a reply (default 10)")
    parser.add_argument("--alive-count", type=int, default=3, metavar="N",
                        help="unanswered intervals before a box counts as dead (default 3)")


def remote_run_options(args, timeout: float) -> RemoteRun:
    return RemoteRun(timeout=timeout,
                     trust=HostKeyTrust.ACCEPT_NEW if args.accept_new_host_key else HostKeyTrust.KNOWN,
                     live=Liveness(args.alive_interval, args.alive_count), connect_timeout=args.connect_timeout)


def split_targets(words: list[str]) -> tuple[list[str], list[str]]:
    """BOX|LABEL... -- kvmsplit COMMAND...: (targets, command)."""
    if "--" not in words:
        raise UsageError("usage: kvmsplit remote run [OPTIONS] BOX|LABEL... -- kvmsplit COMMAND ...")
    i = words.index("--")
    targets, command = words[:i], words[i + 1:]
    opts = [t for t in targets if t.startswith("-")]
    if opts:
        raise UsageError(f"{opts[0]}: put options before the box names")
    if not command:
        raise UsageError("nothing to run after '--' (e.g. -- kvmsplit run -k thp)")
    return targets, command


def say(msg: str) -> None:
    print(f"kvmsplit: {msg}", file=sys.stderr, flush=True)


def record(runs: list[BoxRun], db: str | None) -> None:
    """Each box's run in the local history (marked with its box) and its report files in OUT/BOX/."""
    for r in runs:
        replay(r.rr, r.out, [FileSink(), HistorySink(History(db))])


def summary(runs: list[BoxRun]) -> str:
    lines = []
    for r in runs:
        c = r.rr.counts()
        counts = ", ".join(f"{n} {v}" for v, n in c.items() if n)
        lines.append(f"{r.box.name:<16} exit {r.exit_code}  {counts or 'nothing ran'}  -> {r.out}/")
        if r.problem:
            lines.append(f"{'':<16} {r.problem}")
        for s in r.rr.scenarios:
            if s.verdict in (*FAILED, MISS):
                lines.append(f"{'':<16} {s.verdict:<5} {s.name}: {headline(s)}")
    return "\n".join(lines)


def cmd_remote_run(args) -> int:
    targets, command = split_targets(args.words)
    command_on_box(command, ["kvmsplit"], "-")     # a command the boxes cannot run is refused here
    boxes = Inventory.load(args.inventory).select(targets)
    out = Path(args.output or Path("out") / time.strftime("%Y%m%d-%H%M%S"))
    say(f"running on {', '.join(b.describe() for b in boxes)}; results in {out}/BOX/")
    try:
        runs = run_on_boxes(boxes, command, out, remote_run_options(args, args.timeout),
                            echo=lambda line: print(line, file=sys.stderr, flush=True))
    except Interrupted as e:
        record(e.runs, args.db)         # what the boxes finished is kept, here and in the history
        print(summary(e.runs))
        raise
    record(runs, args.db)
    print(summary(runs))
    return max(r.exit_code for r in runs)


def cmd_remote_boot(args) -> int:
    box = Inventory.load(args.inventory).select([args.box])
    if len(box) != 1:
        raise UsageError(f"'{args.box}' names {len(box)} boxes; boot one at a time")
    res = boot(box[0], Path(args.kernel), Path(args.initrd) if args.initrd else None, args.append, args.release,
               args.deadline, remote_run_options(args, 300), say)
    print(res.describe())
    return res.outcome.exit_code


def cmd_remote_list(args) -> int:
    inv = Inventory.load(args.inventory)
    for b in inv.boxes.values():
        print(f"{b.name:<16} {b.user}@{b.host}:{b.port:<6} switch={b.switch:<12} labels={','.join(b.labels)}")
    return EXIT_OK


def add_parsers(sub) -> None:
    sp = sub.add_parser("remote", help="run kvmsplit on other boxes over SSH; boot them into a kernel under test")
    rsub = sp.add_subparsers(dest="rcmd", required=True, parser_class=type(sp))

    ls = rsub.add_parser("list", help="the boxes of the inventory")
    add_inventory(ls)
    ls.set_defaults(func=cmd_remote_list)

    rr = rsub.add_parser("run", help="a kvmsplit command on boxes (by name or label), in parallel",
                         description="kvmsplit remote run [OPTIONS] BOX|LABEL... -- kvmsplit run -k thp")
    add_connection(rr)
    rr.add_argument("--timeout", type=float, default=3600, metavar="S",
                    help="the command's time limit on each box (`timeout -k` there; default 3600)")
    rr.add_argument("--output", "-o", metavar="DIR", help="results go to DIR/BOX/ (default out/<time>/)")
    add_db(rr)
    rr.add_argument("words", nargs=argparse.REMAINDER, metavar="BOX|LABEL... -- kvmsplit COMMAND")
    rr.set_defaults(func=cmd_remote_run)

    bt = rsub.add_parser("boot", help="switch a box to a kernel (kexec or a one-shot GRUB entry) and wait for it")
    add_connection(bt)
    bt.add_argument("box", metavar="BOX")
    bt.add_argument("--kernel", required=True, metavar="bzImage")
    bt.add_argument("--initrd", metavar="FILE")
    bt.add_argument("--append", metavar="ARGS", help="its command line (default: the running one's)")
    bt.add_argument("--release", metavar="R", help="the `uname -r` to expect (default: from the image's header)")
    bt.add_argument("--deadline", type=float, default=600, metavar="S",
                    help="how long to wait for the box to come back (default 600)")
    bt.set_defaults(func=cmd_remote_boot)
