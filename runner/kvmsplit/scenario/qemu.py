"""Run one scenario under QEMU (`backend = "qemu"`): dirty logging driven the way
QEMU really drives it, judged with the same checks as the /dev/kvm backend.

Flows (`qemu_flow`):
  migrate         live migration to a second QEMU over a unix socket while the
                  guest writes; then the paused source's and the destination's
                  memory must be identical page by page, and hold the last marker
                  written (a lost dirty bit is "migration lost N pages")
  migrate-cancel  a migration cancelled half-way: logging off, huge mappings back
  dirty-rate      QMP calc-dirty-rate (dirty-bitmap or dirty-ring mode) while the
                  guest writes a known number of pages

Phases: boot, populate, enable, dirty-1..N, [switchover], disable, recovery,
verify. The page-size stats come from QMP query-stats; the tracepoint witness
follows QEMU's threads. QEMU does not expose the raw dirty bitmap, so the
dirty-log check says so, and the migration (or dirty-rate) check stands in.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

from kvmsplit.errors import BadInputError
from kvmsplit.host.changes import HostChanges
from kvmsplit.host.facts import HostFacts
from kvmsplit.kernellog import KernelLogGuard
from kvmsplit.lazy import lazy
from kvmsplit.runs.results import Check, CheckStatus, Phase, ScenarioResult, Verdict
from kvmsplit.scenario.engine import VCPU_STATS, VM_STATS, RunOptions
from kvmsplit.scenario.expectation import Expectation, expect
from kvmsplit.scenario.model import DirtyMode, Scenario, validate
from kvmsplit.scenario.observations import Observations
from kvmsplit.scenario.verdict import HUGE_SIZES, decide, judge, nothing_to_split
from kvmsplit.scenario.verdict import huge_mappings as _huge
from kvmsplit.scenario.witness import Witness
from kvmsplit.syscalls import logging_windows
from kvmsplit.tracing import TraceSession, TracingUnavailable
from kvmsplit.vmm.guest import ucall
from kvmsplit.vmm.machine import GuestError, GuestTimeout
from kvmsplit.vmm.memory import Backing
from kvmsplit.vmm.qemu import QMP_TIMEOUT, TEST_GPA, QemuError, QemuExited, QemuHung, QemuVm, Region, low_memory

if TYPE_CHECKING:
    import numpy as np
else:
    np = lazy("numpy")     # imported when first used: after the guest's first line

S = CheckStatus
RING_ENTRY = 16                 # bytes per struct kvm_dirty_gfn
POLL_S = 0.25                   # how often a wait looks at QEMU's run state
MIGRATE_BANDWIDTH_S = 1.5       # a round of a migration at full speed takes about this long
TRICKLE = 1 << 20               # bytes/s: the migration's pace until the first write pass is done
CALC_TIME_S = 2                 # calc-dirty-rate's window
RESEND_S = 3.0                  # a pass in flight at the switch-over that has not finished by then is resent
MIN_SYNCS = 3                   # the guest writes until the migration has synced the log this often
MAX_MIGRATION_PASSES = 200


class VmDead(Exception):
    """QEMU stopped the VM because a KVM ioctl failed (KVM_BUG_ON: EIO)."""


def effective_mode(s: Scenario, facts: HostFacts) -> DirtyMode:
    """The dirty-log mode QEMU really uses: a ring where the scenario asks for one;
    otherwise QEMU turns on MANUAL_DIRTY_LOG_PROTECT2 with INITIALLY_SET wherever
    KVM offers it (kvm_init), so a bitmap scenario runs as manual-init-set there."""
    if s.dirty_mode.ring:
        return DirtyMode.RING
    return DirtyMode.MANUAL_INIT_SET if facts.cap("MANUAL_DIRTY_LOG_PROTECT2") else DirtyMode.BITMAP


def qemu_cpu(s: Scenario, facts: HostFacts) -> str:
    """A named CPU model: `-cpu host` asks KVM for MSRs some hosts (PVM) refuse."""
    cpu = "qemu64,-pni"
    if s.guest_page == "1g":
        cpu += ",+pdpe1gb"
    if s.is_nested:
        cpu += ",+svm,+npt"
    return cpu


class VmmTrace:
    """`kvmsplit trace --pid` attached to one QEMU (a separate process: ptrace waits must not
    reap the QEMU that pexpect owns here); its JSON is read once QEMU is gone."""

    ATTACH_S = 10.0

    def __init__(self, vm: QemuVm, workdir: Path):
        self.vm, self.path = vm, workdir / f"{vm.name}.trace.json"
        self.log = open(workdir / f"{vm.name}.trace.stderr", "wb")
        self.p = subprocess.Popen([sys.executable, "-m", "kvmsplit", "trace", "--pid", str(vm.pid), "-q",
                                   "-o", str(self.path)], stdout=subprocess.DEVNULL, stderr=self.log)
        self._wait_attached()

    def _wait_attached(self) -> None:
        deadline = time.monotonic() + self.ATTACH_S
        while time.monotonic() < deadline and self.p.poll() is None:
            with contextlib.suppress(OSError):
                status = Path(f"/proc/{self.vm.pid}/status").read_text()
                if any(line.split()[1:] != ["0"] for line in status.splitlines() if line.startswith("TracerPid:")):
                    return
            time.sleep(0.02)

    def finish(self) -> dict:
        """After QEMU quit: the tracer ends with it (or is told to detach), then its summary."""
        try:
            self.p.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.p.send_signal(signal.SIGTERM)          # detaches and writes what it has
            try:
                self.p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.p.kill()
                self.p.wait()
        self.log.close()
        try:
            doc = json.loads(self.path.read_text())
        except (OSError, ValueError):
            why = (self.path.parent / f"{self.vm.name}.trace.stderr").read_text(errors="replace").strip()
            return {"error": why.splitlines()[-1] if why else f"kvmsplit trace exited {self.p.returncode}"}
        return logging_windows(doc, TEST_GPA)


class QemuScenarioRun:
    def __init__(self, scenario: Scenario, facts: HostFacts, image: Path, host: HostChanges,
                 options: RunOptions | None = None, witness: Witness | None = None,
                 hooks: QemuHooks | None = None, vmm_trace: bool = False):
        self.s, self.facts, self.image, self.host = scenario, facts, Path(image), host
        self.opt = options or RunOptions()
        self.witness = witness
        self.hooks = hooks or QemuHooks()
        self.mode = effective_mode(scenario, facts)
        self.exp = expect(dataclasses.replace(scenario, dirty_mode=self.mode), facts, self.opt.expect)
        self.res = ScenarioResult(name=scenario.name, scenario=scenario.to_dict())
        self.res.expectation = self.exp.to_dict()
        self.res.extra["qemu"] = {"flow": scenario.qemu_flow, "dirty_mode": self.mode.value}
        self.workdir = Path(tempfile.mkdtemp(prefix="kvmsplit-qemu-"))
        self.src: QemuVm | None = None
        self.dst: QemuVm | None = None
        self.vm: QemuVm | None = None           # the one the guest runs in now
        self.trace: TraceSession | None = None
        self.trace_unavailable: str | None = None
        self.cur_phase = "setup"
        self.model = np.zeros(scenario.npages, dtype=np.uint64)     # first qword of each page
        self.pass_no = 0
        self.in_flight: int | None = None       # a write pass sent and not yet DONE
        self.pass1_regions: dict[str, int] = {}
        self.memory_mismatch: list[dict] = []
        self.verify: dict | None = None
        self.vm_bugged: str | None = None
        self.error: str | None = None
        self.not_testable: str | None = None
        self.migration: dict | None = None
        self.dirty_rate: dict | None = None
        self.hung = False
        self.vmm_trace = vmm_trace
        self.tracers: list[VmmTrace] = []
        self.phase_starts: dict[str, float] = {}
        self.phase_rename: dict[str, str] = {}      # a phase that ended otherwise than its name says
        self.skip_bad_command = 0                   # answers to a newline sent at the switch-over

    # -- entry point -------------------------------------------------------------------------
    def run(self) -> ScenarioResult:
        r = self.res
        r.started = time.time()
        t0 = time.monotonic()
        skip = self._prerequisites()
        if skip:
            r.verdict, r.reasons, r.duration_s = Verdict.SKIP, [skip], 0.0
            return r
        guard = KernelLogGuard(accept_user=self.opt.accept_user_log)
        guard.start()
        try:
            self._start_source()
            self._flow()
        except VmDead as e:
            self.vm_bugged = f"{e} (phase {self.cur_phase})"
        except QemuExited as e:
            if _bugged(e.stderr):
                self.vm_bugged = f"QEMU exited on a failed KVM ioctl in phase {self.cur_phase}: {_eio_line(e.stderr)}"
            else:
                self.error = f"QEMU died in phase {self.cur_phase}: {e}; stderr: {_last(e.stderr)}"
        except GuestTimeout as e:
            self.error = f"guest hung in phase {self.cur_phase}: {e}"
        except GuestError as e:
            why = ucall.svm_unavailable(e.line) if e.line is not None else None
            if why:
                self.not_testable = f"the guest cannot run an SVM L2 under QEMU here: {why}"
            else:
                self.error = f"guest failed in phase {self.cur_phase}: {e}"
        except QemuHung as e:
            self.error = f"QEMU hung in phase {self.cur_phase}: {e}; killed"
            self.hung = True
        except QemuError as e:
            self.error = f"QEMU refused a command in phase {self.cur_phase}: {e}"
        except BaseException:
            r.verdict, r.error_phase = Verdict.ERROR, self.cur_phase
            r.reasons = [f"interrupted in phase {self.cur_phase}"]
            raise
        finally:
            self._teardown()
            r.kernel_log = guard.stop().to_dict()
            r.duration_s = time.monotonic() - t0
        if self.not_testable:
            r.verdict, r.reasons = Verdict.SKIP, [self.not_testable]
            return r
        self._judge()
        return r

    def _prerequisites(self) -> str | None:
        s, f = self.s, self.facts
        if shutil.which("qemu-system-x86_64") is None:
            return "qemu-system-x86_64 is not installed (Debian: apt install qemu-system-x86)"
        if s.dirty_mode.ring and not f.cap("DIRTY_LOG_RING"):
            return "KVM lacks KVM_CAP_DIRTY_LOG_RING"
        if s.dirty_mode is DirtyMode.RING_ACQ_REL:
            return "QEMU 7.2 drives the dirty ring without ACQ_REL (use dirty_mode = \"ring\")"
        if s.guest_page == "1g" and not f.guest_features.get("pdpe1gb"):
            return "KVM does not offer 1G guest pages here (no PDPE1GB in KVM_GET_SUPPORTED_CPUID)"
        if s.is_nested and f.nested_svm():
            return f.nested_svm()
        if s.backing is Backing.THP and f.thp == "never":
            return "transparent hugepages are disabled on this host (THP=never)"
        if s.backing.hugetlb_kb:
            per_vm = s.size // s.backing.page_size
            vms = 2 if s.qemu_flow.startswith("migrate") else 1
            return self.host.ensure_hugepages(s.backing.hugetlb_kb, per_vm * vms)
        return None

    # -- QEMU processes -------------------------------------------------------------------------
    def _qemu(self, name: str, incoming: str | None = None) -> QemuVm:
        s = self.s
        ring = s.ring_size // RING_ENTRY if self.mode.ring else 0
        vm = QemuVm(self.image, self.workdir, Region(s.backing, s.size), name=name,
                    low_mem=low_memory(s.size, s.guest_page, s.l2_page if s.is_nested else None),
                    dirty_ring_entries=ring, cpu=qemu_cpu(s, self.facts), incoming=incoming,
                    qmp_timeout=min(QMP_TIMEOUT, self.opt.phase_timeout or QMP_TIMEOUT))
        vm.start()
        if self.vmm_trace:
            self.tracers.append(VmmTrace(vm, self.workdir))
        return vm

    def _start_source(self) -> None:
        self.src = self.vm = self._qemu("src")
        self._open_trace(self.src.pid)

    def _open_trace(self, pid: int) -> None:
        if self.witness is None or self.witness.fs is None:
            self.trace_unavailable = (self.witness.unavailable if self.witness else None) or "no trace witness"
            return
        try:
            self.trace = TraceSession(pid, root=self.witness.fs.root).open()
        except TracingUnavailable as e:
            self.trace_unavailable = e.reason

    def _close_trace(self) -> None:
        if self.trace is not None:
            try:
                self.trace.close()
            except TracingUnavailable as e:
                self.res.extra["trace_cleanup"] = e.reason
            self.trace = None

    def _teardown(self) -> None:
        if self.src is not None:
            self.res.console_tail = self.src.console[-20:]
        if self.dst is not None and self.dst.console:
            self.res.console_tail = [*self.res.console_tail[-10:], "-- destination --", *self.dst.console[-10:]]
        for q in (self.dst, self.src):
            if q is not None:
                stderr = q.stderr().strip()
                if stderr:
                    self.res.extra.setdefault("qemu_stderr", {})[q.name] = stderr.splitlines()[-10:]
                q.close() if self.hung else q.quit(timeout=5.0)
        if self.tracers:
            self.res.extra["vmm_trace"] = {t.vm.name: t.finish() for t in self.tracers}
            self.res.extra["phase_starts_monotonic_s"] = self.phase_starts
        self._close_trace()
        shutil.rmtree(self.workdir, ignore_errors=True)

    @property
    def cur(self) -> QemuVm:
        assert self.vm is not None, "QEMU is started in run()"
        return self.vm

    # -- phases ---------------------------------------------------------------------------------
    @contextmanager
    def phase(self, name: str):
        self.cur_phase = name
        if self.opt.on_phase:
            self.opt.on_phase(self.s.name, name)
        vm0 = self.cur
        self.phase_starts[name] = time.monotonic()
        before = vm0.vcpu_stats(VCPU_STATS)
        t = time.monotonic()
        yield
        dur = time.monotonic() - t
        vm = self.cur          # a migration may have moved the guest: then the counts are the destination's
        after = vm.vcpu_stats(VCPU_STATS)
        delta = {k: after[k] - before.get(k, 0) for k in after} if vm is vm0 else dict(after)
        trace = self.trace.take().to_dict() if self.trace is not None and vm is self.src else None
        name = self.phase_rename.pop(name, name)
        self.res.phases.append(Phase(name, dur, 0.0, vm.vm_stats(VM_STATS), delta, trace))

    def _timeout(self) -> float:
        return self.opt.phase_timeout or self.s.timeout_for(self.cur_phase)

    def _flow(self) -> None:
        self._boot()
        with self.phase("populate"):
            self._write(0, "seq", 100)
        {"migrate": self._migrate, "migrate-cancel": self._migrate_cancel,
         "dirty-rate": self._dirty_rate}[self.s.qemu_flow]()
        with self.phase("verify"):
            self._verify()

    def _boot(self) -> None:
        s, vm = self.s, self.cur
        with self.phase("boot"):
            hello = self._expect("HELLO", "HELLO")
            if hello.ints()[0] != ucall.PROTO_VERSION:
                raise GuestError(f"guest speaks protocol {hello.args[0]}, host {ucall.PROTO_VERSION}")
            vm.send(ucall.cmd_map(TEST_GPA, s.size, ucall.PAGE_SHIFTS[s.guest_page]))
            self._expect("MAPPED", "MAPPED")
            self._expect("READY", "READY")
            if s.is_nested:
                vm.send(ucall.cmd_nested(ucall.PAGE_SHIFTS[s.l2_page]))
                self.res.extra["l1"] = self._expect("NESTED", "NESTED").text

    # -- the guest's passes ---------------------------------------------------------------------
    def _expect(self, kind: str, what: str, on_wait: Callable[[], None] | None = None) -> ucall.GuestLine:
        """A protocol line from whichever QEMU runs the guest now, watching QEMU's run state
        (a VM QEMU stopped on a failed KVM ioctl never answers) and calling on_wait between looks."""
        deadline = time.monotonic() + self._timeout()
        last_status = 0.0
        while time.monotonic() < deadline:
            try:
                return self.cur.expect(kind, POLL_S, what)
            except GuestTimeout:
                pass
            except GuestError as e:
                if not (self.skip_bad_command and e.line is not None and _bad_command(e.line)):
                    raise
                self.skip_bad_command -= 1
            if on_wait:
                on_wait()
            if time.monotonic() - last_status > 1.0:
                last_status = time.monotonic()
                self._check_running(self.cur)
        raise GuestTimeout(f"no {what} within {self._timeout():.0f}s")

    def _check_running(self, vm: QemuVm) -> None:
        st = vm.status()
        if st in ("internal-error", "guest-panicked", "shutdown"):
            stderr = vm.stderr()
            if _bugged(stderr):
                raise VmDead(f"QEMU stopped on a failed KVM ioctl: {_eio_line(stderr)}")
            raise GuestError(f"QEMU's VM is {st}: {_last(stderr)}")

    def _send_write(self, pass_no: int, pattern: str, pct: int) -> None:
        self.cur.send(ucall.cmd_write(pass_no, pattern, pct, self.s.seed, 0, self.s.npages))
        self.in_flight = pass_no

    def _finish_write(self, pattern: str, pct: int, on_wait: Callable[[], None] | None = None) -> None:
        pass_no = self.in_flight
        assert pass_no is not None
        done = self._expect("DONE", f"write pass {pass_no}", on_wait)
        pages = ucall.written_pages(pass_no, pattern, pct, self.s.seed, 0, self.s.npages)
        if done.args[:2] != ("W", f"{pass_no:x}") or int(done.args[2], 16) != len(pages):
            raise GuestError(f"pass {pass_no}: guest said {done.text!r}, host computed {len(pages)} pages")
        self.model[pages.astype(np.int64)] = ucall.marker(pass_no, pages)
        self.in_flight = None
        if pass_no == 1:
            self.pass1_regions = {key: int(np.unique(pages // (size >> 12)).size) for key, size in HUGE_SIZES}

    def _write(self, pass_no: int, pattern: str, pct: int, on_wait: Callable[[], None] | None = None) -> None:
        self._send_write(pass_no, pattern, pct)
        self._finish_write(pattern, pct, on_wait)

    def _recovery(self) -> None:
        with self.phase("recovery"):
            self._write(self.s.passes + 1, "seq", 100)

    def _verify(self) -> None:
        """The guest reads every page back: its XOR must be the host model's."""
        self.cur.send(ucall.cmd_read(0, self.s.npages))
        done = self._expect("DONE", "read pass")
        guest, host = int(done.args[1], 16), int(np.bitwise_xor.reduce(self.model))
        mism = [] if guest == host else [{"cpu": 0, "guest": hex(guest), "host": hex(host)}]
        self.verify = {"vcpus": 1, "mismatch": mism, "vm": self.cur.name}

    def _check_model(self, vm: QemuVm, label: str) -> np.ndarray:
        """Every page's first qword in `vm` against the last marker written: the page numbers that differ."""
        q = vm.pmemsave(TEST_GPA, self.s.size, self.workdir / f"{label}.mem")
        bad = np.flatnonzero(q[::512] != self.model)
        if bad.size:
            self.memory_mismatch.append({"pass": self.pass_no, "vm": label, "pages": int(bad.size),
                                         "sample": [int(x) for x in bad[:16]]})
        del q
        return bad

    # -- migrate ------------------------------------------------------------------------------
    def _start_migration(self) -> None:
        sock = self.workdir / "migrate.sock"
        self.dst = self._qemu("dst", incoming=f"unix:{sock}")
        src = self.cur
        src.cmd("migrate-set-capabilities", capabilities=[
            {"capability": "auto-converge", "state": True},
            {"capability": "pause-before-switchover", "state": True}])
        # a trickle until the first write pass is done, so that pass runs under the source's dirty
        # logging however slow the guest is (a traced QEMU is several times slower); then full speed
        src.cmd("migrate-set-parameters", **{"max-bandwidth": TRICKLE, "downtime-limit": 300})
        src.cmd("migrate", uri=f"unix:{sock}")
        self._wait_migration(("active", "pre-switchover", "device", "completed"), "the migration to start")

    def _full_speed(self) -> None:
        """The rest of the migration at a pace the guest's writing can keep up with for a while."""
        bw = max(int((self.s.size + 32 * (1 << 20)) / MIGRATE_BANDWIDTH_S), 16 << 20)
        self.cur.cmd("migrate-set-parameters", **{"max-bandwidth": bw})

    def _migration_status(self) -> dict:
        assert self.src is not None
        return self.src.cmd("query-migrate")    # type: ignore[return-value]

    def _wait_migration(self, states: tuple[str, ...], what: str, on_wait: Callable[[], None] | None = None) -> dict:
        deadline = time.monotonic() + self._timeout()
        while time.monotonic() < deadline:
            st = self._migration_status()
            if st.get("status") in states:
                return st
            if st.get("status") == "failed":
                raise QemuError(f"migration failed: {st.get('error-desc', st)}")
            if on_wait:
                on_wait()
            time.sleep(0.05)
        raise GuestTimeout(f"{what} did not happen within {self._timeout():.0f}s "
                           f"(migration {self._migration_status().get('status')})")

    def _migrate(self) -> None:
        with self.phase("enable"):
            self._start_migration()
        at_switchover = lambda: self._migration_status().get("status") == "pre-switchover"
        self._dirty_passes_until(at_switchover)
        with self.phase("switchover"):
            st = self._wait_migration(("pre-switchover",), "the switch-over")
            self.hooks.at_switchover(self)
            self.cur.cmd("migrate-continue", state="pre-switchover")
            st = self._wait_migration(("completed",), "the migration's completion")
            self.migration = _migration_summary(st)
        self._compare_source_and_destination()
        self._resume_on_destination()
        self._recovery()                # on the destination: logging ended with the source

    def _dirty_passes_until(self, switching: Callable[[], bool]) -> None:
        """dirty-1 is one pass (the split is judged on it); in dirty-2 the guest keeps writing,
        pass after pass, until the migration has synced the dirty log MIN_SYNCS times or reached
        its switch-over. A pass still running then finishes on the destination."""
        p = 1
        with self.phase("dirty-1"):
            if self._migrating_pass(p):
                # pass 1 did not finish on the source: it says nothing about the split there
                self.phase_rename["dirty-1"] = "dirty-1-cut-by-switchover"
                return
        self._full_speed()
        with self.phase("dirty-2"):
            while p < MAX_MIGRATION_PASSES and not switching():
                p += 1
                if self._migrating_pass(p):
                    break
                if p >= self.s.passes and self._migration_status().get("ram", {}).get(
                        "dirty-sync-count", 0) >= MIN_SYNCS:
                    break
            self.res.extra["qemu"]["passes_during_migration"] = p

    def _migrating_pass(self, p: int) -> bool:
        """One write pass during the migration; True if the switch-over came first."""
        self._send_write(p, self.s.pattern, self.s.percent)
        self.pass_no = p
        try:
            self._finish_write(self.s.pattern, self.s.percent, on_wait=self._stop_if_switching)
        except _Switching:
            return True
        return False

    def _stop_if_switching(self) -> None:
        if self._migration_status().get("status") in ("pre-switchover", "device", "completed"):
            raise _Switching()

    def _compare_source_and_destination(self) -> None:
        """The paused source and the not-yet-started destination must hold the same bytes,
        page by page: a page that differs was dirtied and never sent (a lost dirty bit)."""
        assert self.src is not None and self.dst is not None
        self.cur_phase = "compare"
        a = self.src.pmemsave(TEST_GPA, self.s.size, self.workdir / "src.mem").reshape(-1, 512)
        b = self.dst.pmemsave(TEST_GPA, self.s.size, self.workdir / "dst.mem").reshape(-1, 512)
        lost = np.flatnonzero((a != b).any(axis=1))
        del a, b
        assert self.migration is not None
        self.migration["lost_pages"] = int(lost.size)
        self.migration["lost_sample"] = [int(x) for x in lost[:32]]
        self.migration["compared_pages"] = self.s.npages

    def _resume_on_destination(self) -> None:
        assert self.src is not None and self.dst is not None
        partial = self.src.take_partial()
        self._close_trace()
        self.vm = self.dst
        self.dst.prepend(partial)
        if self.in_flight is None:
            self.migration["model_mismatch"] = int(self._check_model(self.dst, "dst").size)  # type: ignore[index]
        self.dst.cmd("cont")
        if self.in_flight is not None:
            with self.phase("dirty-on-destination"):
                self._finish_on_destination()
            self.migration["model_mismatch"] = int(self._check_model(self.dst, "dst").size)  # type: ignore[index]
        self.src.quit(timeout=5.0)

    def _finish_on_destination(self) -> None:
        """The pass in flight at the switch-over. Bytes of its command that QEMU had not yet put
        into the source's UART do not migrate (seen here: the guest got "W", the rest was lost).
        If the pass does not finish, a newline ends whatever part reached the guest: a guest that
        was waiting answers ERR bad command, and the pass is sent again; a guest that was still
        writing answers DONE first, and its ERR for the newline is skipped later."""
        assert self.in_flight is not None
        p = self.in_flight
        deadline = time.monotonic() + RESEND_S
        try:
            self._finish_write(self.s.pattern, self.s.percent, on_wait=lambda: _until(deadline))
            return
        except _Switching:
            pass
        self.cur.send("\n")
        try:
            self._finish_write(self.s.pattern, self.s.percent)
            self.skip_bad_command += 1
            return
        except GuestError as e:
            if e.line is None or not _bad_command(e.line):
                raise
            partial = e.line.text
        self.res.extra["qemu"]["resent_on_destination"] = {"pass": p, "guest_had": partial}
        self._send_write(p, self.s.pattern, self.s.percent)
        self._finish_write(self.s.pattern, self.s.percent)

    # -- migrate-cancel -------------------------------------------------------------------------
    def _migrate_cancel(self) -> None:
        """Cancelled half-way: after the first full round (every chunk of the log cleared once,
        which is where QEMU's manual-protect logging write-protects, and an eager kernel splits),
        while the guest goes on writing."""
        with self.phase("enable"):
            self._start_migration()
        with self.phase("dirty-1"):
            self._write(1, self.s.pattern, self.s.percent)
        self._full_speed()
        with self.phase("dirty-2"):
            p = 2
            while True:
                self._write(p, self.s.pattern, self.s.percent)
                st = self._migration_status()
                if p >= self.s.passes and (st.get("ram", {}).get("dirty-sync-count", 0) >= 2
                                           or st.get("status") != "active"):
                    break
                p += 1
            self.res.extra["qemu"]["passes_during_migration"] = p
        with self.phase("disable"):
            self.cur.cmd("migrate_cancel")
            self._wait_migration(("cancelled",), "the cancel")
            self.migration = {"cancelled": True, "status_before": st.get("status"),
                              "dirty_sync_count": st.get("ram", {}).get("dirty-sync-count")}
        assert self.dst is not None
        self.dst.quit(timeout=5.0)
        self._recovery()
        self._check_model(self.cur, "src")

    # -- calc-dirty-rate ------------------------------------------------------------------------
    def _dirty_rate(self) -> None:
        mode = "dirty-ring" if self.mode.ring else "dirty-bitmap"
        vm = self.cur
        with self.phase("enable"):
            vm.cmd("calc-dirty-rate", **{"calc-time": CALC_TIME_S, "mode": mode})
            self._wait_dirty_rate(("measuring", "measured"))
        t = time.monotonic()
        with self.phase("dirty-1"):
            self._write(1, self.s.pattern, self.s.percent)
        written = len(ucall.written_pages(1, self.s.pattern, self.s.percent, self.s.seed, 0, self.s.npages))
        with self.phase("disable"):
            st = self._wait_dirty_rate(("measured",))
        self.dirty_rate = {"mode": mode, "written_pages": written, "dirty_rate_mb_s": st.get("dirty-rate"),
                           "calc_time_s": st.get("calc-time"), "pass_s": round(time.monotonic() - t, 3),
                           "status": st.get("status")}
        self._recovery()
        self._check_model(vm, "vm")

    def _wait_dirty_rate(self, states: tuple[str, ...]) -> dict:
        deadline = time.monotonic() + self._timeout()
        while time.monotonic() < deadline:
            st: dict = self.cur.cmd("query-dirty-rate")    # type: ignore[assignment]
            if st.get("status") in states:
                return st
            time.sleep(0.05)
        raise GuestTimeout(f"calc-dirty-rate did not reach {'/'.join(states)} within {self._timeout():.0f}s")

    # -- verdict --------------------------------------------------------------------------------
    def observations(self) -> Observations:
        s = self.s
        return Observations(
            size=s.size, backing=s.backing.value, phases=tuple(self.res.phases), last_phase=self.cur_phase,
            memory_mismatch=tuple(self.memory_mismatch), verify=self.verify, vm_bugged=self.vm_bugged,
            error=self.error, pass1_regions=self.pass1_regions, kernel_log=self.res.kernel_log,
            trace_unavailable=self.trace_unavailable, nested=s.is_nested,
            memory_bytes=s.size + low_memory(s.size, s.guest_page, s.l2_page if s.is_nested else None))

    def _judge(self) -> None:
        obs = self.observations()
        base = judge(obs, self.exp)
        observed, split = qemu_split_check(obs, self.exp)
        checks = [split if c.name == "split" else self._standin(c) if c.name == "dirty-log" else c
                  for c in base.checks]
        if self.s.qemu_flow.startswith("migrate"):
            checks.insert(3, migration_check(self.migration, self.s.qemu_flow))
        j = decide(obs, checks, observed)
        r = self.res
        r.verdict, r.reasons, r.checks, r.observed_split = j.verdict, j.reasons, j.checks, j.observed_split
        if j.error_phase:
            r.error_phase = j.error_phase
        r.dirty = {"migration": self.migration, "dirty_rate": self.dirty_rate}

    def _standin(self, c: Check) -> Check:
        if self.s.qemu_flow == "dirty-rate":
            return dirty_rate_check(self.dirty_rate)
        return Check("dirty-log", S.NA, "QEMU does not expose the raw dirty bitmap: the migration check "
                     "(source and destination memory, page by page) stands in for it")


