"""A minimal x86 machine on /dev/kvm: memslots, a multiboot guest, one thread
per vCPU, a COM1 line device and an exit port.

The controller (scenario/engine.py) talks to the guest with `send()`/`expect()`;
vCPU threads match on the typed exits Vcpu.run() returns and turn them into
events on one queue. A vCPU that never comes back out of KVM_RUN is kicked
with a signal plus `immediate_exit`, so a hung guest costs a timeout, never a
hung runner.

A broken guest costs bounded memory: a line ends at ucall.MAX_LINE bytes, lines
outside the protocol are only counted (and kept in the console), the console
keeps the last CONSOLE_LINES lines, the event queue holds EVENTS_MAX events (a
vCPU that outruns the controller waits, as behind a UART's flow control), and
more than BACKLOG_MAX lines nobody asked for are a GuestError.
"""
from __future__ import annotations

import queue
import signal
import threading
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Self

from kvmsplit.vmm.guest import ucall
from kvmsplit.vmm.guest.loader import MB_BOOT_MAGIC, load_multiboot
from kvmsplit.vmm.kvm import (
    DirtyRingFullExit,
    FailEntryExit,
    FaultInjector,
    HltExit,
    InternalErrorExit,
    IoExit,
    Kvm,
    KvmIoctlError,
    ShutdownExit,
    Vcpu,
    VcpuExit,
    VmBugged,
    uapi,
)
from kvmsplit.vmm.memory import Backing, GuestMemory

KICK_SIGNAL = signal.SIGUSR1
SYS_SLOT = 0
SYS_GPA = 0

LSR_DATA_READY = 0x01
LSR_THR_EMPTY = 0x60

CONSOLE_LINES = 1000     # Machine.console keeps the last this many (up to twice as many) lines
EVENTS_MAX = 1024        # lines and deaths not yet taken by expect()
BACKLOG_MAX = 16         # per vCPU: protocol lines expect() has not been asked for yet
RING_STUCK_EXITS = 8     # DIRTY_RING_FULL exits in a row with an empty ring: KVM's ring is stuck


class GuestError(Exception):
    """The guest stopped, crashed or said something it should not have."""

    def __init__(self, message: str, line: ucall.GuestLine | None = None):
        super().__init__(message)
        self.line = line        # the guest's own line, where it said what went wrong


class GuestTimeout(GuestError):
    pass


class DirtyRingStuck(GuestError):
    """KVM keeps exiting DIRTY_RING_FULL while the vCPU's ring holds nothing to
    harvest: KVM pushed more entries than the ring has (overwriting ones not yet
    harvested), and its full count can never come down again. A KVM bug; the
    vCPU cannot run any more."""


@dataclass
class Slot:
    slot: int
    gpa: int
    size: int
    mem: GuestMemory
    offset: int = 0          # byte offset of this slot within `mem`
    flags: int = 0

    @property
    def hva(self) -> int:
        return self.mem.hva + self.offset

    @property
    def npages(self) -> int:
        return self.size >> 12


@dataclass
class _VcpuState:
    vcpu: Vcpu
    inbox: queue.Queue[bytes] = field(default_factory=queue.Queue)
    pending: bytearray = field(default_factory=bytearray)
    outbuf: bytearray = field(default_factory=bytearray)
    stray_lines: int = 0     # lines outside the protocol (and cut over-long ones)
    empty_ring_exits: int = 0   # DIRTY_RING_FULL exits in a row that found the ring empty
    thread: threading.Thread | None = None
    # Time inside KVM_RUN: (seconds of the runs that returned, start of the run
    # in flight or None). Replaced whole, only by this vCPU's thread, so another
    # thread always reads a consistent pair. Exit handling (the UART, the
    # LSR-poll wait on the inbox) runs between runs and is not in it.
    kvm_run: tuple[float, float | None] = (0.0, None)

    def kvm_run_seconds(self) -> float:
        done, since = self.kvm_run
        return done + (time.monotonic() - since if since is not None else 0.0)


