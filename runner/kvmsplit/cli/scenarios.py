"""`kvmsplit list` and `kvmsplit run`: kvmsplit's own scenarios on /dev/kvm."""
from __future__ import annotations

import argparse
import sys
from collections import Counter
from pathlib import Path

from kvmsplit import __version__
from kvmsplit.cli.console import Progress, table
from kvmsplit.cli.options import (
    add_backend,
    add_expect,
    add_phase_timeout,
    add_repeat,
    add_run_options,
    add_selection,
    default_sinks,
    finish,
    host_facts,
    output_dir,
)
from kvmsplit.errors import EXIT_FAILED, EXIT_OK, UsageError
from kvmsplit.host.facts import HostFacts
from kvmsplit.runs.loop import run_items
from kvmsplit.runs.results import RunResult
from kvmsplit.scenario.backend import ScenarioBackend
from kvmsplit.scenario.engine import RunOptions
from kvmsplit.scenario.expectation import expect
from kvmsplit.scenario.model import Scenario, check_fits_host, default_suite, load_file, select
from kvmsplit.scenario.qemu import as_qemu, qemu_runnable, qemu_suite
from kvmsplit.vmm.guest import ucall


def chosen_scenarios(args) -> tuple[list[Scenario], HostFacts]:
    """Scenario files are read before anything touches the host, so bad input
    is reported even where /dev/kvm is missing."""
    base = [s for f in args.scenario or [] for s in load_file(f)]
    facts = host_facts()
    chosen = select(base or _default(facts, args), args.k)
    if getattr(args, "backend", None) == "qemu":
        chosen = [as_qemu(s) for s in chosen]
    if not chosen:
        raise UsageError(f"no scenario matches -k {' '.join(args.k or [])}")
    return chosen, facts


def _default(facts: HostFacts, args) -> list[Scenario]:
    suite = default_suite(facts, full=bool(getattr(args, "full", False) or args.k))
    if getattr(args, "backend", None) != "qemu":
        return suite
    # -k picks from the whole default suite; without it, the QEMU set
    return [as_qemu(s) for s in suite if qemu_runnable(s)] if args.k else qemu_suite(suite)


def cmd_list(args) -> int:
    scenarios, facts = chosen_scenarios(args)
    for s in scenarios:
        e = expect(s, facts, args.expect)
        when = f"@{e.when}" if e.when else ""
        nested = f" nested={s.nested} l2_page={s.l2_page}" if s.is_nested else ""
        nested += f" qemu/{s.qemu_flow}" if s.backend == "qemu" else ""
        print(f"{s.name:44} {s.size >> 20:>6}M vcpus={s.vcpus} slots={s.memslots} "
              f"{s.pattern}/{s.percent}% passes={s.passes}{nested}  expect {e.split}{when}")
    return EXIT_OK


def _yn(v) -> str:
    return "Y" if v is True else "N" if v is False else str(v)


def run_scenarios(args, scenarios: list[Scenario], facts: HostFacts, *, what: str, options: RunOptions,
                  series: dict | None = None) -> int:
    """Run scenarios through the shared loop; `kvmsplit run` and `rerun` both end here.
    With --repeat M, M whole runs (each its own results and history entry), then the rates."""
    check_fits_host(scenarios, facts)
    out = output_dir(args, "-rerun" if args.cmd == "rerun" else "")
    repeat = getattr(args, "repeat", None) or 1
    if repeat == 1:
        return _run_once(args, scenarios, facts, what, options, series, out)
    codes, runs = [], []
    for i in range(1, repeat + 1):
        print(f"kvmsplit: repeat {i} of {repeat}", file=sys.stderr)
        codes.append(_run_once(args, scenarios, facts, what, options, series, out / f"repeat-{i}", runs))
    for line in repeat_rates(runs):
        print(line, file=sys.stderr if args.ktap else sys.stdout)    # --ktap owns stdout
    return next((c for c in codes if c == EXIT_FAILED), max(codes))