def as_qemu(s: Scenario, flow: str | None = None) -> Scenario:
    """The same scenario under QEMU (same name: `kvmsplit compare` puts the two side by side);
    BadInputError, one line, for what QEMU cannot run (several vCPUs or memslots, emulated writes)."""
    q = dataclasses.replace(s, backend="qemu", qemu_flow=flow or s.qemu_flow)
    try:
        validate(q)
    except ValueError as e:
        raise BadInputError(f"--backend qemu: scenario {s.name!r}: {e}") from None
    return q


def qemu_runnable(s: Scenario) -> bool:
    """What `--backend qemu -k ...` takes from the default suite."""
    try:
        as_qemu(s)
    except BadInputError:
        return False
    return True


def qemu_suite(base: list[Scenario]) -> list[Scenario]:
    """`kvmsplit run --backend qemu` without a selection: the default suite's one-vCPU,
    one-slot 2M scenarios that QEMU can drive, live-migrated, plus a cancelled
    migration and calc-dirty-rate in both modes."""
    by = {s.name: s for s in base}
    out = [as_qemu(by[n]) for n in ("thp/2m/bitmap", "hugetlb-2m/2m/bitmap", "hugetlb-2m/2m/ring",
                                     "anon/4k/bitmap") if n in by]
    for n, flow in (("thp/2m/bitmap", "migrate-cancel"), ("thp/2m/bitmap", "dirty-rate"),
                    ("hugetlb-2m/2m/ring", "dirty-rate")):
        if n in by:
            out.append(dataclasses.replace(as_qemu(by[n], flow), name=f"{n}/{flow}"))
    return out


