"""The guest's nested mode (N: an SVM L1 whose L2 does the passes under NPT),
run under QEMU's TCG, which emulates SVM and nested paging itself: no KVM
nesting needed. The guest image is the one the engine uses (guest_image()).

QEMU gives the guest RAM only below -m, and SeaBIOS leaves tables at the top
of it, so the test region sits at 1 GiB, well inside -m 3G, rather than at
the engine's 4 GiB; everything else is the engine's protocol, checked the way
the engine checks it."""
from __future__ import annotations

import os
import queue
import select
import shutil
import subprocess
import threading
import time

import numpy as np
import pytest

from conftest import need
from kvmsplit.vmm.guest import ucall

QEMU = "qemu-system-x86_64"
SVM_CPU = "EPYC,+svm,+npt"
MEM = "3G"
GPA = 1 << 30                  # 1G-aligned, up to 1G of region clear of low memory and SeaBIOS's tables
OUTSIDE_NPT = 0x20000000       # mapped by L1's boot page tables, not by L2's NPT
UNMAPPED = 0x7FFF00000000      # mapped by nothing
TIMEOUT = 120.0                # TCG on a busy machine: generous


class QemuGuest:
    """The guest under QEMU, driven line by line over its COM1 (stdio)."""

    def __init__(self, image, cpu: str, log):
        self.p = subprocess.Popen(
            [QEMU, "-accel", "tcg", "-cpu", cpu, "-m", MEM, "-nodefaults", "-display", "none",
             "-serial", "stdio", "-device", "isa-debug-exit,iobase=0xf4,iosize=0x4",
             "-kernel", str(image)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log)
        self.lines: queue.Queue = queue.Queue()
        self.console: list[str] = []
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        buf = b""
        fd = self.p.stdout.fileno()
        while True:
            select.select([fd], [], [])
            data = os.read(fd, 4096)
            if not data:
                self.lines.put(None)
                return
            buf += data
            while b"\n" in buf:
                raw, buf = buf.split(b"\n", 1)
                self.lines.put(raw.decode(errors="replace"))

    def send(self, cmd: str) -> None:
        self.p.stdin.write(cmd.encode())
        self.p.stdin.flush()

    def line(self, timeout: float = TIMEOUT) -> ucall.GuestLine | None:
        """The next protocol line; None if the guest said nothing in time."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                text = self.lines.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                return None
            assert text is not None, f"QEMU exited (rc {self.p.wait()}); console: {self.console}"
            self.console.append(text)
            gl = ucall.parse_line(text)
            if gl is not None:
                return gl

    def expect(self, kind: str, timeout: float = TIMEOUT) -> ucall.GuestLine:
        gl = self.line(timeout)
        assert gl is not None and gl.kind == kind, f"wanted {kind}, got {gl}; console: {self.console}"
        return gl

    def boot(self, size: int, shift: int) -> None:
        assert self.expect("HELLO").ints()[0] == ucall.PROTO_VERSION
        self.send(ucall.cmd_map(GPA, size, shift))
        assert self.expect("MAPPED").ints()[:3] == [GPA, size, shift]
        self.expect("READY")

    def nested(self, l2_shift: int) -> ucall.GuestLine:
        self.send(ucall.cmd_nested(l2_shift))
        return self.expect("NESTED")

    def close(self) -> int:
        if self.p.poll() is None:
            self.p.kill()
        return self.p.wait()


@pytest.fixture
def qemu(guest_image, tmp_path):
    need(shutil.which(QEMU) is not None, f"{QEMU} not installed")
    made = []

    def start(cpu: str = SVM_CPU) -> QemuGuest:
        log = open(tmp_path / f"qemu{len(made)}.stderr", "wb")
        g = QemuGuest(guest_image, cpu, log)
        made.append((g, log))
        return g
    yield start
    for g, log in made:
        g.close()
        log.close()


class Region:
    """What the test region holds, host-side: the first qword of each page."""

    def __init__(self, npages: int):
        self.q = np.zeros(npages, dtype=np.uint64)

    def write(self, g: QemuGuest, pass_no: int, pattern: str, pct: int, seed: int) -> np.ndarray:
        n = self.q.size
        g.send(ucall.cmd_write(pass_no, pattern, pct, seed, 0, n))
        done = g.expect("DONE")
        pages = ucall.written_pages(pass_no, pattern, pct, seed, 0, n)
        assert done.args[:2] == ("W", f"{pass_no:x}")
        assert int(done.args[2], 16) == len(pages)
        self.q[pages.astype(np.int64)] = ucall.marker(pass_no, pages)
        return pages

    def check_read(self, g: QemuGuest) -> None:
        g.send(ucall.cmd_read(0, self.q.size))
        done = g.expect("DONE")
        assert done.args[0] == "R"
        assert int(done.args[1], 16) == int(np.bitwise_xor.reduce(self.q))


@pytest.mark.parametrize("l1_shift,l2_shift,size", [
    (21, 12, 16 << 20),     # L2's NPT splits what L1 maps huge
    (12, 21, 16 << 20),     # and the other way round
    (21, 30, 1 << 30),      # 1G NPT pages
], ids=["l1-2m-l2-4k", "l1-4k-l2-2m", "l1-2m-l2-1g"])
def test_l2_does_the_passes(qemu, l1_shift, l2_shift, size):
    g = qemu()
    g.boot(size, l1_shift)
    nested = g.nested(l2_shift)
    assert nested.ints()[0] == l2_shift
    assert nested.ints()[1] >= 3            # at least root, PDPT and a PD or two
    r = Region(size >> 12)
    big = size >= 1 << 30
    r.write(g, 1, "random" if big else "seq", 10 if big else 100, 7)
    p2 = r.write(g, 2, "random", 30, 99)
    r.check_read(g)
    # L2 sees exactly the bytes the host model says, page by page
    p2_set = set(int(p) for p in p2)
    untouched = next(i for i in range(r.q.size) if i not in p2_set)
    for page in (int(p2[0]), int(p2[-1]), untouched):
        g.send(ucall.cmd_l2_peek(GPA + (page << 12)))
        done = g.expect("DONE")
        assert done.args[0] == "F" and int(done.args[1], 16) == int(r.q[page])
    g.send(ucall.CMD_QUIT)
    assert g.p.wait(timeout=TIMEOUT) == 1         # isa-debug-exit: (0 << 1) | 1


@pytest.mark.parametrize("cpu,reason", [
    ("EPYC,-svm", "no SVM in CPUID 8000_0001"),
    ("EPYC,+svm,-npt", "no nested paging in CPUID 8000_000A"),
])
def test_no_svm_is_a_reason_and_leaves_l1_working(qemu, cpu, reason):
    g = qemu(cpu)
    g.boot(16 << 20, 21)
    g.send(ucall.cmd_nested(21))
    err = g.expect("ERR")
    why = ucall.svm_unavailable(err)
    assert why is not None and why.startswith(reason), err.text
    # the guest is still the plain (CPL3) guest
    r = Region(4096)
    r.write(g, 1, "seq", 50, 0)
    r.check_read(g)


def test_bad_l2_shift_is_an_error_not_a_skip(qemu):
    g = qemu()
    g.boot(16 << 20, 21)
    g.send(ucall.cmd_nested(13))
    err = g.expect("ERR")
    assert ucall.svm_unavailable(err) is None
    assert g.nested(21).ints()[0] == 21


@pytest.mark.parametrize("gpa,code", [
    (OUTSIDE_NPT, ucall.SVM_EXIT_NPF),
    (UNMAPPED, ucall.SVM_EXIT_EXCP_BASE + 14),     # L2's own #PF, intercepted
], ids=["npf", "l2-page-fault"])
def test_l2_fault_is_an_l2exit_and_ends_nested_mode(qemu, gpa, code):
    g = qemu()
    g.boot(16 << 20, 21)
    g.nested(21)
    g.send(ucall.cmd_l2_peek(gpa))
    ex = ucall.L2Exit.parse(g.expect("L2EXIT"))
    assert ex.code == code, str(ex)
    assert ex.info2 == gpa                          # NPF: the GPA; #PF: CR2
    if code == ucall.SVM_EXIT_NPF:
        assert ex.info1 & (1 << 32)                 # the final translation, not a table walk
    # L2 is gone: everything but Q is refused
    g.send(ucall.cmd_read(0, 1))
    assert "L2EXIT" in g.expect("ERR").text
    g.send(ucall.CMD_QUIT)
    assert g.p.wait(timeout=TIMEOUT) == 1


def test_hang_in_l2_never_answers(qemu):
    g = qemu()
    g.boot(16 << 20, 21)
    g.nested(12)
    g.send(ucall.CMD_HANG)
    assert g.line(timeout=3.0) is None
    assert g.p.poll() is None                       # spinning, not dead