def _install_kick_handler() -> None:
    # The default action of SIGUSR1 is to terminate; any handler makes it a
    # plain interruption of the vCPU thread's KVM_RUN (EINTR).
    if threading.current_thread() is threading.main_thread() and \
            signal.getsignal(KICK_SIGNAL) in (signal.SIG_DFL, None):
        signal.signal(KICK_SIGNAL, lambda *_: None)


class Machine:
    def __init__(self, kvm: Kvm, *, nr_vcpus: int = 1, sys_mem: int = 8 << 20,
                 dirty_ring_bytes: int = 0, ring_acq_rel: bool = True,
                 manual_protect: bool = False, initially_set: bool = False,
                 fault: FaultInjector | None = None):
        _install_kick_handler()
        self.kvm = kvm
        self.vm = kvm.create_vm()
        self.vm.fault = fault
        # (tag, vcpu id, payload): "line" GuestLine, "dead" str, "vmbugged" VmBugged, "ringstuck" str
        self.events: queue.Queue[tuple[str, int, Any]] = queue.Queue(EVENTS_MAX)
        self.console: list[str] = []           # the guest's last lines (CONSOLE_LINES..2x)
        self.console_dropped = 0               # older lines no longer in `console`
        self._last_stray: tuple[int, str] = (0, "")
        self._backlog: list[ucall.GuestLine] = []
        self.slots: dict[int, Slot] = {}
        self._mems: list[GuestMemory] = []
        self._stop = threading.Event()
        self._ring_lock = threading.Lock()
        self.ring_harvest: list[tuple[int, int]] = []   # (slot, offset) from ring-full exits
        self.ring_full_exits = 0
        if manual_protect:
            self.vm.enable_manual_dirty_log_protect(initially_set)
        if dirty_ring_bytes:
            self.vm.enable_dirty_ring(dirty_ring_bytes, ring_acq_rel)
        try:
            self.vm.set_tss_addr()
        except KvmIoctlError:
            pass  # only VMX needs it, and PVM refuses it; harmless either way
        sysmem = GuestMemory(Backing.ANON, sys_mem)
        self._mems.append(sysmem)
        self.add_slot(SYS_SLOT, SYS_GPA, sysmem)
        self.sysmem = sysmem
        cpuid = kvm.supported_cpuid()
        self.cpus: list[_VcpuState] = []
        for i in range(nr_vcpus):
            v = self.vm.vcpu_add(i)
            v.set_cpuid(_cpuid_for(cpuid, i))
            self.cpus.append(_VcpuState(v))

    # -- memory -------------------------------------------------------------------
    def add_slot(self, slot: int, gpa: int, mem: GuestMemory, offset: int = 0,
                 size: int | None = None, flags: int = 0) -> Slot:
        s = Slot(slot, gpa, size if size is not None else mem.size, mem, offset, flags)
        self.vm.userspace_mem_region_add(slot, gpa, s.size, s.hva, flags)
        self.slots[slot] = s
        return s

    def set_slot_flags(self, slot: int, flags: int) -> None:
        s = self.slots[slot]
        self.vm.userspace_mem_region_add(slot, s.gpa, s.size, s.hva, flags)
        s.flags = flags

    # -- boot ---------------------------------------------------------------------
    def load(self, image: Path | str) -> None:
        boot = load_multiboot(image, self.sysmem.buf, SYS_GPA, self.sysmem.size)
        for st in self.cpus:
            _set_multiboot_state(st.vcpu, boot.entry, boot.mbinfo_gpa)

    def start(self, cpus: Iterable[int] | None = None) -> None:
        """Start vCPU threads (all, or the given indices)."""
        for i in (range(len(self.cpus)) if cpus is None else cpus):
            st = self.cpus[i]
            if st.thread is None:
                st.thread = threading.Thread(target=self._vcpu_loop, args=(st,),
                                             name=f"vcpu{i}", daemon=True)
                st.thread.start()

    # -- the controller's side of the ucall protocol --------------------------------
    def send(self, cpu: int, line: str) -> None:
        self.cpus[cpu].inbox.put(line.encode())

    def expect(self, cpu: int, kind: str, timeout: float, what: str = "") -> ucall.GuestLine:
        """Wait for '@cpu KIND ...'. Guest death, an exception report, an ERR
        line or a timeout raise GuestError; other vCPUs' lines wait in a backlog."""
        for i, gl in enumerate(self._backlog):
            if gl.cpu == cpu and gl.kind == kind:
                return self._backlog.pop(i)
        deadline = time.monotonic() + timeout
        stray0 = self.stray_lines()
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise GuestTimeout(f"guest cpu {cpu} did not answer {what or kind} within {timeout:.0f}s"
                                   + self._stray_note(stray0))
            try:
                ev = self.events.get(timeout=left)
            except queue.Empty:
                continue
            tag = ev[0]
            if tag == "line":
                gl = ev[2]
                if gl is None:
                    continue
                if gl.kind == "L2EXIT":
                    raise GuestError(f"guest cpu {gl.cpu}: {ucall.L2Exit.parse(gl)}", gl)
                if gl.kind in ("EXC", "ERR"):
                    raise GuestError(f"guest cpu {gl.cpu}: {gl.text}", gl)
                if gl.cpu == cpu and gl.kind == kind:
                    return gl
                self._backlog.append(gl)   # another vCPU's answer: keep it for its expect()
                n = sum(1 for b in self._backlog if b.cpu == gl.cpu)
                if n > BACKLOG_MAX:
                    raise GuestError(f"guest cpu {gl.cpu} sent {n} lines nobody asked for "
                                     f"(waiting for cpu {cpu}'s {what or kind}), the last: {gl.text!r}", gl)
            elif tag == "vmbugged":
                raise ev[2]
            elif tag == "ringstuck":
                raise DirtyRingStuck(ev[2])
            elif tag == "dead":
                raise GuestError(ev[2])

    def stray_lines(self) -> int:
        """Lines outside the protocol the guest has written so far, all vCPUs."""
        return sum(st.stray_lines for st in self.cpus)

    def _stray_note(self, since: int) -> str:
        n = self.stray_lines() - since
        if n <= 0:
            return ""
        cpu, text = self._last_stray
        return f"; it wrote {n} lines outside the protocol meanwhile, the last (cpu {cpu}): {text!r}"

    # -- time inside KVM_RUN ----------------------------------------------------------
    def kvm_run_seconds_by_cpu(self) -> list[float]:
        """Per vCPU, the wall time its thread spent inside KVM_RUN (the guest
        running, or KVM working for it), a run in flight included. Not in it:
        the vCPU thread's exit handling in Python, including the up-to-50 ms
        waits for controller input in the UART LSR handler. Measured around
        Vcpu.run(), so the few microseconds that decode an exit count too, and
        so does the thread's wait for the GIL once KVM_RUN has returned, while
        another thread (the controller) runs Python code."""
        return [st.kvm_run_seconds() for st in self.cpus]

    def kvm_run_seconds(self) -> float:
        """kvm_run_seconds_by_cpu(), summed over vCPUs."""
        return sum(self.kvm_run_seconds_by_cpu())

    # -- vCPU threads ---------------------------------------------------------------
    def _event(self, tag: str, vcpu_id: int, payload: Any) -> None:
        # a full queue holds this vCPU back until the controller catches up or stops it
        while True:
            try:
                self.events.put((tag, vcpu_id, payload), timeout=0.05)
                return
            except queue.Full:
                if self._stop.is_set():
                    return

    def _vcpu_loop(self, st: _VcpuState) -> None:
        v = st.vcpu
        try:
            while not self._stop.is_set():
                done = st.kvm_run[0]
                t0 = time.monotonic()
                st.kvm_run = (done, t0)
                try:
                    ex = v.run()
                except InterruptedError:
                    continue        # a kick: look at the stop flag
                finally:
                    st.kvm_run = (done + time.monotonic() - t0, None)
                why = self._handle_exit(st, ex)
                if why:
                    self._event("ringstuck" if st.empty_ring_exits >= RING_STUCK_EXITS else "dead", v.id, why)
                    return
        except VmBugged as e:
            # without its traceback: it would keep this thread's frames, and
            # the last exit in them, alive in the event queue after the thread
            # ends (that once pinned the mmap'd kvm_run; see Vcpu.run())
            self._event("vmbugged", v.id, e.with_traceback(None))
        except KvmIoctlError as e:
            self._event("dead", v.id, f"vcpu {v.id}: {e}")

    def _handle_exit(self, st: _VcpuState, ex: VcpuExit) -> str | None:
        """Serve one exit. Returns why the vCPU is done, or None to run on."""
        vid = st.vcpu.id
        match ex:
            case IoExit():
                return self._handle_io(st, ex)
            case DirtyRingFullExit():
                return self._ring_full(st)
            case HltExit():
                return f"vcpu {vid} halted unexpectedly"
            case ShutdownExit():
                return f"vcpu {vid}: SHUTDOWN exit (triple fault)"
            case InternalErrorExit(suberror=sub, data=data):
                return f"vcpu {vid}: INTERNAL_ERROR suberror {sub} data {[hex(x) for x in data]}"
            case FailEntryExit(reason=reason):
                return f"vcpu {vid}: FAIL_ENTRY reason {reason:#x}"
            case _:
                return f"vcpu {vid}: unexpected exit {ex.name}"

    def _handle_io(self, st: _VcpuState, io: IoExit) -> str | None:
        """Serve one IO exit: the UART, the exit port, and 0xFF for any other
        IN. `io.data` is only valid until the next run(), so nothing keeps it."""
        if io.is_out:
            if io.port == ucall.COM1:
                self._uart_out(st, bytes(io.data))
            elif io.port == ucall.EXIT_PORT:
                part = f" after half a line: {st.outbuf[:80].decode(errors='replace')!r}" if st.outbuf else ""
                return f"vcpu {st.vcpu.id}: guest exited with code {io.data[0]:#x}{part}"
            return None
        if io.port == ucall.COM1_LSR:
            for i in range(io.count):
                io.data[i] = LSR_THR_EMPTY | (LSR_DATA_READY if self._uart_ready(st) else 0)
        elif io.port == ucall.COM1:
            for i in range(io.count):
                io.data[i] = st.pending.pop(0) if st.pending else 0
        else:
            io.data[:] = b"\xff" * len(io.data)
        return None

    def _uart_ready(self, st: _VcpuState) -> bool:
        # Block briefly in the exit handler instead of letting the guest spin
        # on LSR: each spin would be an exit. The bound keeps stop() prompt.
        if st.pending:
            return True
        try:
            st.pending += st.inbox.get(timeout=0.05)
        except queue.Empty:
            return False
        return True

    def _uart_out(self, st: _VcpuState, data: bytes) -> None:
        st.outbuf += data
        if b"\n" in data:
            *lines, rest = st.outbuf.split(b"\n")
            st.outbuf = bytearray(rest)
            for raw in lines:
                self._guest_line(st, raw)
        while len(st.outbuf) > ucall.MAX_LINE:    # no newline in sight: not the protocol
            self._guest_line(st, bytes(st.outbuf[:ucall.MAX_LINE]), cut=True)
            del st.outbuf[:ucall.MAX_LINE]

    def _guest_line(self, st: _VcpuState, raw: bytes | bytearray, cut: bool = False) -> None:
        long = cut or len(raw) > ucall.MAX_LINE
        text = raw[:ucall.MAX_LINE].decode(errors="replace").rstrip("\r")
        gl = None if long else ucall.parse_line(text)
        if long:
            text += f" [cut: over {ucall.MAX_LINE} bytes without a newline]"
        self.console.append(text)
        if len(self.console) >= 2 * CONSOLE_LINES:
            n = len(self.console) - CONSOLE_LINES
            del self.console[:n]
            self.console_dropped += n
        if gl is None:
            st.stray_lines += 1
            self._last_stray = (st.vcpu.id, text[:100])
            return
        self._event("line", st.vcpu.id, gl)

    def _ring_full(self, st: _VcpuState) -> str | None:
        """Harvest and reset on a DIRTY_RING_FULL exit; why the vCPU is done when
        KVM's ring is stuck (full, yet nothing in it to harvest, again and again)."""
        got = self._harvest_ring(st.vcpu)
        st.empty_ring_exits = 0 if got else st.empty_ring_exits + 1
        if st.empty_ring_exits < RING_STUCK_EXITS:
            return None
        return (f"vcpu {st.vcpu.id}: dirty ring stuck: {st.empty_ring_exits} DIRTY_RING_FULL exits in a row "
                f"with no entry to harvest (KVM pushed more entries than the ring's "
                f"{st.vcpu.ring.size if st.vcpu.ring else '?'} and overwrote unharvested ones; "
                "the vCPU cannot run again)")

    def _harvest_ring(self, v: Vcpu) -> int:
        assert v.ring is not None, "a ring-full exit without a dirty ring"
        got = v.ring.harvest()
        with self._ring_lock:
            self.ring_harvest.extend(got)
            self.ring_full_exits += 1
            self.vm.reset_dirty_rings()
        return len(got)

    def harvest_rings(self) -> list[tuple[int, int]]:
        """Collect every vCPU's ring (vCPUs must be idle) and reset them."""
        with self._ring_lock:
            out = self.ring_harvest
            self.ring_harvest = []
            for st in self.cpus:
                if st.vcpu.ring is not None:
                    out.extend(st.vcpu.ring.harvest())
            self.vm.reset_dirty_rings()
        return out

    # -- teardown -------------------------------------------------------------------
    def stop(self, timeout: float = 5.0) -> bool:
        """Stop every vCPU thread; True if all stopped."""
        self._stop.set()
        deadline = time.monotonic() + timeout
        for st in self.cpus:
            while st.thread is not None and st.thread.is_alive() and st.thread.ident is not None:
                st.vcpu.kick_prepare()
                try:
                    signal.pthread_kill(st.thread.ident, KICK_SIGNAL)
                except ProcessLookupError:
                    break
                st.thread.join(0.02)
                if time.monotonic() > deadline:
                    return False
        return True

    def close(self) -> None:
        self.stop()
        self.vm.close()
        for m in self._mems:
            m.close()
        self._mems = []

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _cpuid_for(entries: Sequence[uapi.kvm_cpuid_entry2], apic_id: int) -> list[uapi.kvm_cpuid_entry2]:
    """The host-supported CPUID with this vCPU's APIC id patched in, which is
    how the guest learns its cpu number (CPUID.1:EBX[31:24])."""
    out = []
    for e in entries:
        e = uapi.kvm_cpuid_entry2.from_buffer_copy(e)
        if e.function == 1:
            e.ebx = (e.ebx & 0x00FFFFFF) | (apic_id << 24)
        elif e.function in (0xB, 0x1F):
            e.edx = apic_id
        out.append(e)
    return out


def _set_multiboot_state(vcpu: Vcpu, entry: int, mbinfo: int) -> None:
    """The machine state multiboot v1 promises at the kernel's entry point."""
    s = vcpu.get_sregs()
    code = uapi.kvm_segment(base=0, limit=0xFFFFFFFF, selector=0x08, type=0xB, present=1,
                            dpl=0, db=1, s=1, l=0, g=1)
    data = uapi.kvm_segment(base=0, limit=0xFFFFFFFF, selector=0x10, type=0x3, present=1,
                            dpl=0, db=1, s=1, l=0, g=1)
    s.cs = code
    s.ds = s.es = s.fs = s.gs = s.ss = data
    s.cr0 = 0x11          # PE | ET
    s.cr4 = 0
    s.efer = 0
    vcpu.set_sregs(s)
    r = uapi.kvm_regs()
    r.rip, r.rflags, r.rax, r.rbx = entry, 0x2, MB_BOOT_MAGIC, mbinfo
    vcpu.set_regs(r)
