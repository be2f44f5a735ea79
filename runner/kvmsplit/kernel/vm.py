"""`kvmsplit vm`: test a KVM host kernel without rebooting into it.

virtme-ng boots the kernel under test in QEMU with a snapshot of this
machine's root filesystem, and runs a kvmsplit command inside, where KVM is
the kernel under test's. Where this host can nest (vmx/svm), QEMU uses KVM;
otherwise TCG with an emulated AMD CPU that has SVM and nested paging, slow
but a real TDP MMU with real eager splitting.

The console is watched with pexpect for three markers: our own BOOTED and
EXIT lines around the command, and a kernel panic. Whatever happens, the
output directory ends up with a results.json: the inner run's, annotated
with the kernel under test, or one that says why the VM run failed (MISS: it
never booted; ERROR: panic, death or timeout), with the last console lines.
"""
from __future__ import annotations

import hashlib
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import deque
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path

import pexpect
from elftools.elf.elffile import ELFFile

from kvmsplit import __version__
from kvmsplit.errors import NoInputError, UnavailableError, UsageError
from kvmsplit.kernellog import KernelLogFormatError, Report, corrupted_note, parse_log_text, parse_reports
from kvmsplit.kernellog.follow import ReportFollower
from kvmsplit.paths import REPO_ROOT, cache_dir
from kvmsplit.runs.results import RunResult, ScenarioResult, Verdict
from kvmsplit.runs.schema import load_results
from kvmsplit.vmm.guest.build import guest_image

BOOTED = "KVMSPLIT-VM-BOOTED"
EXITED = "KVMSPLIT-VM-EXIT"
PANIC_RE = r"Kernel panic - not syncing[^\r\n]*"
TCG_CPU = "EPYC,+svm,+npt"
KERNEL_LINE = re.compile(r"^\[\s*\d+\.\d+\]")
CONSOLE_TAIL = 80     # enough for a panic and its whole trace


@dataclass
class Accel:
    name: str        # "kvm" or "tcg"
    cpu: str         # QEMU -cpu model
    reason: str


def choose_accel(force: str | None = None) -> Accel:
    """Nested KVM where the host can nest, else TCG with SVM+NPT emulated."""
    flags = set()
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((set(ln.split(":", 1)[1].split()) for ln in f if ln.startswith("flags")), set())
    except OSError:
        pass
    nest = next((f for f in ("vmx", "svm") if f in flags), None)
    kvm_ok = os.access("/dev/kvm", os.R_OK | os.W_OK)
    if force == "tcg" or (force is None and not (nest and kvm_ok)):
        why = "forced" if force == "tcg" else \
            f"host has {'no vmx/svm' if not nest else 'no usable /dev/kvm'}"
        return Accel("tcg", TCG_CPU, f"TCG with an emulated SVM+NPT CPU ({why}); slow but a real TDP MMU")
    if not nest or not kvm_ok:
        raise UnavailableError("--accel kvm needs a host with vmx or svm and a usable /dev/kvm")
    return Accel("kvm", "host", f"nested KVM (host has {nest})")


