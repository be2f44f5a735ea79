"""kvmsplit's guest under qemu-system-x86_64 -accel kvm: the second VMM.

One QemuVm is one QEMU process: the multiboot guest on its COM1 (driven
through pexpect, the serial console being QEMU's stdio), QMP through
qemu.qmp's client, the test region as a pc-dimm at TEST_GPA so it is its own
KVM memslot exactly as under kvmsplit's own VMM, and its memory read back
with QMP `pmemsave`. Every QEMU this module starts is killed by close(),
which is idempotent and safe in a finally block.
"""
from __future__ import annotations

import contextlib
import mmap
import os
import shlex
import shutil
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import pexpect

from kvmsplit.errors import UnavailableError
from kvmsplit.lazy import lazy
from kvmsplit.vmm.guest import ucall
from kvmsplit.vmm.machine import GuestError, GuestTimeout
from kvmsplit.vmm.memory import GB, MB, Backing

if TYPE_CHECKING:
    import numpy as np
    from qemu.qmp.legacy import QEMUMonitorProtocol
else:
    np = lazy("numpy")     # imported when first used: after the guest's first line

QEMU = "qemu-system-x86_64"
TEST_GPA = 1 << 32              # the same GPA as kvmsplit's own VMM: a 1G-aligned DIMM above 4G
PROCESS_TAG = "kvmsplit-qemu"   # QEMU's process name (-name process=...): how tests count survivors
CONSOLE_KEEP = 200              # console lines kept for the result's tail
QMP_TIMEOUT = 30.0


class QemuError(Exception):
    """QEMU refused a command or died; the message has QEMU's own words."""


class QemuHung(QemuError):
    """QEMU did not answer QMP in time (stopped, or stuck in the kernel)."""


class QemuExited(QemuError):
    """The QEMU process is gone; .stderr holds what it said last."""

    def __init__(self, msg: str, stderr: str):
        super().__init__(msg)
        self.stderr = stderr

    @property
    def vm_bugged(self) -> bool:
        """QEMU's KVM_RUN failed with EIO: KVM killed the VM (KVM_BUG_ON)."""
        return "KVM_RUN failed" in self.stderr or "Input/output error" in self.stderr


def qemu_binary() -> str:
    path = shutil.which(QEMU)
    if path is None:
        raise UnavailableError(f"{QEMU} is not installed (Debian: apt install qemu-system-x86)")
    return path


@dataclass(frozen=True)
class Region:
    """The test region's memory backend: what the scenario's backing is, in QEMU's words."""
    backing: Backing
    size: int
    share: bool = True          # a shared mapping another process can open (hugetlb, anon)

    def object_arg(self, id_: str) -> str:
        if self.backing is Backing.THP:
            # private anonymous memory: QEMU madvises it MADV_HUGEPAGE
            return f"memory-backend-ram,id={id_},size={self.size},prealloc=off"
        opts = f"memory-backend-memfd,id={id_},size={self.size},share=on,prealloc=off"
        if self.backing.hugetlb_kb:
            opts += f",hugetlb=on,hugetlbsize={self.backing.page_size}"
        return opts      # anon: shmem, 4K (THP on shmem only where shmem_enabled allows it)