class _Switching(Exception):
    """The migration reached its switch-over while a pass was running (or a wait ran out)."""


def _bad_command(line: ucall.GuestLine) -> bool:
    return line.kind == "ERR" and line.args[:2] == ("bad", "command:")


def _until(deadline: float) -> None:
    if time.monotonic() > deadline:
        raise _Switching()


class QemuHooks:
    """Where a test reaches into a QEMU scenario: at the switch-over pause, the source is
    stopped and everything but the last dirty set has been sent."""

    def at_switchover(self, run: QemuScenarioRun) -> None:
        pass


# -- the QEMU-specific checks ----------------------------------------------------------------------
def _splits(obs: Observations, phases: tuple[str, ...]) -> int | None:
    traces = [obs.trace(p) for p in phases if obs.stats(p) is not None]
    if obs.trace_unavailable or not traces or any(t is None for t in traces):
        return None
    return sum(int(v) for t in traces for v in (t or {}).get("splits_by_level", {}).values())


# phases in which QEMU had dirty logging on for the test region (the split window)
WINDOW_END = ("disable", "recovery", "compare", "dirty-on-destination", "verify")


def _window(obs: Observations) -> list[str]:
    """enable and the phases after it while logging was on: under QEMU's manual-protect logging
    the split comes whenever QEMU first clears the region's chunk, not at a phase of our choosing."""
    names = [p.name for p in obs.phases]
    if "enable" not in names:
        return []
    out = []
    for n in names[names.index("enable"):]:
        if n in WINDOW_END:
            break
        out.append(n)
    return out