def repeat_rates(runs: list[RunResult]) -> list[str]:
    """Per scenario, how many of the repeats failed (FAIL or ERROR), how, and in how
    many the dirty log lost pages."""
    out = []
    for name in dict.fromkeys(s.name for rr in runs for s in rr.scenarios):
        results = [s for rr in runs for s in rr.scenarios if s.name == name]
        failed = [s for s in results if s.verdict.failed]
        how = ", ".join(f"{v.value} {n}" for v, n in Counter(s.verdict for s in results).most_common())
        lost = [s for s in results if (c := s.check("dirty-log")) is not None and c.details.get("missing")]
        out.append(f"{name}: {len(failed)} of {len(results)} repeats failed ({how})"
                   + (f"; {len(lost)} of {len(results)} lost dirty pages" if lost else ""))
    return out


def _run_once(args, scenarios: list[Scenario], facts: HostFacts, what: str, options: RunOptions,
              series: dict | None, out: Path, runs: list[RunResult] | None = None) -> int:
    progress = Progress(len(scenarios), verbose=getattr(args, "verbose", False))
    options.on_phase = progress.phase
    print(f"kvmsplit {__version__}: {what} {len(scenarios)} scenario(s) on {facts.kernel_release}, "
          f"paging {facts.paging}, tdp_mmu={_yn(facts.param('tdp_mmu'))}, "
          f"eager_page_split={_yn(facts.param('eager_page_split'))}; results in {out}/", file=sys.stderr)
    backend = ScenarioBackend(scenarios, facts, options, vmm_trace=getattr(args, "trace", False))
    rr = run_items(backend, facts, out,
                   allow_host_changes=not args.no_host_changes, wait_for_host=not args.no_wait, argv=sys.argv,
                   on_result=lambda i, r: progress.result(r), sinks=default_sinks(args, series))
    if runs is not None:
        runs.append(rr)
    return finish(args, rr, out, table)


def _misbehave(value: str | None) -> tuple[str, str] | None:
    if not value:
        return None
    kind, _, phase = value.partition(":")
    try:
        ucall.cmd_misbehave(kind)
    except ValueError as e:
        raise UsageError(f"--inject-misbehave: {e}") from None
    if not phase:
        raise UsageError("--inject-misbehave: expected KIND:PHASE, e.g. flood:dirty-1")
    return kind, phase


def cmd_run(args) -> int:
    scenarios, facts = chosen_scenarios(args)
    opts = RunOptions(expect=args.expect, accept_user_log=args.accept_user_log,
                      phase_timeout=args.phase_timeout, inject_eio=args.inject_eio,
                      inject_hang=args.inject_hang, inject_bug=args.inject_bug, trace=not args.no_trace,
                      inject_l2_fault=args.inject_l2_fault, inject_misbehave=_misbehave(args.inject_misbehave))
    return run_scenarios(args, scenarios, facts, what="running", options=opts)


def add_parsers(sub) -> None:
    sp = sub.add_parser("list", help="list the scenarios a run would run, with their expectation")
    add_selection(sp)
    add_backend(sp)
    add_expect(sp)
    sp.set_defaults(func=cmd_list)

    sp = sub.add_parser("run", help="run scenarios and judge them")
    add_selection(sp)
    add_backend(sp)
    add_expect(sp)
    add_run_options(sp, "results/<time>")
    add_phase_timeout(sp)
    add_repeat(sp)
    sp.add_argument("-v", "--verbose", action="store_true", help="a line per phase, also when not on a terminal")
    sp.add_argument("--no-trace", action="store_true",
                    help="without the tracepoint witness (scenarios are then UNCONFIRMED, not PASS)")
    sp.add_argument("--trace", action="store_true",
                    help="QEMU scenarios: attach `kvmsplit trace` (ptrace) to each QEMU; the report's timeline "
                         "shows when QEMU toggled dirty logging next to the kernel's split events (kvmsplit's "
                         "own VMM: run `kvmsplit trace -- kvmsplit run ...` instead)")
    sp.add_argument("--inject-eio", metavar="IOCTL", help=argparse.SUPPRESS)
    sp.add_argument("--inject-hang", metavar="PHASE", help=argparse.SUPPRESS)
    sp.add_argument("--inject-bug", metavar="PHASE", help=argparse.SUPPRESS)
    sp.add_argument("--inject-l2-fault", metavar="PHASE", help=argparse.SUPPRESS)
    sp.add_argument("--inject-misbehave", metavar="KIND:PHASE", help=argparse.SUPPRESS)
    sp.set_defaults(func=cmd_run)
