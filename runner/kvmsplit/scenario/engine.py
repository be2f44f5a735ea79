"""Run one scenario on /dev/kvm: its phases, then its verdict.

Phases: boot, populate, enable, [first-clear], dirty-1..N, disable, recovery,
verify. Each phase ends with a snapshot of the VM's page-size stats and the
vCPUs' fault/exit deltas; the checks in verdict.py judge those snapshots.
"""
from __future__ import annotations

import time
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING

from kvmsplit.host.changes import HostChanges
from kvmsplit.host.facts import HostFacts
from kvmsplit.kernellog import KernelLogGuard
from kvmsplit.lazy import lazy
from kvmsplit.runs.results import Phase, ScenarioResult, Verdict
from kvmsplit.scenario.expectation import expect
from kvmsplit.scenario.model import DirtyMode, Scenario
from kvmsplit.scenario.observations import Observations
from kvmsplit.scenario.verdict import HUGE_SIZES, Judgement, judge
from kvmsplit.scenario.witness import Witness
from kvmsplit.tracing import TraceSession
from kvmsplit.vmm.guest import ucall
from kvmsplit.vmm.kvm import FaultInjector, KvmIoctlError, VmBugged, uapi
from kvmsplit.vmm.machine import DirtyRingStuck, GuestError, GuestTimeout, Machine
from kvmsplit.vmm.memory import Backing, GuestMemory

if TYPE_CHECKING:
    import numpy as np
else:
    np = lazy("numpy")     # imported when first used: after the guest's first line

TEST_GPA = 1 << 32          # 4 GiB: 1G-aligned and clear of the boot identity map
FIRST_TEST_SLOT = 1
L2_FAULT = ucall.cmd_l2_peek(0x20000000)    # 512 MiB: L1's NPT maps low memory and the test region only
VM_STATS = ("pages_4k", "pages_2m", "pages_1g", "remote_tlb_flush", "mmu_shadow_zapped",
            "mmu_unsync", "mmu_cache_miss", "nx_lpage_splits")
VCPU_STATS = ("pf_taken", "pf_fixed", "exits", "io_exits", "insn_emulation")


@dataclass
class RunOptions:
    expect: str | None = None           # --expect eager|lazy|none
    accept_user_log: bool = False       # count user-facility kmsg records (tests)
    phase_timeout: float | None = None
    inject_eio: str | None = None       # make this ioctl fail with EIO (tests)
    inject_hang: str | None = None      # the guest hangs in this phase (tests)
    inject_bug: str | None = None       # kvmsplit itself raises in this phase (tests: a bug can't be had on demand)
    inject_l2_fault: str | None = None  # nested: L2 touches memory L1 never mapped for it, in this phase (tests)
    inject_misbehave: tuple[str, str] | None = None     # (kind, phase): the guest misbehaves there (tests)
    on_phase: Callable[[str, str], None] | None = None
    trace: bool = True                  # the tracepoint witness (--no-trace turns it off: UNCONFIRMED)


class NotTestable(Exception):
    """The scenario cannot be tested here, found out while it ran: a SKIP with the reason."""


