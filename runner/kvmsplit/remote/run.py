"""`kvmsplit remote run`: one kvmsplit command on several boxes at once.

Each box gets this kvmsplit (deploy.py), runs the command under `timeout -k`
in its work directory with its output in a directory of its own, streams
its output lines here, and its output directory comes back into
OUT/BOX/ with the console (what the command printed) as console.log; once
it is here, the box's copy (WORKDIR/runs/RUN) is removed (the deployed
venv, wheels and guests stay, for the next run). A run whose files could
not be fetched keeps its directory on the box, and its results say where.
Whatever happens, OUT/BOX/results.json says how it went: the box's own
results, marked with the box (`host.remote`); or, when the box could not be
reached or died, MISS for everything that never ran, with why. One box's
trouble never holds up another's: each has its own deadlines.
"""
from __future__ import annotations

import secrets
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from kvmsplit import __version__
from kvmsplit.errors import BadInputError, NoInputError, UsageError
from kvmsplit.remote.deploy import deploy
from kvmsplit.remote.inventory import Box
from kvmsplit.remote.ssh import Exit, HostKeyTrust, Liveness, RemoteError, Session

if TYPE_CHECKING:
    import paramiko
else:
    from kvmsplit.remote.ssh import paramiko  # imported on first use
from kvmsplit.runs.results import ERROR, MISS, RunResult, ScenarioResult
from kvmsplit.runs.schema import load_results

TIMED_OUT = (124, 137)      # `timeout`'s TERM, and its KILL after the grace


class Interrupted(KeyboardInterrupt):
    """Ctrl-C (or SIGTERM) during a remote run, after every box settled: its runs."""

    def __init__(self, runs: list[BoxRun]):
        super().__init__()
        self.runs = runs


@dataclass
class RemoteRun:
    """How to run on boxes: trust, liveness and the command's time limit."""
    timeout: float = 3600.0
    trust: HostKeyTrust = HostKeyTrust.KNOWN
    live: Liveness = field(default_factory=Liveness)
    connect_timeout: float = 15.0


@dataclass
class BoxRun:
    box: Box
    out: Path
    rr: RunResult
    exit: Exit | None = None
    problem: str | None = None       # why the box's own results are missing or incomplete

    @property
    def exit_code(self) -> int:
        return self.rr.exit_code()


def command_on_box(argv: list[str], kvmsplit: list[str], remote_out: str) -> list[str]:
    """The kvmsplit command as the box runs it: its venv's kvmsplit (as
    `python -m`: pip's script wrapper cannot take every directory name), with the
    output directory ours (replaced where given, added where the command takes one)."""
    if not argv or argv[0] != "kvmsplit":
        raise UsageError(f"kvmsplit remote runs kvmsplit commands (got '{argv[0] if argv else ''}'): "
                         "kvmsplit remote run BOX -- kvmsplit run ...")
    args = list(argv[1:])
    given = False
    for i, a in enumerate(args):
        if a in ("--output", "-o") and i + 1 < len(args):
            args[i + 1], given = remote_out, True
        elif a.startswith("--output="):
            args[i], given = f"--output={remote_out}", True
    takes_output = args[:1] in (["run"], ["rerun"], ["vm"]) or args[:2] == ["selftests", "run"]
    if takes_output and not given:
        args += ["--output", remote_out]
    return [*kvmsplit, *args]


def run_on_boxes(boxes: list[Box], argv: list[str], out: Path, how: RemoteRun,
                 echo: Callable[[str], None], uploads: dict[str, Path] | None = None) -> list[BoxRun]:
    """Every box at once; a list in the boxes' order. uploads: files put into
    each box's run directory first, by name (a rerun's results.json)."""
    lock = threading.Lock()
    stop = threading.Event()

    def say(line: str) -> None:
        with lock:
            echo(line)
    with ThreadPoolExecutor(max_workers=max(1, len(boxes)), thread_name_prefix="remote") as pool:
        futures = [pool.submit(run_on_box, b, argv, out / b.name, how, say, uploads or {}, stop) for b in boxes]
        try:
            return [f.result() for f in futures]
        except KeyboardInterrupt:
            # each box's command gets a SIGTERM there and the grace to finish;
            # what it wrote comes back; a second Ctrl-C leaves at once
            echo("kvmsplit: interrupted: stopping the command on every box and fetching what it wrote")
            stop.set()
            raise Interrupted([f.result() for f in futures]) from None


