"""`kvmsplit rerun`: the same scenarios again, on this machine.

A scenario's dict in the results is complete (seed included), so rebuilding
it from there runs exactly what ran before. What the run's command line
changed for every scenario is carried over where the results record it:
an --expect override (in each expectation) and the patch series.
Results of the kernel's selftests (kind "kselftest") go back to the
selftests runner, which rebuilds each case from its scenario dict.
"""
from __future__ import annotations

import difflib

from kvmsplit.cli import selftests
from kvmsplit.cli.options import add_expect, add_phase_timeout, add_repeat, add_run_options, host_facts
from kvmsplit.cli.scenarios import run_scenarios
from kvmsplit.errors import EXIT_OK, UsageError
from kvmsplit.runs.digest import FAILED, kind
from kvmsplit.runs.history import History, LoadedRun, open_run
from kvmsplit.runs.results import ScenarioResult
from kvmsplit.scenario.engine import RunOptions
from kvmsplit.scenario.model import Scenario
from kvmsplit.selftests.manifest import SelftestCase


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
    loaded = open_run(args.run, History(args.db))
    chosen = choose(loaded, args.failed, args.only)
    if not chosen:
        print(f"nothing to rerun: no {'failed ' if args.failed else ''}scenario in {loaded.ref}")
        return EXIT_OK
    kinds = sorted({kind(s) for s in chosen})
    if len(kinds) > 1:
        raise UsageError(f"cannot rerun {', '.join(kinds)} results together; pick one kind with --only")
    series = loaded.rr.series
    if kinds == ["kselftest"]:
        cases = [SelftestCase(name=s.name, **{k: v for k, v in s.scenario.items() if k != "kind"})
                 for s in chosen]
        return selftests.run_cases(args, cases, what=f"rerunning of {loaded.ref}", series=series)
    if kinds != ["scenario"]:
        raise UsageError(f"do not know how to rerun {kinds[0]} results")
    scenarios = [Scenario.from_dict(s.scenario, where=f"{loaded.ref}: scenario '{s.name}'") for s in chosen]
    opts = RunOptions(expect=args.expect or expect_override(chosen), phase_timeout=args.phase_timeout,
                      accept_user_log=args.accept_user_log)
    return run_scenarios(args, scenarios, host_facts(), what=f"rerunning of {loaded.ref},", options=opts,
                         series=series)


def add_parsers(sub) -> None:
    sp = sub.add_parser("rerun", help="run the scenarios of an earlier run again, with the same parameters")
    sp.add_argument("run", metavar="RUN", help="a run id from `kvmsplit history`, or a results.json "
                                               "(or its directory)")
    sp.add_argument("--failed", action="store_true", help="only the scenarios that failed (FAIL or ERROR)")
    sp.add_argument("--only", action="append", metavar="NAME", help="only this scenario (repeatable)")
    add_expect(sp, "override the split expectation (default: the original run's override, if any)")
    add_run_options(sp, "results/<time>-rerun")
    add_phase_timeout(sp)
    add_repeat(sp)
    sp.set_defaults(func=cmd_rerun)