def low_memory(size: int, guest_page: str, l2_page: str | None = None) -> int:
    """RAM below the DIMM: SeaBIOS, the guest and its page tables (2M per GiB per 4K level)."""
    pt = sum(((size >> 30) + 1) << 21 for page in (guest_page, l2_page) if page == "4k")
    return 32 * MB + ((pt + 2 * MB - 1) // (2 * MB)) * 2 * MB


class QemuVm:
    """One QEMU process running kvmsplit's guest (or waiting for it to migrate in)."""

    def __init__(self, image: Path, workdir: Path, region: Region, *, name: str = "src",
                 low_mem: int = 32 * MB, dirty_ring_entries: int = 0, cpu: str = "host",
                 incoming: str | None = None, qmp_timeout: float = QMP_TIMEOUT):
        self.image, self.workdir, self.region, self.name = Path(image), Path(workdir), region, name
        self.qmp_timeout = qmp_timeout
        self.low_mem, self.dirty_ring_entries, self.cpu, self.incoming = low_mem, dirty_ring_entries, cpu, incoming
        self.console: list[str] = []
        self.child: pexpect.spawn | None = None
        self.qmp: QEMUMonitorProtocol | None = None
        self.qmp_path = self.workdir / f"{name}.qmp"
        self.stderr_path = self.workdir / f"{name}.stderr"
        self._partial = b""
        self._closed = False

    # -- life cycle -------------------------------------------------------------------------
    def argv(self) -> list[str]:
        accel = "kvm" + (f",dirty-ring-size={self.dirty_ring_entries}" if self.dirty_ring_entries else "")
        maxmem = self.low_mem + self.region.size
        argv = [qemu_binary(), "-name", f"kvmsplit-{self.name},process={PROCESS_TAG}",
                "-accel", accel, "-cpu", self.cpu, "-smp", "1", "-machine", "pc,memory-backend=low",
                "-m", f"{self.low_mem >> 20}M,slots=1,maxmem={maxmem >> 20}M",
                "-object", f"memory-backend-memfd,id=low,size={self.low_mem},share=on",
                "-object", self.region.object_arg("test"),
                "-device", f"pc-dimm,id=dimm0,memdev=test,addr={TEST_GPA:#x}",
                "-nodefaults", "-no-user-config", "-display", "none", "-no-reboot",
                "-serial", "stdio", "-device", "isa-debug-exit,iobase=0xf4,iosize=0x4",
                "-chardev", f"socket,id=qmp,path={self.qmp_path}", "-mon", "chardev=qmp,mode=control",
                "-kernel", str(self.image)]
        if self.incoming:
            argv += ["-incoming", "defer", "-S"]      # listens once migrate-incoming says so
        return argv

    def start(self) -> QemuVm:
        """Start QEMU and connect QMP (QEMU connects to our listening socket)."""
        self.workdir.mkdir(parents=True, exist_ok=True)
        with contextlib.suppress(FileNotFoundError):
            self.qmp_path.unlink()
        # late: qemu.qmp brings asyncio (~40 ms), which every other kvmsplit command would pay at start-up
        from qemu.qmp.legacy import QEMUMonitorProtocol
        self.qmp = QEMUMonitorProtocol(str(self.qmp_path), server=True)
        cmd = " ".join(shlex.quote(a) for a in self.argv())
        # stdio is the serial console; QEMU's own messages go to a file, not into the protocol
        self.child = pexpect.spawn("/bin/sh", ["-c", f"exec {cmd} 2>>{shlex.quote(str(self.stderr_path))}"],
                                   echo=False, timeout=None)
        try:
            self.qmp.accept(timeout=QMP_TIMEOUT)
        except Exception as e:     # OSError, a timeout, or qemu.qmp's own errors
            self.close()
            raise QemuExited(f"QEMU ({self.name}) did not come up: {e}", self.stderr()) from None
        self.qmp.settimeout(self.qmp_timeout)
        if self.incoming:
            self.cmd("migrate-incoming", uri=self.incoming)     # returns once it listens: no race
        return self

    @property
    def pid(self) -> int:
        assert self.child is not None
        return self.child.pid

    def alive(self) -> bool:
        return self.child is not None and self.child.isalive()

    def stderr(self) -> str:
        try:
            return self.stderr_path.read_text(errors="replace")[-4000:]
        except OSError:
            return ""

    def quit(self, timeout: float = 10.0) -> None:
        """QMP quit, then wait; close() kills whatever did not go."""
        if self.alive() and self.qmp is not None:
            with contextlib.suppress(Exception):
                self.qmp.cmd("quit")
            deadline = time.monotonic() + timeout
            while self.alive() and time.monotonic() < deadline:
                time.sleep(0.05)
        self.close()

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self.qmp is not None:
            with contextlib.suppress(Exception):
                self.qmp.close()
        if self.child is not None:
            if self.child.isalive():
                with contextlib.suppress(ProcessLookupError):
                    os.kill(self.child.pid, signal.SIGKILL)
            with contextlib.suppress(Exception):
                self.child.close(force=True)
        with contextlib.suppress(FileNotFoundError):
            self.qmp_path.unlink()

    # -- QMP ------------------------------------------------------------------------------------
    def cmd(self, name: str, **args) -> dict | list:
        """One QMP command; QemuError with QEMU's message if it refuses, QemuExited if it is gone."""
        if self.qmp is None or not self.alive():
            raise QemuExited(f"QEMU ({self.name}) is not running", self.stderr())
        try:
            resp = self.qmp.cmd_raw(name, args or None)
        except TimeoutError:
            raise QemuHung(f"QEMU ({self.name}) gave no answer to {name} within {self.qmp_timeout:.0f}s") from None
        except Exception as e:              # the socket closed under us: QEMU died
            raise QemuExited(f"QEMU ({self.name}) went away during {name}: {e}", self.stderr()) from None
        if resp is None:
            raise QemuExited(f"QEMU ({self.name}) closed QMP during {name}", self.stderr())
        if "error" in resp:
            raise QemuError(f"{name}: {resp['error'].get('desc', resp['error'])}")
        return resp["return"]

    def status(self) -> str:
        return str(self.cmd("query-status")["status"])      # type: ignore[call-overload]

    def vm_stats(self, names: tuple[str, ...]) -> dict[str, int]:
        """KVM's VM stats through QMP query-stats (provider kvm)."""
        out = self.cmd("query-stats", target="vm", providers=[{"provider": "kvm", "names": list(names)}])
        return _stat_values(out)

    def vcpu_stats(self, names: tuple[str, ...]) -> dict[str, int]:
        out = self.cmd("query-stats", target="vcpu", providers=[{"provider": "kvm", "names": list(names)}])
        return _stat_values(out)

    def pmemsave(self, gpa: int, size: int, path: Path) -> np.ndarray:
        """Guest-physical memory as QEMU sees it, through a file, as a read-only qword array."""
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
        self.cmd("pmemsave", val=gpa, size=size, filename=str(path))
        return np.memmap(path, dtype=np.uint64, mode="r", shape=(size // 8,))

    # -- the shared mapping of the test region --------------------------------------------------
    def map_region(self) -> mmap.mmap:
        """The test region's memfd, mapped shared from this process (hugetlb and anon backings):
        a write here is a write KVM never sees."""
        if self.region.backing is Backing.THP:
            raise UnavailableError("the THP backing is QEMU's private anonymous memory: no shared mapping")
        for fd in os.listdir(f"/proc/{self.pid}/fd"):
            link = f"/proc/{self.pid}/fd/{fd}"
            with contextlib.suppress(OSError):
                if os.readlink(link).startswith("/memfd:") and os.stat(link).st_size == self.region.size:
                    f = os.open(link, os.O_RDWR)
                    try:
                        return mmap.mmap(f, self.region.size, mmap.MAP_SHARED)
                    finally:
                        os.close(f)
        raise QemuError(f"no {self.region.size >> 20} MiB memfd in QEMU ({self.name})'s fds")

    # -- the serial console -----------------------------------------------------------------------
    def send(self, line: str) -> None:
        assert self.child is not None
        self.child.send(line.encode())

    def read_line(self, timeout: float) -> str | None:
        """The next console line (without CR/LF); None on timeout. QemuExited at EOF."""
        assert self.child is not None
        i = self.child.expect([b"\n", pexpect.EOF, pexpect.TIMEOUT], timeout=max(timeout, 0.0))
        if i == 1:
            self._partial += self.child.before or b""
            raise QemuExited(f"QEMU ({self.name}) exited (status {self._exit_status()})", self.stderr())
        if i == 2:
            return None             # pexpect keeps what came so far in its buffer for the next look
        raw = self._partial + (self.child.before or b"")
        self._partial = b""
        text = raw.rstrip(b"\r").decode(errors="replace")
        self.console.append(text)
        del self.console[:-CONSOLE_KEEP]
        return text

    def take_partial(self) -> bytes:
        """What the guest had written of an unfinished line (migration: the rest comes out of the
        destination's COM1)."""
        assert self.child is not None
        with contextlib.suppress(pexpect.EOF):
            self.child.expect([pexpect.TIMEOUT], timeout=0.2)
        p = self._partial + (self.child.before or b"")
        self._partial = b""
        self.child.buffer = b""     # taken: the destination's console goes on from here
        return p

    def prepend(self, partial: bytes) -> None:
        self._partial = partial + self._partial

    def expect(self, kind: str, timeout: float, what: str) -> ucall.GuestLine:
        """The next protocol line, which must be `kind`: GuestError for ERR/EXC or another kind,
        GuestTimeout if nothing came in time."""
        deadline = time.monotonic() + timeout
        while True:
            text = self.read_line(deadline - time.monotonic())
            if text is None:
                raise GuestTimeout(f"no {what} within {timeout:.0f}s")
            gl = ucall.parse_line(text)
            if gl is None:
                continue
            if gl.kind == kind:
                return gl
            raise GuestError(f"wanted {kind} ({what}), got: {gl.text}", gl)

    def _exit_status(self) -> str:
        assert self.child is not None
        with contextlib.suppress(Exception):
            self.child.close(force=False)
        st, sig = self.child.exitstatus, self.child.signalstatus
        return f"signal {sig}" if sig else str(st)


def _stat_values(out) -> dict[str, int]:
    vals: dict[str, int] = {}
    for entry in out:
        for provider in [entry] if "stats" in entry else entry.get("providers", []):
            for st in provider.get("stats", []):
                v = st.get("value")
                if isinstance(v, int):
                    vals[st["name"]] = vals.get(st["name"], 0) + v
    return vals


def qemu_processes(env_marker: str | None = None) -> list[int]:
    """Pids of QEMUs kvmsplit started that are still running (tests count them). With
    env_marker ("NAME=value"), only those whose environment carries it: a test marks its own
    QEMUs that way, and never counts (or kills) another run's."""
    out = []
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        with contextlib.suppress(OSError):
            if Path(f"/proc/{d}/comm").read_text().strip() != PROCESS_TAG[:15]:
                continue
            if env_marker and env_marker.encode() not in Path(f"/proc/{d}/environ").read_bytes().split(b"\0"):
                continue
            out.append(int(d))
    return out


__all__ = ["QemuVm", "Region", "QemuError", "QemuExited", "QemuHung", "TEST_GPA", "low_memory", "qemu_processes",
           "qemu_binary", "PROCESS_TAG", "GB"]
