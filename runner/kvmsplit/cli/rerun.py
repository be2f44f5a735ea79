"""`kvmsplit rerun`: the same scenarios again, where they ran and as they ran.

A scenario's dict in the results is complete (seed included), so rebuilding
it from there runs exactly what ran before. What the run's command line
changed for every scenario is carried over: the --expect override (in each
expectation), the patch series, and the options in the recorded argv
(--phase-timeout, --no-host-changes, --no-wait, --accept-user-log,
--allow-unchecked), each said when replayed.

Where it ran decides where it reruns, so that a failure's one-line rerun
command reproduces it on the kernel where it happened:
- a run inside `kvmsplit vm` (a kernel under test) boots the same image
  again, found by its sha256 (where it was, or anywhere in the kernel
  cache), or rebuilt from the recorded tree and patches, with the same
  --append; then reruns inside it;
- a run on a box (`kvmsplit remote`) goes back to that box, found by name
  in the inventory, or says plainly that it cannot;
- --here reruns on this machine's own kernel regardless.
Results of the kernel's selftests (kind "kselftest") go back to the
selftests runner, which rebuilds each case from its scenario dict.
"""
from __future__ import annotations

import argparse
import difflib
import hashlib
import subprocess
import sys
from pathlib import Path

from kvmsplit.cli import kernel as kernel_cli
from kvmsplit.cli import selftests
from kvmsplit.cli.options import add_expect, add_phase_timeout, add_repeat, add_run_options, host_facts, output_dir, say
from kvmsplit.cli.remote import add_connection, record, remote_run_options, summary
from kvmsplit.cli.scenarios import run_scenarios
from kvmsplit.errors import EXIT_OK, UnavailableError, UsageError
from kvmsplit.kernel.build import build
from kvmsplit.paths import cache_dir
from kvmsplit.remote.inventory import Inventory
from kvmsplit.remote.run import run_on_boxes
from kvmsplit.runs.digest import FAILED, kind
from kvmsplit.runs.history import History, LoadedRun, open_run
from kvmsplit.runs.results import RunResult, ScenarioResult
from kvmsplit.scenario.engine import RunOptions
from kvmsplit.scenario.model import Scenario
from kvmsplit.selftests.manifest import SelftestCase

# the original run's options a rerun replays: (flag, takes a value)
REPLAYED = (("--phase-timeout", True), ("--no-host-changes", False), ("--no-wait", False),
            ("--accept-user-log", False), ("--allow-unchecked", False))


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


def original_options(rr: RunResult) -> dict[str, object]:
    """The replayed options as the original command line gave them."""
    p = argparse.ArgumentParser(add_help=False)
    for flag, value in REPLAYED:
        if value:
            p.add_argument(flag, type=float)
        else:
            p.add_argument(flag, action="store_true")
    try:
        ns, _ = p.parse_known_args(rr.argv[1:])
    except SystemExit:          # an argv this parser cannot read replays nothing
        return {}
    return {flag: getattr(ns, flag[2:].replace("-", "_")) for flag, _ in REPLAYED}


def replay_options(args, rr: RunResult) -> list[str]:
    """Fill what this command line left unset from the original's; the flags replayed."""
    said = []
    for flag, value in original_options(rr).items():
        attr = flag[2:].replace("-", "_")
        if value not in (None, False) and getattr(args, attr) in (None, False):
            setattr(args, attr, value)
            said.append(flag if value is True else f"{flag} {value:g}")
    if said:
        say(f"replaying the original run's options: {' '.join(said)}")
    return said


def forwarded(args, chosen: list[ScenarioResult]) -> list[str]:
    """This rerun's options, for the rerun that runs elsewhere (with --here)."""
    out = [a for s in chosen for a in ("--only", s.name)]
    for flag, value in (("--expect", args.expect), ("--phase-timeout", args.phase_timeout),
                        ("--repeat", getattr(args, "repeat", None))):
        if value is not None:
            out += [flag, f"{value:g}" if isinstance(value, float) else str(value)]
    for flag in ("--no-host-changes", "--no-wait", "--accept-user-log", "--allow-unchecked", "--ktap"):
        if getattr(args, flag[2:].replace("-", "_")):
            out.append(flag)
    return out