class ScenarioRun:
    def __init__(self, scenario: Scenario, facts: HostFacts, image, host: HostChanges,
                 kvm, options: RunOptions | None = None, witness: Witness | None = None):
        self.s = scenario
        self.facts = facts
        self.image = image
        self.host = host
        self.kvm = kvm
        self.opt = options or RunOptions()
        self.witness = witness
        self.trace: TraceSession | None = None
        self.trace_unavailable: str | None = None
        self.res = ScenarioResult(name=scenario.name, scenario=scenario.to_dict())
        self.exp = expect(scenario, facts, self.opt.expect)
        self.res.expectation = self.exp.to_dict()
        self.m: Machine | None = None
        self.mem: GuestMemory | None = None
        self.cur_phase = "setup"
        self.dirty_passes: list[dict] = []
        self.memory_mismatch: list[dict] = []
        self.verify: dict | None = None
        self.initially_set: dict | None = None
        self.vm_bugged: str | None = None
        self.error: str | None = None
        self.not_testable: str | None = None   # found out only once the guest ran (no SVM for L1)
        self.kernel_s = 0.0
        self.host_huge_bytes: int | None = None
        self.sys_mem = 0
        self.pass1_regions: dict[str, int] = {}    # huge regions dirty pass 1 wrote: the lazy prediction
        self.route = ucall.WriteRoute.NATIVE       # how the dirty passes write (write_via, on this host)

    # -- entry point -------------------------------------------------------------------
    def run(self) -> ScenarioResult:
        r = self.res
        r.started = time.time()
        t0 = time.monotonic()
        skip = self._prerequisites()
        if skip:
            r.verdict, r.reasons = Verdict.SKIP, [skip]
            r.duration_s = 0.0
            return r
        guard = KernelLogGuard(accept_user=self.opt.accept_user_log)
        guard.start()
        self._open_trace()
        try:
            self._setup()
            self._phases()
        except NotTestable as e:
            self.not_testable = str(e)
        except VmBugged as e:
            self.vm_bugged = f"{e.ioctl} returned EIO in phase {self.cur_phase}"
        except DirtyRingStuck as e:
            # a finding, judged from the dirty pass it cut short; elsewhere it cannot be judged
            if not any(p.get("ring_stuck") for p in self.dirty_passes):
                self.error = f"guest failed in phase {self.cur_phase}: {e}"
        except GuestTimeout as e:
            self.error = f"guest hung in phase {self.cur_phase}: {e}"
        except GuestError as e:
            self.error = f"guest failed in phase {self.cur_phase}: {e}"
        except KvmIoctlError as e:
            self.error = f"{e} (phase {self.cur_phase})"
        except MemoryError:
            self.error = f"out of memory in phase {self.cur_phase}"
        except BaseException:
            r.verdict, r.error_phase = Verdict.ERROR, self.cur_phase
            r.reasons = [f"interrupted in phase {self.cur_phase}"]
            raise
        finally:
            self._teardown()      # before the guard stops: a WARNING at VM teardown counts
            r.kernel_log = guard.stop().to_dict()
            r.duration_s = time.monotonic() - t0
        if self.not_testable:
            r.verdict, r.reasons = Verdict.SKIP, [self.not_testable]
            return r
        r.dirty = {"passes": self.dirty_passes, "initially_set": self.initially_set}
        self._apply(judge(self.observations(), self.exp))
        return r

    def _open_trace(self) -> None:
        self.trace = self.witness.session() if self.witness else None
        if self.trace is None:
            self.trace_unavailable = self.witness.unavailable if self.witness else "no trace witness was set up"


    def observations(self) -> Observations:
        """Everything the verdict needs, frozen."""
        return Observations(
            size=self.s.size, backing=self.s.backing.value, phases=tuple(self.res.phases),
            last_phase=self.cur_phase, dirty_passes=tuple(self.dirty_passes),
            initially_set=self.initially_set, memory_mismatch=tuple(self.memory_mismatch),
            verify=self.verify, vm_bugged=self.vm_bugged, error=self.error,
            host_huge_bytes=self.host_huge_bytes, pass1_regions=self.pass1_regions,
            kernel_log=self.res.kernel_log, trace_unavailable=self.trace_unavailable, nested=self.s.is_nested,
            memory_bytes=self.s.size + self.sys_mem)

    def _apply(self, j: Judgement) -> None:
        r = self.res
        r.verdict, r.reasons, r.checks, r.observed_split = j.verdict, j.reasons, j.checks, j.observed_split
        if j.error_phase:
            r.error_phase = j.error_phase

    def _prerequisites(self) -> str | None:
        s, f = self.s, self.facts
        cap = s.dirty_mode.capability
        if cap and not f.cap(cap):
            return f"KVM lacks KVM_CAP_{cap}"
        if cap and s.dirty_mode.ring and s.ring_size > f.cap(cap):
            return f"ring_size {s.ring_size} exceeds KVM's maximum {f.cap(cap)}"
        if s.dirty_mode.ring and f.dirty_ring_min and s.ring_size < f.dirty_ring_min:
            return (f"ring_size {s.ring_size} is below the smallest ring KVM accepts here ({f.dirty_ring_min}: "
                    "its reserved entries must fit)")
        if s.guest_page == "1g" and not f.guest_features.get("pdpe1gb"):
            return ("KVM does not offer 1G guest pages here (no PDPE1GB in "
                    "KVM_GET_SUPPORTED_CPUID)")
        if s.is_nested:
            why = f.nested_svm()
            if why:
                return why
        if s.write_via.emulated:
            route, why = f.emulation_route()
            if route is None:
                return f"write_via {s.write_via.value}: {why}"
            self.route = route
            self.res.extra["write_route"] = {"route": route.name.lower(), "string": s.write_via.string,
                                             "why": why}
        if s.backing is Backing.THP and f.thp == "never":
            return "transparent hugepages are disabled on this host (THP=never)"
        if s.backing.hugetlb_kb:
            return self.host.ensure_hugepages(s.backing.hugetlb_kb, s.size // s.backing.page_size)
        return None

    # -- set-up -------------------------------------------------------------------------
    def _setup(self) -> None:
        s = self.s
        fault = FaultInjector(self.opt.inject_eio) if self.opt.inject_eio else None
        # page tables for the test region live in system memory: 2M per GiB at 4K pages
        self.sys_mem = (8 << 20) + sum(((s.size >> 30) + 1) << 21 for page in (s.guest_page, self._l2_page())
                                       if page == "4k")
        self.m = Machine(self.kvm, nr_vcpus=s.vcpus, sys_mem=self.sys_mem,
                         dirty_ring_bytes=s.ring_size if s.dirty_mode.ring else 0,
                         ring_acq_rel=s.dirty_mode is DirtyMode.RING_ACQ_REL,
                         manual_protect=s.dirty_mode.manual,
                         initially_set=s.dirty_mode is DirtyMode.MANUAL_INIT_SET,
                         fault=fault)
        try:
            self.mem = GuestMemory(s.backing, s.size)
        except OSError as e:
            raise GuestError(f"cannot allocate {s.size >> 20} MiB of {s.backing.value} memory: "
                             f"{e.strerror}") from None
        self.slots = []
        for i in range(s.memslots):
            off = i * s.slot_size
            self.slots.append(self.m.add_slot(FIRST_TEST_SLOT + i, TEST_GPA + off, self.mem,
                                              offset=off, size=s.slot_size))
        self.m.load(self.image)

    def _teardown(self) -> None:
        if self.m is not None:
            self.res.console_tail = self.m.console[-20:]
            self.m.close()
        if self.mem is not None:
            self.mem.close()

    @property
    def machine(self) -> Machine:
        assert self.m is not None, "the machine is made in _setup()"
        return self.m

    @property
    def memory(self) -> GuestMemory:
        assert self.mem is not None, "the memory is made in _setup()"
        return self.mem

    # -- phases ---------------------------------------------------------------------------
    @contextmanager
    def phase(self, name: str):
        self.cur_phase = name
        if self.opt.on_phase:
            self.opt.on_phase(self.s.name, name)
        if self.opt.inject_bug == name:
            raise RuntimeError(f"injected kvmsplit bug in phase {name}")
        before = self._vcpu_stats()
        k0, r0 = self.kernel_s, self._kvm_run_s()
        t = time.monotonic()
        yield
        dur = time.monotonic() - t
        after = self._vcpu_stats()
        trace = self.trace.take().to_dict() if self.trace is not None else None
        self.res.phases.append(Phase(name, dur, self.kernel_s - k0, self._vm_stats(),
                                     {k: after[k] - before[k] for k in after}, trace,
                                     self._kvm_run_s() - r0))

    def _kvm_run_s(self) -> float:
        return self.m.kvm_run_seconds() if self.m is not None else 0.0

    @contextmanager
    def in_kernel(self):
        """Account time spent waiting on the guest or in KVM: what the
        harness overhead is measured against (bench/)."""
        t = time.monotonic()
        try:
            yield
        finally:
            self.kernel_s += time.monotonic() - t

    def _vm_stats(self) -> dict:
        st = self.machine.vm.stats
        return st.read([n for n in VM_STATS if n in st.descs])

    def _vcpu_stats(self) -> dict:
        tot: dict[str, int] = {}
        for c in self.machine.cpus:
            st = c.vcpu.stats
            for k, v in st.read([n for n in VCPU_STATS if n in st.descs]).items():
                tot[k] = tot.get(k, 0) + v
        return tot

    def _timeout(self) -> float:
        return self.opt.phase_timeout or self.s.timeout_for(self.cur_phase)

    def _command_all(self, make_cmd, kind: str) -> list[ucall.GuestLine]:
        """Send each vCPU its command, wait for every DONE."""
        hang = self.opt.inject_hang == self.cur_phase
        fault = self.opt.inject_l2_fault == self.cur_phase and self.s.is_nested
        bad = self.opt.inject_misbehave
        odd = bad is not None and bad[1] == self.cur_phase
        with self.in_kernel():
            for c in range(self.s.vcpus):
                self.machine.send(c, ucall.cmd_misbehave(bad[0]) if bad and odd else ucall.CMD_HANG if hang
                                  else L2_FAULT if fault else make_cmd(c))
            return [self.machine.expect(c, "DONE", self._timeout(), f"{kind} in phase {self.cur_phase}")
                    for c in range(self.s.vcpus)]

    def _partition(self, cpu: int) -> tuple[int, int]:
        per = self.s.npages // self.s.vcpus
        return cpu * per, per

    def _phases(self) -> None:
        s, m = self.s, self.machine
        with self.phase("boot"), self.in_kernel():
            m.start([0])
            hello = m.expect(0, "HELLO", self._timeout(), "HELLO")
            if hello.ints()[0] != ucall.PROTO_VERSION:
                raise GuestError(f"guest speaks protocol {hello.args[0]}, host {ucall.PROTO_VERSION}")
            m.send(0, ucall.cmd_map(TEST_GPA, s.size, ucall.PAGE_SHIFTS[s.guest_page]))
            m.expect(0, "MAPPED", self._timeout(), "MAPPED")
            m.expect(0, "READY", self._timeout(), "READY")
            if s.is_nested:
                self._become_l1()
            m.start()    # the APs boot on the page tables the BSP built
            for c in range(1, s.vcpus):
                m.expect(c, "READY", self._timeout(), "READY")

        with self.phase("populate"):
            self._write_pass(0, "seq", 100, check_dirty=False)
        # what the host kernel backs with huge pages: tells "THP gave none" from a KVM bug
        self.host_huge_bytes = self.memory.huge_bytes()

        with self.phase("enable"), self.in_kernel():
            for sl in self.slots:
                m.set_slot_flags(sl.slot, uapi.MEM_LOG_DIRTY_PAGES)

        if s.dirty_mode.manual:
            with self.phase("first-clear"):
                self._first_clear()

        for p in range(1, s.passes + 1):
            with self.phase(f"dirty-{p}"):
                self._write_pass(p, s.pattern, s.percent, check_dirty=True)

        with self.phase("disable"), self.in_kernel():
            for sl in self.slots:
                m.set_slot_flags(sl.slot, 0)

        with self.phase("recovery"):
            self._write_pass(s.passes + 1, "seq", 100, check_dirty=False)

        with self.phase("verify"):
            self._verify()

    def _l2_page(self) -> str | None:
        return self.s.l2_page if self.s.is_nested else None

    def _become_l1(self) -> None:
        """The guest turns L1 hypervisor; from now on an L2 under its NPT does the passes."""
        self.machine.send(0, ucall.cmd_nested(ucall.PAGE_SHIFTS[self.s.l2_page]))
        try:
            self.res.extra["l1"] = self.machine.expect(0, "NESTED", self._timeout(), "NESTED").text
        except GuestError as e:
            why = ucall.svm_unavailable(e.line) if e.line is not None else None
            if why is None:
                raise
            raise NotTestable(f"the guest cannot run an SVM L2 here: {why}") from None

    # -- the work in each phase -----------------------------------------------------------
    def _write_pass(self, pass_no: int, pattern: str, pct: int, check_dirty: bool) -> None:
        s = self.s
        parts = [self._partition(c) for c in range(s.vcpus)]
        # only the dirty passes go the scenario's way: populate and recovery map memory natively
        route = self.route if check_dirty else ucall.WriteRoute.NATIVE
        string = check_dirty and s.write_via.string
        pages = np.concatenate([ucall.written_pages(pass_no, pattern, pct, s.seed, *p) for p in parts])
        t = time.monotonic()
        try:
            done = self._command_all(
                lambda c: ucall.cmd_write(pass_no, pattern, pct, s.seed, *parts[c], route=route, string=string),
                "write pass")
        except DirtyRingStuck as e:
            if check_dirty:
                self._check_dirty_cut_short(pass_no, pages, time.monotonic() - t, str(e))
            raise
        guest_s = time.monotonic() - t
        reported = sum(int(d.args[2], 16) for d in done)
        if reported != len(pages):
            raise GuestError(f"pass {pass_no}: guest wrote {reported} pages, host computed {len(pages)}")
        self._check_memory(pass_no, pages)
        if pass_no == 1:
            self.pass1_regions = {key: int(np.unique(pages // (size >> 12)).size) for key, size in HUGE_SIZES}
        if check_dirty:
            self._check_dirty(pass_no, pages, guest_s)

    def _check_memory(self, pass_no: int, pages: np.ndarray) -> None:
        """The guest's writes must be in host memory at the right place: a split
        that maps the wrong host page shows up here, not in the dirty log."""
        q = self.memory.qwords()
        got = q[pages.astype(np.int64) * 512]
        bad = np.flatnonzero(got != ucall.marker(pass_no, pages))
        if bad.size:
            self.memory_mismatch.append({"pass": pass_no, "pages": int(bad.size),
                                         "sample": [int(pages[i]) for i in bad[:8]]})
        del q, got

    def _harvest(self) -> tuple[np.ndarray, dict]:
        """The dirty set as KVM reports it (bool per test-region page), and
        mode-specific counters."""
        s = self.s
        got = np.zeros(s.npages, dtype=bool)
        info: dict = {}
        per_slot = s.slot_size >> 12
        if s.dirty_mode.ring:
            with self.in_kernel():
                entries = self.machine.harvest_rings()
            info["ring_entries"] = len(entries)
            info["ring_full_exits"] = self.machine.ring_full_exits
            for slot, off in entries:
                idx = (slot & 0xFFFF) - FIRST_TEST_SLOT
                if 0 <= idx < s.memslots and off < per_slot:
                    got[idx * per_slot + off] = True
                else:
                    info["foreign_entries"] = info.get("foreign_entries", 0) + 1
            info["duplicates"] = len(entries) - int(got.sum()) - info.get("foreign_entries", 0)
            return got, info
        for i, sl in enumerate(self.slots):
            bm = self._get_log(sl)
            got[i * per_slot:(i + 1) * per_slot] = _bits(bm, per_slot)
            if s.dirty_mode.manual:
                self._clear_log(sl, bm)
        return got, info

    def _get_log(self, sl) -> bytearray:
        bm = bytearray(((sl.npages + 63) // 64) * 8)
        with self.in_kernel():
            self.machine.vm.get_dirty_log(sl.slot, bm)
        return bm

    def _clear_log(self, sl, bm: bytearray) -> int:
        """KVM_CLEAR_DIRTY_LOG over the slot in clear_chunk pieces; returns calls made."""
        chunk = self.s.clear_chunk >> 12
        calls = 0
        for first in range(0, sl.npages, chunk):
            n = min(chunk, sl.npages - first)
            part = bytearray(bm[first // 8:(first + n + 7) // 8])
            with self.in_kernel():
                self.machine.vm.clear_dirty_log(sl.slot, first, n, part)
            calls += 1
        return calls

    def _check_dirty(self, pass_no: int, pages: np.ndarray, guest_s: float) -> None:
        t = time.monotonic()
        got, info = self._harvest()
        harvest_s = time.monotonic() - t
        want = np.zeros(self.s.npages, dtype=bool)
        want[pages.astype(np.int64)] = True
        missing = np.flatnonzero(want & ~got)
        extra = np.flatnonzero(got & ~want)
        self.dirty_passes.append({
            "pass": pass_no, "written": int(want.sum()), "harvested": int(got.sum()),
            "missing": int(missing.size), "extra": int(extra.size),
            "missing_sample": [int(x) for x in missing[:8]],
            "extra_sample": [int(x) for x in extra[:8]],
            "guest_s": round(guest_s, 6), "harvest_s": round(harvest_s, 6), **info})

    def _check_dirty_cut_short(self, pass_no: int, pages: np.ndarray, guest_s: float, why: str) -> None:
        """A pass KVM stopped halfway (a stuck dirty ring): what the guest wrote so
        far starts with this pass's marker (or a string pass's fill); each of those
        pages must have been reported, and no page outside the pass's selection may be."""
        self.machine.stop()
        q0 = self.memory.qwords()[pages.astype(np.int64) * 512]
        written = pages[(q0 == ucall.marker(pass_no, pages)) | (q0 == np.uint64(ucall.string_fill(pass_no)))]
        del q0
        got, info = self._harvest()
        want = np.zeros(self.s.npages, dtype=bool)
        want[written.astype(np.int64)] = True
        selected = np.zeros(self.s.npages, dtype=bool)
        selected[pages.astype(np.int64)] = True
        missing, extra = np.flatnonzero(want & ~got), np.flatnonzero(got & ~selected)
        self.dirty_passes.append({
            "pass": pass_no, "written": int(want.sum()), "harvested": int(got.sum()),
            "missing": int(missing.size), "extra": int(extra.size),
            "missing_sample": [int(x) for x in missing[:8]], "extra_sample": [int(x) for x in extra[:8]],
            "guest_s": round(guest_s, 6), "harvest_s": 0.0, "ring_stuck": why,
            "selected": int(pages.size), **info})

    def _first_clear(self) -> None:
        """Manual protect: read the log once (all set with INITIALLY_SET, empty
        without) and clear it, which is where KVM write-protects (and, with
        INITIALLY_SET and eager splitting, splits)."""
        want_all = self.s.dirty_mode is DirtyMode.MANUAL_INIT_SET
        seen = wrong = calls = 0
        for sl in self.slots:
            bm = self._get_log(sl)
            bits = _bits(bm, sl.npages)
            seen += int(bits.sum())
            wrong += int((~bits).sum() if want_all else bits.sum())
            if want_all:
                calls += self._clear_log(sl, bm)
            else:
                # nothing is dirty yet: clear everything anyway, as a VMM's first
                # round does, so KVM write-protects through the clear path
                calls += self._clear_log(sl, bytearray(b"\xff" * len(bm)))
        self.initially_set = {"expected_all_set": want_all, "pages_set": seen,
                              "pages_wrong": wrong, "clear_calls": calls}

    def _verify(self) -> None:
        """The VM is alive and sees what the host sees: each vCPU's XOR over its
        partition equals the host's XOR over the same memory."""
        q = self.memory.qwords()[::512]
        done = self._command_all(lambda c: ucall.cmd_read(*self._partition(c)), "read pass")
        mismatch = []
        for c, d in enumerate(done):
            first, n = self._partition(c)
            host = int(np.bitwise_xor.reduce(q[first:first + n])) if n else 0
            guest = int(d.args[1], 16)
            if host != guest:
                mismatch.append({"cpu": c, "guest": hex(guest), "host": hex(host)})
        del q
        self.verify = {"vcpus": len(done), "mismatch": mismatch}


def _bits(bm: bytearray, n: int) -> np.ndarray:
    return np.unpackbits(np.frombuffer(bm, dtype=np.uint8), bitorder="little")[:n].astype(bool)


__all__ = ["ScenarioRun", "RunOptions", "TEST_GPA"]