def qemu_split_check(obs: Observations, exp: Expectation) -> tuple[str | None, Check]:
    """Eager or lazy under QEMU, over the whole logging window (QEMU clears the log lazily, as it
    sends): the stats say whether the huge mappings went, the tracepoints whether KVM split them
    (eager) or write faults dismantled them (lazy)."""
    window = _window(obs)
    populate = obs.stats("populate")
    enable = obs.stats("enable")
    end = obs.stats(window[-1]) if len(window) > 1 else None
    details: dict[str, object] = {"expected": exp.to_dict(), "populate": populate, "enable": enable,
                                  "window": window, "window_end": end}
    early = nothing_to_split(populate, exp, details)
    if early is not None:
        return early
    huge0 = _huge(populate)
    if enable is None or end is None:
        return None, Check("split", S.SKIP, "no dirty pass completed under logging", details)
    splits = _splits(obs, tuple(window))
    details["trace_splits"] = splits
    if _huge(enable) == 0:
        observed = "eager"
    elif _huge(end) >= huge0:
        return "none", Check("split", S.FAIL, f"huge mappings survived the guest's writes under dirty logging "
                             f"({_huge(end)} of {huge0} after {window[-1]}): writes to them are not tracked",
                             details)
    elif splits is None:
        return None, Check("split", S.UNCHECKED, f"huge mappings went ({huge0} -> {_huge(end)}) but without "
                           "tracepoints eager cannot be told from lazy under QEMU", details)
    elif 0 < splits < huge0 - _huge(end):
        return "eager-incomplete", Check("split", S.FAIL, f"eager split incomplete: KVM split {splits} of "
                                         f"{huge0 - _huge(end)} huge mappings, write faults took the rest", details)
    else:
        observed = "eager" if splits else "lazy"
    if observed == exp.split:
        how = (f"eager: {splits if splits is not None else 'all'} huge mappings split by KVM"
               if observed == "eager" else f"lazy: kept at enable ({huge0} huge), dismantled by write "
               f"faults ({_huge(end)} left after {window[-1]}), no split events")
        return observed, Check("split", S.PASS, f"{how}; expected {exp.split}: {exp.reason}", details)
    return observed, Check("split", S.FAIL, f"split was {observed}, expected {exp.split} ({exp.reason})", details)


