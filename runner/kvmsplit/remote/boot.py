"""`kvmsplit remote boot`: switch a box to a kernel under test, and know
that it happened.

The image (and initrd) go to the box; its switch method loads it (kexec -l)
or picks it for the next boot only (grub-reboot: the default entry is
never changed), and the reboot starts in the background. Then we wait, up to
a deadline, for the box to answer with a changed
/proc/sys/kernel/random/boot_id, and compare its `uname -r` with the
release the image carries. Every ending is a BootOutcome, never a hang.
"""
from __future__ import annotations

import shlex
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path

from kvmsplit.errors import BadInputError, NoInputError
from kvmsplit.remote.inventory import Box, SwitchMethod
from kvmsplit.remote.run import RemoteRun
from kvmsplit.remote.ssh import RemoteError, Session

BOOT_ID = "/proc/sys/kernel/random/boot_id"
POLL_S = 1.0
BOOT_MARK = "@@kvmsplit-boot"
BOOT_REPORT = f'echo "{BOOT_MARK} $(cat {BOOT_ID}) $(uname -r)"'


class BootOutcome(StrEnum):
    BOOTED = "booted"               # a new boot, on the expected kernel
    WRONG_KERNEL = "wrong-kernel"   # a new boot, on another kernel (a GRUB fallback, a failed kexec)
    NO_RETURN = "no-return"         # no new boot answered before the deadline
    NOT_STARTED = "not-started"     # the switch itself failed; the box runs what it ran

    @property
    def exit_code(self) -> int:
        return 0 if self is BootOutcome.BOOTED else 1


@dataclass
class BootResult:
    outcome: BootOutcome
    box: Box
    expected: str | None
    before: tuple[str, str] = ("", "")      # (boot_id, release)
    after: tuple[str, str] | None = None
    waited_s: float = 0.0
    detail: str = ""
    log: list[str] = field(default_factory=list)

    def describe(self) -> str:
        b = self.box.name
        if self.outcome is BootOutcome.BOOTED:
            return f"{b}: booted {self.after[1] if self.after else '?'} (boot_id {self.before[0][:8]} -> " \
                   f"{self.after[0][:8] if self.after else '?'}) in {self.waited_s:.0f}s"
        if self.outcome is BootOutcome.WRONG_KERNEL:
            return f"{b}: WRONG KERNEL: came back on {self.after[1] if self.after else '?'}, expected " \
                   f"{self.expected} (the switch fell back to another kernel)"
        if self.outcome is BootOutcome.NO_RETURN:
            return f"{b}: did NOT come back within {self.waited_s:.0f}s of the switch to {self.expected}" + \
                (f" ({self.detail})" if self.detail else "")
        return f"{b}: the switch to {self.expected} did not start: {self.detail}"


def image_release(image: Path) -> str | None:
    """The release a bzImage names in its setup header (the x86 boot
    protocol's kernel_version string), e.g. '6.12.57'."""
    try:
        data = image.read_bytes()[:0x10000]
    except FileNotFoundError:
        raise NoInputError(f"{image}: no such kernel image") from None
    if len(data) < 0x210 or data[0x202:0x206] != b"HdrS":
        return None
    ptr = int.from_bytes(data[0x20E:0x210], "little")
    if not ptr:
        return None
    text = data[0x200 + ptr:0x200 + ptr + 256].split(b"\0")[0].decode("ascii", "replace")
    return text.split()[0] if text.split() else None


def read_boot(session: Session) -> tuple[str, str]:
    """(boot_id, release), from the one line of the output that is marked as
    ours: a box's login files may print too (on a real box they do: a
    `pyenv: cannot rehash` warning was taken for the release), and stdout and
    stderr arrive together."""
    _, out = session.output(["sh", "-c", BOOT_REPORT])
    for line in out.splitlines():
        words = line.split()
        if len(words) == 3 and words[0] == BOOT_MARK:
            return words[1], words[2]
    raise RemoteError(f"{session.box.describe()}: no boot_id and release in its answer: {out[-200:]!r}")


def boot(box: Box, image: Path, initrd: Path | None, append: str | None, expected: str | None,
         deadline_s: float, how: RemoteRun, say: Callable[[str], None]) -> BootResult:
    expected = expected or image_release(image)
    if not expected:
        raise BadInputError(f"{image}: no release in its boot header; give --release")
    res = BootResult(BootOutcome.NOT_STARTED, box, expected)
    try:
        if not _switch(box, image, initrd, append, expected, how, say, res):
            return res
    except RemoteError as e:        # unreachable, refused host key, lost before the switch: it runs what it ran
        res.detail = str(e)
        return res
    return _wait(box, deadline_s, how, res)


def _switch(box: Box, image: Path, initrd: Path | None, append: str | None, expected: str,
            how: RemoteRun, say: Callable[[str], None], res: BootResult) -> bool:
    """Send the image, load it, start the reboot; False (and res.detail) where a step failed."""
    with Session.open(box, how.trust, how.live, say=say, timeout=how.connect_timeout) as s:
        res.before = read_boot(s)
        say(f"{box.name}: running {res.before[1]} (boot_id {res.before[0]}); switching to {expected} "
            f"by {box.switch}")
        if box.switch is SwitchMethod.KEXEC and not initrd:
            say(f"{box.name}: no --initrd: the new kernel must mount the box's root by itself")
        s.mkdirs(f"{box.workdir}/boot")
        remote_image = f"boot/{image.name}"
        s.put(image, f"{box.workdir}/{remote_image}")
        remote_initrd = None
        if initrd:
            remote_initrd = f"boot/{initrd.name}"
            s.put(initrd, f"{box.workdir}/{remote_initrd}")
        *steps, reboot = box.switch.commands(remote_image, remote_initrd, append, expected)
        for step in steps:
            r = s.run(step, timeout=300, cwd=box.workdir, on_output=res.log.append)
            if r.status != 0:
                res.detail = f"`{shlex.join(step)}` " + (f"exited {r.status}" if r.status is not None else
                                                          (r.lost or "timed out")) + \
                    (f": {res.log[-1]}" if res.log else "")
                return False
        # detached: the reboot takes this connection with it
        s.shell(f"cd {shlex.quote(box.workdir)} && nohup {shlex.join(reboot)} >/dev/null 2>&1 &",
                deadline=time.monotonic() + how.live.dead_after)
    return True


def _wait(box: Box, deadline_s: float, how: RemoteRun, res: BootResult) -> BootResult:
    """Up to the deadline, for a new boot_id; then judge its release."""
    t0 = time.monotonic()
    res.outcome, res.detail = BootOutcome.NO_RETURN, ""
    while time.monotonic() - t0 < deadline_s:
        time.sleep(POLL_S)
        try:
            left = deadline_s - (time.monotonic() - t0)
            with Session.open(box, how.trust, how.live, timeout=max(1.0, min(how.connect_timeout, left))) as s:
                now = read_boot(s)
        except RemoteError as e:
            res.detail = f"last attempt: {e}"
            continue
        if now[0] == res.before[0]:
            res.detail = "still the old boot"
            continue
        res.after, res.detail = now, ""
        res.outcome = BootOutcome.BOOTED if now[1] == res.expected else BootOutcome.WRONG_KERNEL
        break
    res.waited_s = time.monotonic() - t0
    return res