# -- where it ran -------------------------------------------------------------------------------
def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def find_image(vm: dict, built: dict | None) -> Path:
    """The kernel image a vm run booted: where it was, or in the kernel
    cache by sha256, or rebuilt from the recorded tree, commit and patches."""
    want = vm.get("sha256")
    candidates = [Path(vm["image"])] if vm.get("image") else []
    candidates += sorted((cache_dir() / "kernel" / "images").glob("*/bzImage"))
    for c in candidates:
        if c.is_file() and (not want or _sha256(c) == want):
            return c
    return rebuild(vm, built or {})


def rebuild(vm: dict, built: dict) -> Path:
    """The image built again from what the run recorded, and how it compares
    with the one that ran; or one line saying why it cannot be."""
    tree = Path(built["tree"]) if built.get("tree") else None
    commit = built.get("commit")
    patches = [Path(p) for p in built.get("patch_files") or []]
    why = _unrebuildable(tree, commit, patches)
    if why or tree is None:
        raise UnavailableError(f"the kernel under test (sha256 {vm.get('sha256')}) is gone: not at "
                               f"{vm.get('image')}, not in {cache_dir() / 'kernel' / 'images'}, and {why}; "
                               "rerun with --here to run on this machine's kernel")
    say(f"kernel {str(vm.get('sha256'))[:16]} is not in the cache: rebuilding it from {tree} at "
        f"{(commit or 'HEAD')[:12]} + {len(patches)} patch(es)")
    k = build(tree, [str(p) for p in patches], commit=commit, say=say)
    say(same_kernel(vm, built, k.image, k.build_id))
    return k.image


def _unrebuildable(tree: Path | None, commit: str | None, patches: list[Path]) -> str | None:
    """Why the recorded kernel cannot be rebuilt here (None: it can)."""
    if tree is None:
        return "not rebuildable (no recorded tree)"
    if not tree.is_dir():
        return f"not rebuildable: its tree {tree} is gone"
    if commit and subprocess.run(["git", "-C", str(tree), "cat-file", "-e", f"{commit}^{{commit}}"],
                                 capture_output=True).returncode:
        return f"not rebuildable: its commit {commit[:12]} is not in {tree}"
    gone = [p for p in patches if not p.is_file()]
    if gone:
        return f"not rebuildable: its patch {gone[0]} is gone"
    return None


def same_kernel(vm: dict, built: dict, image: Path, build_id: str | None) -> str:
    """What the rebuilt image has in common with the one that ran."""
    sha, was_sha = _sha256(image), vm.get("sha256")
    was_id = vm.get("build_id") or built.get("build_id")
    if sha == was_sha:
        return f"the rebuilt image is the one that ran: sha256 {sha[:16]}, build id {build_id}"
    if was_id and build_id == was_id:
        return (f"the rebuilt kernel has the build id of the one that ran ({build_id}); its bzImage's "
                f"sha256 differs ({sha[:16]}, was {str(was_sha)[:16]})")
    return (f"warning: the rebuilt kernel differs from the one that ran: sha256 {sha[:16]} (was "
            f"{str(was_sha)[:16]}), build id {build_id} (was {was_id}); same commit, patches and config, "
            "another toolchain or build")