def run_on_box(box: Box, argv: list[str], out: Path, how: RemoteRun, say: Callable[[str], None],
               uploads: dict[str, Path], stop: threading.Event | None = None) -> BoxRun:
    out.mkdir(parents=True, exist_ok=True)
    token = time.strftime("%Y%m%d-%H%M%S-") + secrets.token_hex(3)
    remote_dir = f"runs/{token}"
    console: list[str] = []
    ran = BoxRun(box, out, _placeholder(box, argv))
    try:
        session = Session.open(box, how.trust, how.live, say=say, timeout=how.connect_timeout)
    except RemoteError as e:
        return _settle(ran, remote_dir, None, console, str(e))
    try:
        try:
            d = deploy(session, say=say)
            session.mkdirs(f"{box.workdir}/{remote_dir}")
            for name, local in uploads.items():
                session.put(local, f"{box.workdir}/{remote_dir}/{name}")
        except (RemoteError, OSError, EOFError, paramiko.SSHException) as e:
            return _settle(ran, remote_dir, None, console, f"{box.describe()}: {e}")
        cmd = command_on_box([a.replace("{rundir}", remote_dir) for a in argv], d.kvmsplit, remote_dir)
        env = {**dict(box.env), "KVMSPLIT_GUESTS_DIR": d.guests}
        say(f"[{box.name}] $ {' '.join(cmd)}")

        def line(text: str) -> None:
            console.append(text)
            say(f"[{box.name}] {text}")
        ran.exit = session.run(cmd, timeout=how.timeout, cwd=box.workdir, env=env, on_output=line, stop=stop)
        fetched = _fetch(session, box, remote_dir, out, how)
    finally:
        session.close()
    return _settle(ran, remote_dir, fetched, console, None)


def _fetch(session: Session, box: Box, remote_dir: str, out: Path, how: RemoteRun) -> str | None:
    """The box's output directory into `out`, over this connection or, if it
    died, one new one; None when done, else why not."""
    for attempt in (1, 2):
        try:
            if attempt == 2:
                session = Session.open(box, how.trust, how.live, timeout=how.connect_timeout)
            try:
                session.get_tree(f"{box.workdir}/{remote_dir}", out)
                _remove(session, f"{box.workdir}/{remote_dir}")
                return None
            finally:
                if attempt == 2:
                    session.close()
        except FileNotFoundError:
            return "the command left no output directory"
        except (RemoteError, OSError, EOFError, paramiko.SSHException) as e:
            why = str(e) or type(e).__name__
    return f"results not fetched: {why}"


def _remove(session: Session, remote: str) -> None:
    """A run's directory on the box, fetched: gone (a failure to remove it only leaves it there)."""
    try:
        session.output(["rm", "-rf", "--", remote])
    except RemoteError:
        pass


def _placeholder(box: Box, argv: list[str]) -> RunResult:
    return RunResult(host={"hostname": box.name, "kernel": {"release": "unknown"}}, argv=argv,
                     kvmsplit_version=__version__)


def _settle(ran: BoxRun, remote_dir: str, fetch_problem: str | None, console: list[str],
            unreachable: str | None) -> BoxRun:
    """OUT/BOX/results.json: the box's results (or a placeholder), marked with
    the box, with what did not run as MISS and a timeout as ERROR, saying why."""
    box, out, ex = ran.box, ran.out, ran.exit
    (out / "console.log").write_text("\n".join(console) + ("\n" if console else ""))
    rr = ran.rr
    if unreachable is None and (out / "results.json").is_file():
        try:
            rr = load_results(out / "results.json")
        except (BadInputError, NoInputError) as e:
            fetch_problem = f"the box's results.json is unusable: {e}"
    problem = unreachable
    if problem is None and ex is not None:
        if ex.status in TIMED_OUT:
            problem = f"timed out on the box (exit {ex.status} from timeout)"
        elif ex.status is None:
            problem = f"{box.describe()}: " + (ex.lost or "no exit status before our deadline")
    if problem is None and not rr.scenarios:
        tail = f": {console[-1]}" if console else ""
        problem = fetch_problem or (f"the command exited {ex.status if ex else '?'} without results{tail}")
    rr.host["remote"] = {**box.to_dict(), "workdir": box.workdir, "run_dir": remote_dir,
                         "exit": ex.status if ex else None, "problem": problem or fetch_problem}
    if problem:
        _mark(rr, problem, timed_out=ex is not None and ex.status in TIMED_OUT, console=console)
    rr.finished = rr.finished or time.time()
    rr.write(out)
    ran.rr, ran.problem = rr, problem or fetch_problem
    return ran


def _mark(rr: RunResult, why: str, timed_out: bool, console: list[str]) -> None:
    pending = [s for s in rr.scenarios if s.verdict == MISS]
    if timed_out:       # the box's kvmsplit took the TERM as an interruption: say whose
        for s in rr.scenarios:
            if s.verdict == ERROR and any(r.startswith("interrupted") for r in s.reasons):
                s.reasons.insert(0, why)
    if timed_out and pending and not any(why in s.reasons for s in rr.scenarios):
        pending[0].verdict, pending[0].reasons = ERROR, [why]
        pending[0].console_tail = console[-40:]
        pending = pending[1:]
    for s in pending:
        s.reasons = s.reasons or [why]
    if not rr.scenarios:
        rr.scenarios.append(ScenarioResult(name="remote", scenario={"kind": "remote", **rr.host["remote"]},
                                           verdict=ERROR if timed_out else MISS, reasons=[why],
                                           console_tail=console[-40:]))
    rr.interrupted = True
