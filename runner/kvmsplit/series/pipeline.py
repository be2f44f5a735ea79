"""A series, end to end: its base and patched kernels built (cached), the
same suite run under each (in `kvmsplit vm`, or on a box through
`kvmsplit remote`), the two compared, and, when the series breaks
something, the first patch that does found by building and running each
step (bisection over the patch count, every build cached).

A --matrix combination is one boot of the kernel under test with its
parameters on the command line; on a box that runs that kernel already
(booted for an earlier combination) and where every parameter of the
combination is writable, it is one write of each instead, put back after
the run (series/params.py). So the kernels go kernel by kernel, each
combination after the other.

Nothing here touches the user's checkout: builds go through
kernel.build, which applies patches in a worktree of its own; a series
with a base-commit other than the tree's HEAD is built from a throwaway
worktree of that commit in kvmsplit's cache.
"""
from __future__ import annotations

import hashlib
import itertools
import shlex
import subprocess
import sys
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path

from kvmsplit.errors import BadInputError, UnavailableError, UsageError
from kvmsplit.kernel import vm as virtme
from kvmsplit.kernel.build import BASE_TAG, KernelImage, build, default_tree
from kvmsplit.paths import cache_dir
from kvmsplit.remote.boot import BootOutcome, boot
from kvmsplit.remote.inventory import Box
from kvmsplit.remote.run import RemoteRun, run_on_boxes
from kvmsplit.remote.ssh import RemoteError, Session
from kvmsplit.runs.compare import Comparison, compare
from kvmsplit.runs.digest import FAILED
from kvmsplit.runs.history import History, HistorySink
from kvmsplit.runs.loop import replay
from kvmsplit.runs.results import RunResult
from kvmsplit.series.params import Written, not_writable, params_of
from kvmsplit.series.source import Series

Say = Callable[[str], None]


def matrix(spec: str | None) -> list[str | None]:
    """"kvm.eager_page_split=0,1 kvm.tdp_mmu=0,1" -> every combination as a
    kernel command line ("kvm.eager_page_split=0 kvm.tdp_mmu=0", ...);
    [None] without a matrix."""
    if not spec:
        return [None]
    axes = []
    for word in spec.split():
        name, sep, values = word.partition("=")
        if not sep or not name or not values or "." not in name:
            raise UsageError(f"--matrix: '{word}' is not module.param=V1,V2,...")
        axes.append([f"{name}={v}" for v in values.split(",") if v])
    return [" ".join(combo) for combo in itertools.product(*axes)]


def combo_label(append: str | None) -> str:
    if not append:
        return "default"
    return ",".join(w.split(".", 1)[-1] for w in append.split())


def combo_dir(append: str | None) -> str:
    """The combination's directory: its label without '=' or ',', which virtme-ng (whose
    shared folders the output directory is one of) and QEMU options take for syntax."""
    return combo_label(append).replace("=", "-").replace(",", "+")


@dataclass
class Target:
    """Where the suite runs: here in `kvmsplit vm`, or on a box (booted into each kernel)."""
    box: Box | None = None
    how: RemoteRun = field(default_factory=RemoteRun)
    boot_deadline: float = 900.0
    vm_timeout: float = 3600.0
    accel: str = "auto"

    def describe(self) -> str:
        return f"box {self.box.describe()}" if self.box else "kvmsplit vm here"


@dataclass
class Step:
    """One kernel (base, the series, or its first k patches) run once."""
    k: int                      # patches applied
    append: str | None
    image: KernelImage
    rr: RunResult
    out: Path


@dataclass
class Outcome:
    series: Series
    steps: list[Step] = field(default_factory=list)
    comparisons: list[tuple[str | None, Comparison]] = field(default_factory=list)
    first_bad: dict[str | None, int | None] = field(default_factory=dict)

    @property
    def worse(self) -> bool:
        return any(c.worse for _, c in self.comparisons)


