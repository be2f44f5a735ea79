"""`kvmsplit rerun`: the same scenarios again, on this machine.

A scenario's dict in the results is complete (seed included), so rebuilding
it from there runs exactly what ran before. What the run's command line
changed for every scenario is carried over where the results record it:
an --expect override (in each expectation) and the patch series.
Results of the kernel's selftests (kind "kselftest") go back to
kvmsplit.selftests, which rebuilds each case from its scenario dict.
"""
from __future__ import annotations

import difflib
import sys
import time
from pathlib import Path

from kvmsplit.errors import EXIT_FAILED, EXIT_OK, NoKvmError, UsageError
from kvmsplit.runs.history import History, LoadedRun, open_run
from kvmsplit.runs.digest import FAILED, kind
from kvmsplit.runs.results import ScenarioResult


def choose(loaded: LoadedRun, failed_only: bool, only: list[str] | None) -> list[ScenarioResult]:
    chosen = loaded.rr.scenarios
    if only:
        names = {s.name for s in chosen}
        for n in only:
            if n not in names:
                close = difflib.get_close_matches(n, list(names), n=1)
                hint = f" (did you mean '{close[0]}'?)" if close else ""
                raise UsageError(f"--only {n}: no such scenario in {loaded.ref}{hint}")
        chosen = [s for s in chosen if s.name in only]
    if failed_only:
        chosen = [s for s in chosen if s.verdict in FAILED]
    return chosen


def expect_override(chosen: list[ScenarioResult]) -> str | None:
    """The run's --expect, recovered: an overridden expectation that differs
    from the scenario's own `expect` can only have come from the command line."""
    forced = {s.expectation["split"] for s in chosen if s.expectation.get("overridden")
              and s.expectation.get("split") != s.scenario.get("expect", "auto")}
    return forced.pop() if len(forced) == 1 else None


def cmd_rerun(args) -> int:
    from kvmsplit.cli.report import default_sinks
    loaded = open_run(args.run, History(args.db))
    chosen = choose(loaded, args.failed, args.only)
    if not chosen:
        print(f"nothing to rerun: no {'failed ' if args.failed else ''}scenario in {loaded.ref}")
        return EXIT_OK
    kinds = sorted({kind(s) for s in chosen})
    if kinds == ["kselftest"]:
        return _rerun_selftests(args, loaded, chosen, default_sinks(args, series=loaded.rr.series))
    if len(kinds) > 1:
        raise UsageError(f"cannot rerun {', '.join(kinds)} results together; pick one kind with --only")
    if kinds != ["scenario"]:
        raise UsageError(f"do not know how to rerun {kinds[0]} results")
    return _rerun_scenarios(args, loaded, chosen, default_sinks(args, series=loaded.rr.series))


def _facts() -> dict:
    from kvmsplit.host.facts import KvmUnavailable, probe
    try:
        return probe()
    except KvmUnavailable as e:
        raise NoKvmError(str(e)) from None


def _outdir(args) -> Path:
    return Path(args.output or Path("results") / (time.strftime("%Y%m%d-%H%M%S") + "-rerun"))


def _done(args, rr, out: Path, table: str) -> int:
    human = sys.stderr if args.ktap else sys.stdout      # --ktap owns stdout
    print(table, file=human)
    print(f"\nresults: {out / 'results.json'}", file=human)
    return EXIT_OK if rr.ok else EXIT_FAILED


def _rerun_scenarios(args, loaded: LoadedRun, chosen: list[ScenarioResult], sinks) -> int:
    from kvmsplit.scenario.engine import RunOptions
    from kvmsplit.cli.console import Progress, table
    from kvmsplit.scenario.model import Scenario, check_fits_host
    from kvmsplit.runs.loop import run_suite

    scenarios = [Scenario.from_dict(s.scenario, where=f"{loaded.ref}: scenario '{s.name}'")
                 for s in chosen]
    facts = _facts()
    check_fits_host(scenarios, facts)
    out = _outdir(args)
    progress = Progress(len(scenarios), stream=sys.stderr)
    opts = RunOptions(expect=args.expect or expect_override(chosen), phase_timeout=args.phase_timeout,
                      on_phase=progress.phase)
    print(f"kvmsplit: rerunning {len(scenarios)} scenario(s) of {loaded.ref} on "
          f"{facts['kernel']['release']}; results in {out}/", file=sys.stderr)
    rr = run_suite(scenarios, facts, out, options=opts, allow_host_changes=not args.no_host_changes,
                   argv=sys.argv, on_result=lambda i, r: progress.result(r), sinks=sinks)
    return _done(args, rr, out, table(rr, tty=sys.stdout.isatty()))


def _rerun_selftests(args, loaded: LoadedRun, chosen: list[ScenarioResult], sinks) -> int:
    """The kernel's selftests, rebuilt from their results (the case is its
    scenario dict plus its name), with the selftests of the default tree."""
    from kvmsplit.cli.console import Progress
    from kvmsplit.selftests.build import build
    from kvmsplit.cli.selftests import table
    from kvmsplit.selftests.manifest import SelftestCase
    from kvmsplit.selftests.runner import run_selftests

    cases = [SelftestCase(name=s.name, **{k: v for k, v in s.scenario.items() if k != "kind"})
             for s in chosen]
    facts = _facts()
    b = build(say=lambda m: print(f"kvmsplit: {m}", file=sys.stderr))
    out = _outdir(args)
    progress = Progress(len(cases), stream=sys.stderr)
    print(f"kvmsplit: rerunning {len(cases)} selftest scenario(s) of {loaded.ref} with the "
          f"selftests of {b.version}; results in {out}/", file=sys.stderr)
    rr = run_selftests(cases, b, facts, out, allow_host_changes=not args.no_host_changes,
                       argv=sys.argv, on_start=lambda c: progress.phase(c.name, "running"),
                       on_result=lambda i, r: progress.result(r), sinks=sinks)
    return _done(args, rr, out, table(rr, tty=sys.stdout.isatty()))
