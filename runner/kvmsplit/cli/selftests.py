"""`kvmsplit selftests build|list|run|parse`: the kernel's KVM selftests as
kvmsplit scenarios."""
from __future__ import annotations

import json
import sys
from pathlib import Path

from kvmsplit.cli.console import Progress, selftest_table
from kvmsplit.cli.options import add_run_options, add_selection, default_sinks, finish, host_facts, output_dir, say
from kvmsplit.errors import EXIT_OK, BadInputError, UsageError, read_input
from kvmsplit.scenario.model import select
from kvmsplit.selftests import build as selftests_build
from kvmsplit.selftests import ktap, runner
from kvmsplit.selftests.manifest import SelftestCase, load
from kvmsplit.selftests.parse import parse_assertion, parse_timings


def _cases(args) -> list[SelftestCase]:
    cases = select(load(args.manifest), args.k)
    if not cases:
        raise UsageError(f"no selftest scenario matches -k {' '.join(args.k or [])}")
    return cases


def cmd_build(args) -> int:
    b = selftests_build.build(args.tree, force=args.force, say=say)
    state = "up to date" if b.cached else f"built in {b.seconds:.0f} s"
    print(f"KVM selftests of {b.version} ({b.source}): {state}\n  {b.bindir}")
    return EXIT_OK


def cmd_list(args) -> int:
    for c in _cases(args):
        needs = "".join(f" requires={r}" for r in c.requires) + \
            "".join(f" hugepages-{s}={n}" for s, n in c.hugepages.items())
        print(f"{c.name:60} timeout={c.timeout:g}s{needs}")
    return EXIT_OK


def run_cases(args, cases: list[SelftestCase], *, what: str = "", series: dict | None = None) -> int:
    """Build (or reuse) the selftests and run `cases`; `selftests run` and `rerun` both end here."""
    facts = host_facts()
    b = selftests_build.build(getattr(args, "tree", None), say=say)
    out = output_dir(args, "-rerun" if args.cmd == "rerun" else "-selftests")
    progress = Progress(len(cases), stream=sys.stderr)   # the stream of now, not of import time
    say(f"{what + ' ' if what else ''}{len(cases)} KVM selftest scenario(s) from {b.version} on "
        f"{facts.kernel_release}; results in {out}/")
    rr = runner.run_selftests(cases, b, facts, out, allow_host_changes=not args.no_host_changes,
                              wait_for_host=not args.no_wait, accept_user_log=args.accept_user_log, argv=sys.argv,
                              trace=getattr(args, "trace", False),
                              on_start=lambda c: progress.phase(c.name, "running"),
                              on_result=lambda i, r: progress.result(r), sinks=default_sinks(args, series))
    return finish(args, rr, out, selftest_table)


def cmd_run(args) -> int:
    return run_cases(args, _cases(args))     # a bad manifest is reported before anything is built


def cmd_parse(args) -> int:
    """Parse a selftest's captured output: strict about KTAP, so a malformed
    file is one line naming the line that is wrong."""
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


def add_parsers(sub) -> None:
    p = sub.add_parser("selftests", help="build and run the kernel's own KVM selftests as scenarios")
    ss = p.add_subparsers(dest="selftests_cmd", required=True, parser_class=type(p))

    def tree(sp):
        sp.add_argument("--tree", metavar="PATH",
                        help="kernel source tree or tarball (default: Debian's linux-source package)")

    sp = ss.add_parser("build", help="build the KVM selftests into the cache (skipped when up to date)")
    tree(sp)
    sp.add_argument("--force", action="store_true", help="run make even when the cache is up to date")
    sp.set_defaults(func=cmd_build)

    sp = ss.add_parser("list", help="list the selftest scenarios of the manifest")
    add_selection(sp, "--manifest")
    sp.set_defaults(func=cmd_list)

    sp = ss.add_parser("run", help="run selftest scenarios and judge them")
    add_selection(sp, "--manifest")
    tree(sp)
    add_run_options(sp, "results/<time>-selftests")   # the same outputs and history as `kvmsplit run`
    sp.add_argument("--trace", action="store_true",
                    help="run each test under `kvmsplit trace` (ptrace): its dirty-logging windows go into the "
                         "results and the report's timeline")
    sp.set_defaults(func=cmd_run)

    sp = ss.add_parser("parse", help="parse a selftest's captured output (KTAP, assertion, timings) as JSON")
    sp.add_argument("file", metavar="FILE")
    sp.set_defaults(func=cmd_parse)