class SeriesRun:
    def __init__(self, series: Series, tree: Path | None, out: Path, run_args: list[str], target: Target,
                 db: str | None, say: Say):
        self.series, self.out, self.run_args, self.target, self.say = series, out, run_args, target, say
        self.tree = self._tree(tree)
        self.history = History(out / "series-history.sqlite")    # this series' runs only: compare's baseline
        self.user_history = History(db)
        self.images: dict[int, KernelImage] = {}
        self.outcome_steps: list[Step] = []
        self.booted: dict | None = None     # the box's boot we made last: its kernel's key, append, boot_id

    # -- the tree --------------------------------------------------------------------------
    def _tree(self, tree: Path | None) -> Path:
        """The tree to build from: the series' base-commit, in a throwaway
        worktree when it is not the tree's HEAD."""
        src = tree or default_tree(say=self.say)
        base = self.series.base_commit
        head = _git(src, "rev-parse", f"{BASE_TAG}^{{commit}}" if tree is None else "HEAD")
        if not base or head.startswith(base) or base.startswith(head):
            if base is None:
                self.say(f"the series names no base-commit: applying it to {src} at {head[:12]}")
            return src
        if tree is None:
            self.say(f"base-commit {base[:12]} is not Debian's linux-source tree (at {head[:12]}); "
                     "applying the series to it as shipped (give --tree for the real base)")
            return src
        if subprocess.run(["git", "-C", str(src), "cat-file", "-e", f"{base}^{{commit}}"],
                          capture_output=True).returncode:
            raise BadInputError(f"base-commit {base} is not in {src}: fetch it first (git fetch ...)")
        wt = cache_dir() / "series" / "trees" / hashlib.sha256(f"{src.resolve()}\0{base}".encode()).hexdigest()[:12]
        if not (wt / ".git").exists():
            _git(src, "worktree", "prune")
            wt.parent.mkdir(parents=True, exist_ok=True)
            _git(src, "worktree", "add", "-q", "--detach", str(wt), base)
            self.say(f"base-commit {base[:12]}: a throwaway worktree of {src} in {wt}")
        return wt

    # -- kernels and runs ------------------------------------------------------------------
    def kernel(self, k: int) -> KernelImage:
        if k not in self.images:
            what = "the base kernel" if k == 0 else \
                ("the patched kernel" if k == len(self.series.patches) else f"the first {k} patch(es)")
            self.say(f"building {what} ({k}/{len(self.series.patches)} patches; cached builds are reused)")
            self.images[k] = build(self.tree, [str(p) for p in self.series.patches[:k]], say=self.say)
        return self.images[k]

    def run(self, k: int, append: str | None, args: list[str], tag: str = "") -> Step:
        image = self.kernel(k)
        name = f"{combo_dir(append)}/{'base' if k == 0 else f'patch-{k:02d}'}{tag}"
        out = self.out / name
        series_args = self._series_args() if k else []
        argv = ["kvmsplit", *args, *series_args]
        self.say(f"[{name}] {image.release or 'kernel'} ({image.key}) on {self.target.describe()}"
                 + (f", append {append!r}" if append else ""))
        rr = self._run_remote(image, append, argv, out) if self.target.box else self._run_vm(image, append, argv, out)
        rr.host["kernel_under_test"] = {**image.to_dict(), "tree": str(self.tree), "append": append,
                                        "patch_files": [str(p) for p in self.series.patches[:k]]}
        rr.write(out)
        replay(rr, out, [HistorySink(self.history), HistorySink(self.user_history)])
        step = Step(k, append, image, rr, out)
        self.outcome_steps.append(step)
        return step

    def _series_args(self) -> list[str]:
        s = self.series
        args = ["--series", s.name]
        for opt, v in (("--series-version", s.version), ("--message-id", s.message_id),
                       ("--base-commit", s.base_commit)):
            if v is not None:
                args += [opt, str(v)]
        return args

    def _run_vm(self, image: KernelImage, append: str | None, argv: list[str], out: Path) -> RunResult:
        kernel = virtme.KernelUnderTest.resolve(str(image.image), None)
        accel = virtme.choose_accel(None if self.target.accel == "auto" else self.target.accel)
        outcome = virtme.boot_and_run(kernel, argv, out.resolve(), accel=accel,
                                      cpus=1 if accel.name == "tcg" else 2, timeout=self.target.vm_timeout,
                                      append=append, echo=lambda line: print(f"  {line}", file=sys.stderr))
        rr = virtme.record(outcome, kernel, accel, out, argv)
        return rr

    def _run_remote(self, image: KernelImage, append: str | None, argv: list[str], out: Path) -> RunResult:
        box = self.target.box
        assert box is not None
        try:
            writes = self._writes(image, append)
            booted = dict(self.booted or {}) if writes else self._boot(image, append)
            context: AbstractContextManager = writes or nullcontext()
            with context:
                [ran] = run_on_boxes([box], argv, out.parent, self.target.how,
                                     echo=lambda line: print(f"  {line}", file=sys.stderr, flush=True))
        except RemoteError as e:
            raise UnavailableError(f"cannot run the series on {box.name}: {e}") from None
        (out.parent / box.name).rename(out)
        ran.rr.host["booted"] = {k: booted.get(k) for k in ("release", "boot_id", "append")}
        if append:
            ran.rr.host["module_params"] = {"values": append, "how": "written" if writes else "boot"}
        return ran.rr

    def _boot(self, image: KernelImage, append: str | None) -> dict:
        box = self.target.box
        assert box is not None
        res = boot(box, image.image, None, append, image.release, self.target.boot_deadline, self.target.how,
                   self.say)
        self.say(res.describe())
        if res.outcome is not BootOutcome.BOOTED:
            raise BadInputError(f"cannot run the series on {box.name}: {res.describe()}")
        self.booted = {"key": image.key, "append": append, "release": res.after[1] if res.after else None,
                       "boot_id": res.after[0] if res.after else None}
        return self.booted

    def _writes(self, image: KernelImage, append: str | None) -> Written | None:
        """The combination as writes of its parameters, when the box runs this
        kernel already (we booted it) and every one is writable there; None: boot."""
        params = params_of(append)
        if not params or not self.booted or self.booted["key"] != image.key:
            return None
        with self._session() as session:
            why = not_writable(session, params)
        if why:
            self.say(f"{session.box.name}: {why}: booting with {append!r}")
            return None
        return Written(self._session, params, self.say)

    def _session(self) -> Session:
        how = self.target.how
        assert self.target.box is not None
        return Session.open(self.target.box, how.trust, how.live, say=self.say, timeout=how.connect_timeout)

    # -- the whole thing ---------------------------------------------------------------------
    def execute(self, appends: list[str | None], bisect: bool, repeat: int = 1) -> Outcome:
        """The base kernel `repeat` times per combination, then the patched
        one as often (so compare judges phase times against the spread of
        repeats, not one sample against another); each combination's two
        compared; then bisected."""
        o = Outcome(self.series)
        self.outcome_steps = o.steps
        n = len(self.series.patches)
        last: dict[tuple[int, str | None], Step] = {}
        for k in (0, n):
            for append in appends:
                for i in range(repeat):
                    last[k, append] = self.run(k, append, self.run_args, tag=f"-{i + 1}" if i else "")
        for append in appends:
            top = last[n, append]
            c = compare(last[0, append].rr, top.rr, self.history)
            o.comparisons.append((append, c))
            if bisect and c.new_failures:
                o.first_bad[append] = self.bisect(append, top, [sb.name for sb, _ in c.new_failures])
        return o

    def bisect(self, append: str | None, top: Step, names: list[str]) -> int | None:
        """The first k whose kernel fails any of `names` (k = n is known to):
        a binary search, each step rerunning exactly those scenarios."""
        good, bad = 0, len(self.series.patches)
        results = top.out / "results.json"
        only = [a for name in names for a in ("--only", name)]
        while bad - good > 1:
            mid = (good + bad) // 2
            step = self.run(mid, append, ["rerun", str(results.resolve()), "--here", *only], tag="-bisect")
            broke = [s.name for s in step.rr.scenarios if s.name in names and s.verdict in FAILED]
            self.say(f"bisect: with {mid} patch(es): " + (f"fails ({', '.join(broke)})" if broke else "passes"))
            if broke:
                bad = mid
            else:
                good = mid
        return bad


def _git(tree: Path, *args: str) -> str:
    r = subprocess.run(["git", "-C", str(tree), *args], capture_output=True, text=True)
    if r.returncode:
        raise BadInputError(f"git {shlex.join(args)} in {tree}: {(r.stderr or r.stdout).strip()}")
    return r.stdout.strip()