def rerun_in_vm(args, loaded: LoadedRun, chosen: list[ScenarioResult]) -> int:
    vm = loaded.rr.host["vm"]
    image = find_image(vm, loaded.rr.host.get("kernel_under_test"))
    out = output_dir(args, "-rerun")
    original = _original_file(loaded, out)
    append = vm.get("append")
    say(f"{loaded.ref} ran in kvmsplit vm on {vm.get('release') or 'a kernel under test'}: booting {image} "
        f"again" + (f" with --append {append!r}" if append else "") + " (--here: on this machine's kernel)")
    ns = argparse.Namespace(kernel=str(image), kernel_tree=None, accel=vm.get("accel") or "auto", cpus=None,
                            memory="2G", timeout=1800.0, append=append, boot_attempts=2, db=args.db,
                            inject_panic_after=None,
                            command=["kvmsplit", "rerun", str(original), "--here", "--output", str(out.resolve()),
                                     *forwarded(args, chosen)])
    return kernel_cli.cmd_vm(ns)


def rerun_on_box(args, loaded: LoadedRun, chosen: list[ScenarioResult]) -> int:
    where = loaded.rr.host["remote"]
    name = where.get("box", "?")
    try:
        [box] = Inventory.load(args.inventory).select([name])
    except UsageError as e:
        raise UsageError(f"{loaded.ref} ran on box {name} ({where.get('user')}@{where.get('host')}:"
                         f"{where.get('port')}), which cannot be reached from here: {e}; "
                         "rerun with --here to run on this machine") from None
    if (box.host, box.port) != (where.get("host"), where.get("port")):
        say(f"box {name} is now {box.host}:{box.port} in the inventory (was {where.get('host')}:"
            f"{where.get('port')})")
    out = output_dir(args, "-rerun")
    original = _original_file(loaded, out / "original")
    say(f"{loaded.ref} ran on box {name}: rerunning there")
    runs = run_on_boxes([box], ["kvmsplit", "rerun", "{rundir}/original.json", "--here", *forwarded(args, chosen)],
                        out, remote_run_options(args, args.timeout),
                        echo=lambda line: print(line, file=sys.stderr, flush=True),
                        uploads={"original.json": original})
    record(runs, args.db)
    print(summary(runs))
    return max(r.exit_code for r in runs)


def _original_file(loaded: LoadedRun, where: Path) -> Path:
    if loaded.path is not None:
        return loaded.path.resolve()
    where.mkdir(parents=True, exist_ok=True)
    return loaded.rr.write(where).resolve()


# -- the command --------------------------------------------------------------------------------
def cmd_rerun(args) -> int:
    loaded = open_run(args.run, History(args.db))
    chosen = choose(loaded, args.failed, args.only)
    if not chosen:
        print(f"nothing to rerun: no {'failed ' if args.failed else ''}scenario in {loaded.ref}")
        return EXIT_OK
    kinds = sorted({kind(s) for s in chosen})
    if len(kinds) > 1:
        raise UsageError(f"cannot rerun {', '.join(kinds)} results together; pick one kind with --only")
    replay_options(args, loaded.rr)
    if not args.here and "remote" in loaded.rr.host:
        return rerun_on_box(args, loaded, chosen)
    if not args.here and "vm" in loaded.rr.host:
        return rerun_in_vm(args, loaded, chosen)
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
    sp = sub.add_parser("rerun", help="run the scenarios of an earlier run again, where and as they ran")
    sp.add_argument("run", metavar="RUN", help="a run id from `kvmsplit history`, or a results.json "
                                               "(or its directory)")
    sp.add_argument("--failed", action="store_true", help="only the scenarios that failed (FAIL or ERROR)")
    sp.add_argument("--only", action="append", metavar="NAME", help="only this scenario (repeatable)")
    sp.add_argument("--here", action="store_true",
                    help="on this machine's kernel, even if the run was in kvmsplit vm or on a box")
    add_expect(sp, "override the split expectation (default: the original run's override, if any)")
    add_run_options(sp, "results/<time>-rerun")
    add_phase_timeout(sp)
    add_repeat(sp)
    g = sp.add_argument_group("a run on a box (kvmsplit remote)")
    add_connection(g)
    g.add_argument("--timeout", type=float, default=3600, metavar="S", help="the rerun's time limit on the box")
    sp.set_defaults(func=cmd_rerun)