def migration_check(m: dict | None, flow: str) -> Check:
    if flow == "migrate-cancel":
        if not m:
            return Check("migration", S.SKIP, "the migration was not cancelled")
        return Check("migration", S.PASS, "cancelled half-way; the source kept running", m)
    if not m or "lost_pages" not in m:
        return Check("migration", S.SKIP, "the migration did not complete", m or {})
    if m["lost_pages"]:
        return Check("migration", S.FAIL, f"migration lost {m['lost_pages']} pages: the destination differs "
                     f"from the paused source at pages {m['lost_sample'][:8]}", m)
    if m.get("model_mismatch"):
        return Check("migration", S.FAIL, f"the destination lacks the last write in {m['model_mismatch']} "
                     "pages", m)
    return Check("migration", S.PASS, f"source and destination identical over {m['compared_pages']} pages "
                 f"after {m.get('iterations', '?')} rounds ({m.get('dirty_sync_count', '?')} dirty syncs); "
                 "every page holds its last marker", m)


def dirty_rate_check(d: dict | None) -> Check:
    """QEMU's measured rate must account for every page the guest wrote in the window."""
    if not d or d.get("dirty_rate_mb_s") is None:
        return Check("dirty-log", S.SKIP, "calc-dirty-rate did not measure", d or {})
    written_mib = d["written_pages"] * 4096 / (1 << 20)
    seen_mib = d["dirty_rate_mb_s"] * d["calc_time_s"]
    # QEMU truncates the rate to whole MB/s: allow that, and a little of the guest's own stack
    low, high = written_mib - d["calc_time_s"], written_mib + d["calc_time_s"] + 2
    details = {**d, "written_mib": round(written_mib, 2), "measured_mib": seen_mib}
    if seen_mib < low:
        return Check("dirty-log", S.FAIL, f"calc-dirty-rate ({d['mode']}) saw {seen_mib} MiB dirtied, the guest "
                     f"wrote {written_mib:.1f} MiB: dirty pages missing", details)
    if seen_mib > high:
        return Check("dirty-log", S.FAIL, f"calc-dirty-rate ({d['mode']}) saw {seen_mib} MiB dirtied, more than "
                     f"the {written_mib:.1f} MiB the guest wrote", details)
    return Check("dirty-log", S.PASS, f"calc-dirty-rate ({d['mode']}): {d['dirty_rate_mb_s']} MB/s over "
                 f"{d['calc_time_s']} s = the {written_mib:.1f} MiB the guest wrote", details)