@dataclass
class KernelUnderTest:
    image: Path
    tree: Path | None = None
    info: dict = field(default_factory=dict)

    @classmethod
    def resolve(cls, kernel: str | None, tree: str | None) -> KernelUnderTest:
        if bool(kernel) == bool(tree):
            raise UsageError("give exactly one of --kernel IMAGE or --kernel-tree PATH")
        if tree:
            t = Path(tree)
            image = t / "arch/x86/boot/bzImage"
            if not image.is_file():
                raise NoInputError(f"{t}: no arch/x86/boot/bzImage (is the kernel built?)")
            k = cls(image, t)
        else:
            image = Path(kernel)
            if not image.is_file():
                raise NoInputError(f"{image}: no such kernel image")
            k = cls(image)
        k.info = k._describe()
        return k

    def _describe(self) -> dict:
        """What identifies the kernel under test in the results."""
        h = hashlib.sha256()
        with open(self.image, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
        info = {"image": str(self.image.resolve()), "sha256": h.hexdigest()}
        vmlinux = (self.tree / "vmlinux") if self.tree else None
        if vmlinux and vmlinux.is_file():
            info["build_id"] = elf_build_id(vmlinux)
        if self.tree:
            r = subprocess.run(["git", "-C", str(self.tree), "rev-parse", "HEAD"],
                               capture_output=True, text=True)
            if r.returncode == 0:
                info["commit"] = r.stdout.strip()
        return info


def elf_build_id(elf_path: Path) -> str | None:
    with open(elf_path, "rb") as f:
        for sec in ELFFile(f).iter_sections():
            if sec.header["sh_type"] != "SHT_NOTE":
                continue
            for note in sec.iter_notes():
                if note["n_type"] == "NT_GNU_BUILD_ID":
                    return note["n_desc"]
    return None


def _tool(name: str, hint: str) -> str:
    path = shutil.which(name) or shutil.which(name, path=str(Path(sys.executable).parent))
    if not path:
        raise UnavailableError(f"{name} not found: {hint}")
    return path


def writes_results(argv: list[str]) -> bool:
    """Whether the command given to `kvmsplit vm` (none: `kvmsplit run`) writes a results.json."""
    words = argv[1:] if argv else ["run"]
    return words[:1] in (["run"], ["rerun"]) or words[:2] == ["selftests", "run"]


def _inner_command(argv: list[str], outdir: Path) -> list[str]:
    """The command to run inside, as this Python's `-m kvmsplit`, with the
    output directory made explicit (it is the one writable shared folder)."""
    if not argv:
        argv = ["kvmsplit", "run"]
    if argv[0] != "kvmsplit":
        raise UsageError(f"kvmsplit vm runs kvmsplit commands (got '{argv[0]}'): kvmsplit vm -- kvmsplit run ...")
    args = list(argv[1:])
    for i, a in enumerate(args):
        if a in ("--output", "-o") and i + 1 < len(args):
            args[i + 1] = str(outdir)
        elif a.startswith("--output="):
            args[i] = f"--output={outdir}"
    if writes_results(argv) and not any(a in ("--output", "-o") or a.startswith("--output=") for a in args):
        args += ["--output", str(outdir)]
    return [sys.executable, "-m", "kvmsplit", *args]


def output_dir_of(argv: list[str]) -> str | None:
    for i, a in enumerate(argv):
        if a in ("--output", "-o") and i + 1 < len(argv):
            return argv[i + 1]
        if a.startswith("--output="):
            return a.split("=", 1)[1]
    return None


def _script(cmd: list[str], panic_after: float | None = None) -> str:
    """What runs inside the VM. kvmsplit's caches and history there are
    private (tmpfs): a journal of the VM's hugetlb pools must never restore
    anything on this host. panic_after (tests) crashes the kernel under test
    for real, through sysrq, that many seconds into the command."""
    inner = "/tmp/kvmsplit-vm"
    crash = [f"{{ (sleep {panic_after}; echo c > /proc/sysrq-trigger) & }}"] if panic_after is not None else []
    return "; ".join([
        f"export KVMSPLIT_CACHE_DIR={inner}/cache KVMSPLIT_DATA_DIR={inner}/data "
        f"PYTHONPATH={shlex.quote(str(REPO_ROOT / 'runner'))}",
        f"mkdir -p {inner}/cache",
        f"cp -r {shlex.quote(str(cache_dir() / 'guests'))} {inner}/cache/ 2>/dev/null",
        # split quoting: the script also shows up on the kernel command line in
        # the console, and only the real echo may match the marker
        f"echo {BOOTED[:-6]}\"{BOOTED[-6:]}\" $(uname -r)",
        f"cd {shlex.quote(os.getcwd())}",
        *crash,
        shlex.join(cmd),
        f"echo {EXITED[:-4]}\"{EXITED[-4:]}\" $?",
    ])


class VmState(StrEnum):
    """How a `kvmsplit vm` run ended, and what it makes of the scenario in flight."""
    NO_BOOT = "no-boot"     # the command never started: MISS
    RUNNING = "running"     # (while it runs)
    DONE = "done"           # the command finished; its own results stand
    PANIC = "panic"         # the kernel under test panicked: ERROR
    DIED = "died"           # the VM exited before the command finished: ERROR
    TIMEOUT = "timeout"     # killed at --timeout: ERROR

    @property
    def why(self) -> str:
        return {"no-boot": "VM did not boot", "panic": "kernel under test panicked", "died": "VM died",
                "timeout": "VM command timed out"}.get(self.value, self.value)

    @property
    def verdict(self) -> Verdict:
        return Verdict.MISS if self is VmState.NO_BOOT else Verdict.ERROR


@dataclass
class VmOutcome:
    state: VmState
    rc: int | None
    release: str | None
    console: list[str]
    booted: bool = False        # the command started
    attempts: int = 1
    detail: str = ""
    boot_s: float | None = None
    wall_s: float = 0.0
    append: str | None = None   # the kernel command line options it booted with (a rerun boots the same)
    wants_results: bool = False  # the command writes a results.json (run, rerun, selftests run)


UNSHAREABLE = re.compile(r"[=,\s]")
# Where virtme-init mounts a fresh tmpfs, after it has shared the host's root: the
# host's files there are hidden from the VM unless shared again on their own.
HIDDEN_IN_VM = tuple(Path(p) for p in (
    "/run", "/dev", "/lib/modules", "/var/log", "/var/tmp", "/var/cache", "/var/spool/rsyslog",
    "/var/lib/portables", "/var/lib/machines", "/var/lib/private", "/var/lib/apt", "/var/lib/snapd/cookie",
    "/var/lib/sudo"))


def check_shareable(outdir: Path, what: str = "output folder") -> None:
    """A folder is shared with the VM through virtme-ng's --rwdir/--rodir, QEMU's
    options and the kernel's command line, which all take '=', ',' or a blank
    for syntax: every run in such a folder was a MISS. Refused before anything
    boots; both the path as given (where the VM sees it) and where it leads."""
    m = UNSHAREABLE.search(os.path.abspath(outdir)) or UNSHAREABLE.search(str(outdir.resolve()))
    if m:
        raise UsageError(f"{what} {outdir}: {m.group(0)!r} in its path cannot be shared with the VM "
                         "(virtme-ng takes it for syntax); choose another")


def _hidden_in_vm(p: Path) -> bool:
    return any(h in p.parents for h in HIDDEN_IN_VM)


def hidden_shares(outdir: Path) -> list[str]:
    """vng options that show the VM the host folders the command needs (kvmsplit's
    code, this Python and its environment, the working directory, the guest
    builds it copies) where virtme-init hides them under a tmpfs. Seen for real:
    from a checkout in /var/tmp, the command inside found no Python, and every
    run came back "done" with no scenarios. Each is shared at the path the
    command uses (a symlink's target, under the link's name). Read-only, except
    a folder that holds the output folder: virtme-ng mounts every --rwdir before
    any --rodir, and a read-only mount over it would hide the output's own."""
    outdir = outdir.resolve()
    needed = {Path(os.path.abspath(p)) for p in (REPO_ROOT, sys.prefix, sys.base_prefix, os.getcwd(),
                                                 cache_dir() / "guests")}
    hidden = [p for p in needed if _hidden_in_vm(p) and p.exists() and p != outdir]
    opts = []
    for p in sorted(p for p in hidden if not any(q in p.parents for q in hidden)):
        check_shareable(p, "folder")        # the path the VM sees, and its target here
        real = p.resolve()
        where = str(p) if real == p else f"{p}={real}"
        opts.append(f"--rwdir={where}" if p in outdir.parents or real in outdir.parents else f"--rodir={where}")
    return opts


def boot_and_run(kernel: KernelUnderTest, argv: list[str], outdir: Path, *, boot_attempts: int = 2,
                 **kw) -> VmOutcome:
    """_boot_once, again if the kernel died before the command started (a boot
    flake under TCG says nothing about the code under test). Attempts are
    recorded; a failure after the command started is never retried."""
    check_shareable(outdir)
    for attempt in range(1, boot_attempts + 1):
        out = _boot_once(kernel, argv, outdir, **kw)
        out.attempts = attempt
        if out.booted or out.state is VmState.TIMEOUT or attempt == boot_attempts:
            return out
        if kw.get("echo"):
            kw["echo"](f"kvmsplit vm: boot attempt {attempt} failed ({out.state}: {out.detail}); retrying")
    return out


def _boot_once(kernel: KernelUnderTest, argv: list[str], outdir: Path, *, accel: Accel,
                 cpus: int = 1, memory: str = "2G", timeout: float = 1800,
                 append: str | None = None, panic_after: float | None = None,
                 echo=None) -> VmOutcome:
    """Boot `kernel`, run the kvmsplit command `argv` inside. Never hangs:
    the whole QEMU process group is killed at `timeout`."""
    vng = _tool("vng", "pip install virtme-ng")
    _tool("qemu-system-x86_64", "apt-get install qemu-system-x86")
    _tool("busybox", "apt-get install busybox-static (virtme-ng builds its initramfs with it)")
    guest_image()             # warm the cache the VM copies from
    outdir.mkdir(parents=True, exist_ok=True)
    args = ["-r", str(kernel.image), "--verbose", "--cpus", str(cpus), "--memory", memory,
            *hidden_shares(outdir), "--rwdir", str(outdir),
            f"--qemu-opts=-cpu {accel.cpu}"]   # '=': the value starts with '-'
    if accel.name == "tcg":
        args.insert(0, "--disable-kvm")
    if append:
        args += [f"--append={append}"]
    args += ["--", _script(_inner_command(argv, outdir), panic_after)]
    tail: deque[str] = deque(maxlen=CONSOLE_TAIL)
    watch = ReportFollower(_say_report(echo))    # kvmsplit kernellog --follow, on this console
    t0 = time.monotonic()
    # vng runs its siblings (virtme-run) through PATH: put its own bin directory first
    path = os.pathsep.join([str(Path(vng).parent), os.environ.get("PATH", "")])
    # vng's own temporary files (virtme_ret*, sockets) go to a folder of ours: it
    # cleans them up at exit, which a VM killed at a timeout, a panic or a
    # SIGTERM never reaches. Only TERM travels into the guest, not TMPDIR.
    vng_tmp = tempfile.mkdtemp(prefix="kvmsplit-vng-")
    child = pexpect.spawn(vng, args, encoding="utf-8", codec_errors="replace", timeout=None,
                          env={**os.environ, "TERM": "dumb", "PATH": path, "TMPDIR": vng_tmp})
    out = VmOutcome(VmState.NO_BOOT, None, None, [], append=append, wants_results=writes_results(argv))
    patterns = [rf"{BOOTED} (\S+)", rf"{EXITED} (\d+)", PANIC_RE, r"\n", pexpect.EOF, pexpect.TIMEOUT]
    try:
        while True:
            left = timeout - (time.monotonic() - t0)
            i = child.expect(patterns, timeout=max(left, 0.1))
            text = child.before or ""
            for line in text.splitlines():
                line = line.rstrip("\r")
                if line and "TCG doesn't support requested feature" not in line:
                    tail.append(line)
                    watch.feed_line(line)
                    if echo and out.state is not VmState.NO_BOOT and not KERNEL_LINE.match(line):
                        echo(line)
            if i == 0:
                out.state, out.release, out.boot_s = VmState.RUNNING, child.match.group(1), time.monotonic() - t0
                out.booted = True
            elif i == 1:
                out.state, out.rc = VmState.DONE, int(child.match.group(1))
            elif i == 2:
                # the panic line may have arrived in pieces: finish it, and keep
                # what follows (the trace) for a few seconds
                line = child.match.group(0)
                child.expect([r"\n", pexpect.EOF, pexpect.TIMEOUT], timeout=2)
                line = (line + (child.before or "")).strip()
                child.expect([pexpect.EOF, pexpect.TIMEOUT], timeout=3)
                rest = [ln.rstrip("\r") for ln in (child.before or "").splitlines() if ln.strip()]
                tail.append(line)
                tail.extend(rest)
                for ln in [line, *rest]:
                    watch.feed_line(ln)
                out.state, out.detail = VmState.PANIC, line
                break
            elif i == 4:
                if out.state is VmState.RUNNING:
                    out.state, out.detail = VmState.DIED, "the VM exited before the command finished"
                elif out.state is VmState.NO_BOOT:
                    out.detail = "the VM never reached the command"
                break
            elif i == 5:
                out.state = VmState.TIMEOUT if out.state is not VmState.DONE else out.state
                out.detail = f"timed out after {timeout:.0f}s"
                break
            if out.state is VmState.DONE:
                child.expect(pexpect.EOF, timeout=60)   # let vng shut the VM down
                break
    finally:
        _kill_group(child)
        shutil.rmtree(vng_tmp, ignore_errors=True)
        out.wall_s = time.monotonic() - t0
        out.console = list(tail)
        watch.finish()
    return out


def _console_reports(lines: list[str]) -> list[dict]:
    try:
        return [r.to_dict() for r in parse_reports(parse_log_text("\n".join(lines)))]
    except KernelLogFormatError:
        return []


def _say_report(echo):
    """Each kernel report on the console, said as soon as it is complete."""
    if echo is None:
        return None

    def say(r: Report) -> None:
        echo(f"kvmsplit vm: kernel report: {r.title}{corrupted_note(r.to_dict())}")
    return say


def _kill_group(child) -> None:
    """vng runs QEMU below it; the pty made vng a session leader, so its
    process group is everything the VM run started."""
    try:
        os.killpg(child.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    child.close(force=True)


def record(outcome: VmOutcome, kernel: KernelUnderTest, accel: Accel, outdir: Path,
           argv: list[str]) -> RunResult:
    """results.json in outdir, annotated with the kernel under test; when the
    VM run broke, the scenario in flight becomes ERROR (or one 'vm' entry
    says why nothing ran) with the console tail."""
    path = outdir / "results.json"
    vm = {**kernel.info, "release": outcome.release, "accel": accel.name, "cpu": accel.cpu,
          "accel_reason": accel.reason, "state": outcome.state, "boot_s": outcome.boot_s,
          "boot_attempts": outcome.attempts, "append": outcome.append,
          "wall_s": outcome.wall_s, "outer_kernel": os.uname().release}
    if path.exists():
        rr = load_results(path)
    else:
        rr = RunResult(host={"kernel": {"release": outcome.release or "unknown"}}, argv=argv,
                       kvmsplit_version=__version__)
    rr.host["vm"] = vm
    lost = outcome.state is VmState.DONE and outcome.wants_results and not path.exists()
    if outcome.state is not VmState.DONE or lost:
        why = outcome.state.why
        reason = f"{why}: {outcome.detail}" if outcome.detail else why
        verdict = outcome.state.verdict
        if lost:        # never a green "done" with nothing in it
            reason, verdict = f"the command in the VM exited {outcome.rc} and wrote no results.json", Verdict.ERROR
        pending = [s for s in rr.scenarios if s.verdict is Verdict.MISS]
        if pending:
            victim = pending[0]
            victim.verdict, victim.reasons, victim.console_tail = verdict, [reason], outcome.console
        else:
            victim = ScenarioResult(name="vm", scenario={"kind": "vm", **vm}, verdict=verdict,
                                    reasons=[reason], console_tail=outcome.console)
            rr.scenarios.append(victim)
        # the console is the only kernel log left of a dead VM: parse it the same way
        reports = _console_reports(outcome.console)
        if reports:
            victim.kernel_log = {"status": "reports", "checked": True, "source": "console",
                                 "reports": reports}
            victim.reasons += [f"kernel: {r['title']}" for r in reports]
        rr.interrupted = True
    rr.finished = rr.finished or time.time()
    rr.write(outdir)
    return rr
