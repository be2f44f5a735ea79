"""`kvmsplit selftests build|list|run|parse`: the kernel's KVM selftests as
kvmsplit scenarios. `add_parser()` hooks them into kvmsplit's command line;
the heavy imports wait until a command runs."""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from kvmsplit.errors import EXIT_FAILED, EXIT_OK, BadInputError, NoKvmError, UsageError, read_input


def _say(msg: str) -> None:
    print(f"kvmsplit: {msg}", file=sys.stderr)


def _cases(args):
    from kvmsplit.scenario.model import select
    from kvmsplit.selftests.manifest import load
    cases = select(load(args.manifest), args.k)
    if not cases:
        raise UsageError(f"no selftest scenario matches -k {' '.join(args.k or [])}")
    return cases


def cmd_build(args) -> int:
    from kvmsplit.selftests.build import build
    b = build(args.tree, force=args.force, say=_say)
    state = "up to date" if b.cached else f"built in {b.seconds:.0f} s"
    print(f"KVM selftests of {b.version} ({b.source}): {state}\n  {b.bindir}")
    return EXIT_OK


def cmd_list(args) -> int:
    for c in _cases(args):
        needs = "".join(f" requires={r}" for r in c.requires) + \
            "".join(f" hugepages-{s}={n}" for s, n in c.hugepages.items())
        print(f"{c.name:60} timeout={c.timeout:g}s{needs}")
    return EXIT_OK


def cmd_run(args) -> int:
    from kvmsplit.host.facts import KvmUnavailable, probe
    from kvmsplit.cli.console import Progress
    from kvmsplit.selftests.build import build
    from kvmsplit.cli.report import default_sinks
    from kvmsplit.selftests.runner import run_selftests

    cases = _cases(args)            # a bad manifest is reported before anything is built
    try:
        facts = probe()
    except KvmUnavailable as e:
        raise NoKvmError(str(e)) from None
    b = build(args.tree, say=_say)
    out = Path(args.output or Path("results") / (time.strftime("%Y%m%d-%H%M%S") + "-selftests"))
    progress = Progress(len(cases), stream=sys.stderr)   # the stream of now, not of import time
    _say(f"{len(cases)} KVM selftest scenario(s) from {b.version} on {facts['kernel']['release']}; "
         f"results in {out}/")
    rr = run_selftests(cases, b, facts, out, allow_host_changes=not args.no_host_changes,
                       accept_user_log=args.accept_user_log, argv=sys.argv,
                       on_start=lambda c: progress.phase(c.name, "running"),
                       on_result=lambda i, r: progress.result(r), sinks=default_sinks(args))
    human = sys.stderr if args.ktap else sys.stdout      # --ktap owns stdout
    print(table(rr, tty=human.isatty()), file=human)
    print(f"\nresults: {out / 'results.json'}", file=human)
    return EXIT_OK if rr.ok else EXIT_FAILED


def cmd_parse(args) -> int:
    """Parse a selftest's captured output: strict about KTAP, so a malformed
    file is one line naming the line that is wrong."""
    from kvmsplit.selftests import ktap
    from kvmsplit.selftests.parse import parse_assertion, parse_timings
    path = Path(args.file)
    text = read_input(path, errors="replace")
    try:
        doc = ktap.parse(text)
    except ktap.KtapError as e:
        raise BadInputError(f"{path}:{e.line}: malformed KTAP: {e.message}") from None
    a = parse_assertion(text)
    print(json.dumps({"ktap": doc.to_dict() if doc else None,
                      "assertion": a.to_dict() if a else None,
                      "phases": [{"name": p.name, "duration_s": p.duration_s} for p in parse_timings(text)]},
                     indent=1))
    return EXIT_OK


def table(rr, tty: bool = False) -> str:
    from kvmsplit.cli.console import paint
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
    c = rr.counts()
    lines += ["", ", ".join(f"{n} {v.lower()}" for v, n in c.items() if n) + f" in {len(rr.scenarios)} scenarios"]
    return "\n".join(lines)


def add_parser(sub, parser_class) -> None:
    """Add `selftests` to kvmsplit's subcommands (`sub`, from add_subparsers)."""
    from kvmsplit.cli.report import add_run_options

    p = sub.add_parser("selftests", help="build and run the kernel's own KVM selftests as scenarios")
    ss = p.add_subparsers(dest="selftests_cmd", required=True, parser_class=parser_class)

    def tree(sp):
        sp.add_argument("--tree", metavar="PATH",
                        help="kernel source tree or tarball (default: Debian's linux-source package)")

    def selection(sp):
        sp.add_argument("-k", action="append", metavar="PATTERN",
                        help="only scenarios whose name contains PATTERN (glob allowed; repeatable)")
        sp.add_argument("--manifest", metavar="FILE.toml",
                        help="the selftests to run (default: kselftests/manifest.toml)")

    sp = ss.add_parser("build", help="build the KVM selftests into the cache (skipped when up to date)")
    tree(sp)
    sp.add_argument("--force", action="store_true", help="run make even when the cache is up to date")
    sp.set_defaults(func=cmd_build)

    sp = ss.add_parser("list", help="list the selftest scenarios of the manifest")
    selection(sp)
    sp.set_defaults(func=cmd_list)

    sp = ss.add_parser("run", help="run selftest scenarios and judge them")
    selection(sp)
    tree(sp)
    sp.add_argument("--output", "-o", metavar="DIR",
                    help="write results.json (and logs/) here (default results/<time>-selftests)")
    sp.add_argument("--no-host-changes", action="store_true",
                    help="never grow hugetlb pools; skip scenarios that would need it")
    sp.add_argument("--accept-user-log", action="store_true",
                    help="also treat user-written /dev/kmsg lines as kernel reports (for testing kvmsplit)")
    add_run_options(sp)     # --db, --ktap, --series...: the same outputs and history as `kvmsplit run`
    sp.set_defaults(func=cmd_run)

    sp = ss.add_parser("parse", help="parse a selftest's captured output (KTAP, assertion, timings) as JSON")
    sp.add_argument("file", metavar="FILE")
    sp.set_defaults(func=cmd_parse)