def _migration_summary(st: dict) -> dict:
    ram = st.get("ram", {})
    return {"status": st.get("status"), "total_time_ms": st.get("total-time"),
            "downtime_ms": st.get("downtime"), "transferred": ram.get("transferred"),
            "dirty_sync_count": ram.get("dirty-sync-count"), "iterations": ram.get("dirty-sync-count"),
            "cpu_throttle_percentage": st.get("cpu-throttle-percentage", 0)}


EIO_WORDS = ("kvm run failed", "input/output error", "errno=-5", "failed with -5")


def _bugged(stderr: str) -> bool:
    """QEMU's words for a KVM ioctl that returned EIO (KVM_RUN, KVM_CLEAR_DIRTY_LOG, ...)."""
    s = stderr.lower()
    return any(w in s for w in EIO_WORDS)


def _eio_line(stderr: str) -> str:
    lines = [x for x in stderr.splitlines() if any(w in x.lower() for w in EIO_WORDS)]
    return lines[0].strip() if lines else _last(stderr)


def _last(stderr: str) -> str:
    lines = [x for x in stderr.strip().splitlines() if x.strip()]
    return lines[-1] if lines else "(no stderr)"


__all__ = ["QemuScenarioRun", "qemu_suite", "as_qemu", "qemu_runnable", "QemuHooks", "effective_mode",
           "qemu_split_check", "migration_check", "dirty_rate_check", "VmDead"]
