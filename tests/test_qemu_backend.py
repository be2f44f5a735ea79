"""The QEMU backend, for real: qemu-system-x86_64 -accel kvm on this host's
/dev/kvm, QMP through qemu.qmp, live migration over a unix socket.

The migration check is shown failing on a real lost write: the test writes
guest pages through a shared mapping of the source's memory backend at the
switch-over pause, after those pages were sent. KVM never sees such a write,
so its dirty log cannot carry it, and the check must name exactly those pages.
"""
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import build_kernel, kvmsplit_vm
from kvmsplit.runs.results import ERROR, FAIL, PASS
from kvmsplit.scenario.engine import RunOptions
from kvmsplit.scenario.model import DirtyMode, Scenario
from kvmsplit.scenario.qemu import QemuHooks, QemuScenarioRun, dirty_rate_check, migration_check
from kvmsplit.vmm.guest import ucall
from kvmsplit.vmm.memory import Backing
from kvmsplit.vmm.qemu import qemu_processes

pytestmark = pytest.mark.kvm
MB = 1 << 20


@pytest.fixture(autouse=True)
def no_qemu_survives(monkeypatch, request):
    """No QEMU process outlives a test. Each test marks the QEMUs it starts (an environment
    variable they inherit, also through `kvmsplit` subprocesses), and counts those after it;
    QEMUs of other runs on the box are never touched."""
    marker = f"KVMSPLIT_TEST_QEMU={os.getpid()}-{request.node.name}"
    monkeypatch.setenv(*marker.split("=", 1))
    yield marker
    left = qemu_processes(marker)
    for pid in left:
        os.kill(pid, signal.SIGKILL)
    assert not left, f"QEMU processes left running: {sorted(left)}"


@pytest.fixture
def run_qemu(facts, guest_image, host_changes, witness):
    def run(s: Scenario, hooks=None, **opts):
        return QemuScenarioRun(s, facts, guest_image, host_changes, RunOptions(**opts), witness, hooks).run()
    return run


def qemu_scenario(name, **kw) -> Scenario:
    kw.setdefault("size", 64 * MB)
    return Scenario(name, backend="qemu", **kw)


def statuses(res) -> dict:
    return {c.name: c.status.value for c in res.checks}


@pytest.mark.parametrize("backing,mode", [(Backing.THP, DirtyMode.BITMAP), (Backing.HUGETLB_2M, DirtyMode.BITMAP),
                                          (Backing.HUGETLB_2M, DirtyMode.RING)],
                         ids=["thp-bitmap", "hugetlb-2m-bitmap", "hugetlb-2m-ring"])
def test_live_migration_keeps_every_page(run_qemu, facts, backing, mode):
    from kvmsplit.scenario.expectation import expect
    from kvmsplit.scenario.qemu import effective_mode
    s = qemu_scenario(f"{backing.value}/2m/{mode.value}", backing=backing, dirty_mode=mode, ring_size=16384,
                      pattern="random", percent=40, seed=3)
    res = run_qemu(s)
    assert res.verdict == PASS, res.reasons
    m = res.dirty["migration"]
    assert m["status"] == "completed" and m["lost_pages"] == 0 and m["model_mismatch"] == 0
    assert m["compared_pages"] == s.npages and m["dirty_sync_count"] >= 2
    assert res.extra["qemu"]["passes_during_migration"] >= 2      # the guest wrote through the migration
    want = expect(Scenario("x", backing=backing, dirty_mode=effective_mode(s, facts)), facts).split
    assert res.observed_split == want
    for name in ("huge-before", "split", "migration", "memory", "recovery", "kernel-log", "alive", "witness"):
        assert res.check(name).status == "pass", (name, res.check(name).summary)
    assert res.check("dirty-log").status == "n/a" and "does not expose" in res.check("dirty-log").summary
    # the stats came from QMP query-stats, phase by phase, the huge pages first from the source ...
    assert res.phase("populate").vm_stats["pages_2m"] == s.size // (2 * MB)
    # ... and at the end from the destination, huge again
    assert res.phase("recovery").vm_stats["pages_2m"] == s.size // (2 * MB)


class LoseWrites(QemuHooks):
    """At the switch-over pause, write into source pages the guest has not dirtied since the
    first round sent them, behind KVM's back (a shared mapping of the memfd backend)."""

    def __init__(self, n: int):
        self.n = n
        self.pages: list[int] = []

    def at_switchover(self, run):
        s = run.s
        dirtied = set()
        for p in range(1, run.pass_no + 1):
            dirtied |= set(ucall.written_pages(p, s.pattern, s.percent, s.seed, 0, s.npages).tolist())
        clean = [p for p in range(s.npages) if p not in dirtied]
        self.pages = sorted(np.random.default_rng(5).choice(clean, self.n, replace=False).tolist())
        mem = run.src.map_region()
        try:
            for p in self.pages:
                mem[p * 4096 + 8:p * 4096 + 16] = (0xBAD0000000000000 | p).to_bytes(8, "little")
        finally:
            mem.close()


@pytest.mark.parametrize("mode", [DirtyMode.BITMAP, DirtyMode.RING], ids=lambda m: m.value)
def test_a_write_the_dirty_log_never_saw_is_reported_page_by_page(run_qemu, mode):
    hook = LoseWrites(7)
    s = qemu_scenario(f"hugetlb-2m/2m/{mode.value}/lost", backing=Backing.HUGETLB_2M, dirty_mode=mode,
                      ring_size=16384, pattern="random", percent=20, seed=9)
    res = run_qemu(s, hook)
    assert res.verdict == FAIL
    m = res.dirty["migration"]
    assert m["lost_pages"] == 7 and m["lost_sample"] == hook.pages
    assert res.check("migration").summary.startswith("migration lost 7 pages")
    assert f"{hook.pages[:8]}" in res.check("migration").summary
    # the guest's own markers (qword 0) were not touched: everything else still passes
    assert [n for n, st in statuses(res).items() if st == "fail"] == ["migration"]


def test_a_cancelled_migration_turns_logging_off_and_huge_pages_come_back(run_qemu):
    res = run_qemu(qemu_scenario("thp/2m/cancel", qemu_flow="migrate-cancel"))
    assert res.verdict == PASS, res.reasons
    assert res.check("migration").summary.startswith("cancelled half-way")
    n = 64 * MB // (2 * MB)
    assert res.phase("dirty-1").vm_stats["pages_2m"] < n           # split while logging was on
    assert res.phase("recovery").vm_stats["pages_2m"] == n         # and back once it was off
    assert res.check("recovery").status == "pass"


@pytest.mark.parametrize("mode", [DirtyMode.BITMAP, DirtyMode.RING], ids=["dirty-bitmap", "dirty-ring"])
def test_calc_dirty_rate_accounts_for_every_page_written(run_qemu, mode):
    res = run_qemu(qemu_scenario(f"thp/2m/{mode.value}/rate", qemu_flow="dirty-rate", dirty_mode=mode,
                                 ring_size=65536))
    assert res.verdict == PASS, res.reasons
    d = res.dirty["dirty_rate"]
    assert d["mode"] == ("dirty-ring" if mode.ring else "dirty-bitmap")
    assert d["written_pages"] == 64 * MB // 4096
    assert d["dirty_rate_mb_s"] * d["calc_time_s"] >= 63
    assert res.check("dirty-log").summary.startswith("calc-dirty-rate")


def test_dirty_rate_check_fails_on_missing_and_extra_pages():
    """The measured rate against what the guest wrote: the same record with fewer (or more)
    MiB measured than written must fail (a real lost bit can't be had on demand here)."""
    d = {"mode": "dirty-bitmap", "written_pages": 16384, "dirty_rate_mb_s": 32, "calc_time_s": 2}
    assert dirty_rate_check(d).status == "pass"
    assert dirty_rate_check({**d, "dirty_rate_mb_s": 20}).status == "fail"
    assert dirty_rate_check({**d, "dirty_rate_mb_s": 60}).status == "fail"
    assert migration_check({"lost_pages": 0, "lost_sample": [], "compared_pages": 5,
                            "model_mismatch": 2}, "migrate").status == "fail"


def test_qemu_killed_mid_scenario_is_an_error_with_the_console(run_qemu, no_qemu_survives):
    victims = []

    def kill_on(name, phase):
        if phase == "dirty-2":
            victims.extend(qemu_processes(no_qemu_survives))
            for pid in victims:
                os.kill(pid, signal.SIGKILL)
    res = run_qemu(qemu_scenario("thp/2m/killed", passes=3), on_phase=kill_on)
    assert victims
    assert res.verdict == ERROR and res.error_phase == "dirty-2"
    assert "QEMU died in phase dirty-2" in res.reasons[0] or "QEMU" in res.reasons[0], res.reasons
    assert any("READY" in line for line in res.console_tail)


def test_a_hung_qemu_is_killed_within_the_timeout(run_qemu, no_qemu_survives):
    stopped = []

    def stop_on(name, phase):
        if phase == "dirty-1":
            stopped.extend(qemu_processes(no_qemu_survives))
            for pid in stopped:
                os.kill(pid, signal.SIGSTOP)
    # the phase timeout also bounds QMP waits; boot (SeaBIOS under PVM) takes ~4 s, more on a busy box
    res = run_qemu(qemu_scenario("thp/2m/hung"), on_phase=stop_on, phase_timeout=20)
    assert stopped
    assert res.verdict == ERROR and "hung in phase dirty-1" in res.reasons[0], res.reasons
    assert "no answer to" in res.reasons[0]


def test_run_backend_qemu_from_the_command_line(tmp_path):
    """`kvmsplit run --backend qemu -k NAME`: the default suite's scenario, same name, under QEMU."""
    out = tmp_path / "out"
    r = subprocess.run([sys.executable, "-m", "kvmsplit", "run", "--backend", "qemu", "-k", "[h]ugetlb-2m/2m/ring",
                        "-k", "[a]non/4k/bitmap", "--output", str(out)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    rr = json.loads((out / "results.json").read_text())
    names = {s["name"]: s for s in rr["scenarios"]}
    assert set(names) == {"hugetlb-2m/2m/ring", "anon/4k/bitmap"}
    for s in names.values():
        assert s["scenario"]["backend"] == "qemu" and s["verdict"] == "PASS", s["reasons"]
    assert names["anon/4k/bitmap"]["observed_split"] == "none"


def test_bad_backend_is_one_line(tmp_path):
    f = tmp_path / "s.toml"
    f.write_text('[[scenario]]\nname = "x"\nbackend = "xen"\n')
    r = subprocess.run([sys.executable, "-m", "kvmsplit", "run", "--scenario", str(f)], capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 65 and r.stderr.count("\n") == 1 and "backend: unknown value 'xen'" in r.stderr
    f.write_text('[[scenario]]\nname = "x"\nbackend = "qemu"\nvcpus = 2\n')
    r = subprocess.run([sys.executable, "-m", "kvmsplit", "run", "--scenario", str(f)], capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 65 and "the QEMU backend runs one vCPU" in r.stderr


def test_kvmsplit_trace_shows_the_logging_window_qemu_opened_and_closed(tmp_path):
    """`kvmsplit trace` on a QEMU run (QEMU is a grandchild: followed through the fork and exec):
    calc-dirty-rate turns logging on for the test DIMM's memslot once and off once."""
    f = tmp_path / "q.toml"
    f.write_text('[[scenario]]\nname = "rate"\nbackend = "qemu"\nqemu_flow = "dirty-rate"\nsize = "16M"\n'
                 'passes = 1\n')
    out = tmp_path / "trace.json"
    r = subprocess.run([sys.executable, "-m", "kvmsplit", "trace", "-o", str(out), "--", sys.executable, "-m",
                        "kvmsplit", "run", "--scenario", str(f), "-o", str(tmp_path / "run")],
                       capture_output=True, text=True, timeout=600)
    d = json.loads(out.read_text())
    rr = json.loads((tmp_path / "run" / "results.json").read_text())["scenarios"][0]
    assert r.returncode == 0 == d["exit_code"], (rr["verdict"], rr["reasons"])
    test_slots = [m for m in d["summary"]["memslots"]
                  if m["guest_phys_addr"] == 1 << 32 and m["memory_size"] == 16 * MB]
    windows = [w for m in test_slots for w in m["dirty_log_windows"]]
    assert len(windows) == 1 and windows[0]["ended_by"] == "flags", test_slots
    w = windows[0]
    # the window spans the measurement: at least calc-dirty-rate's calc-time
    assert w["duration_ms"] >= 1000 * rr["dirty"]["dirty_rate"]["calc_time_s"] * 0.9


def test_the_same_scenario_on_both_backends_side_by_side(tmp_path):
    """A/B: one scenario file run on kvmsplit's VMM and on QEMU; `compare` and the HTML
    report (`--against`) put the two side by side by name."""
    f = tmp_path / "ab.toml"
    f.write_text('[[scenario]]\nname = "ab/thp"\nsize = "32M"\n')
    db = tmp_path / "h.sqlite"

    def kvmsplit(*args):
        r = subprocess.run([sys.executable, "-m", "kvmsplit", *map(str, args)], capture_output=True, text=True,
                           timeout=300)
        assert r.returncode == 0, r.stderr[-2000:]
        return r.stdout
    kvmsplit("run", "--scenario", f, "-o", tmp_path / "a", "--db", db)
    kvmsplit("run", "--scenario", f, "--backend", "qemu", "-o", tmp_path / "b", "--db", db)
    out = kvmsplit("compare", tmp_path / "a" / "results.json", tmp_path / "b" / "results.json", "--db", db)
    assert "the same scenarios on two VMMs (A kvm, B qemu)" in out
    line = next(x for x in out.splitlines() if x.startswith("  ab/thp: "))
    assert line.startswith("  ab/thp: PASS/PASS, split lazy/lazy; boot ") or "eager" in line
    kvmsplit("report", tmp_path / "b" / "results.json", "--against", tmp_path / "a" / "results.json",
             "-o", tmp_path / "r.html", "--db", db)
    html = (tmp_path / "r.html").read_text()
    assert "<h2>A/B: the same scenarios on two VMMs" in html and '<span class="tag">qemu</span>' in html
    assert html.count("<td>ab/thp</td>") == 1


def test_trace_attached_to_qemu_puts_its_logging_window_on_the_timeline(tmp_path):
    """`kvmsplit run --trace`: each QEMU is followed by `kvmsplit trace --pid`; the window QEMU
    opened on the test DIMM lies where the scenario's phases say (both CLOCK_MONOTONIC)."""
    f = tmp_path / "q.toml"
    f.write_text('[[scenario]]\nname = "traced"\nbackend = "qemu"\nqemu_flow = "dirty-rate"\nsize = "16M"\n')
    r = subprocess.run([sys.executable, "-m", "kvmsplit", "run", "--scenario", str(f), "--trace",
                        "-o", str(tmp_path / "out")], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    s = json.loads((tmp_path / "out" / "results.json").read_text())["scenarios"][0]
    tr, starts = s["extra"]["vmm_trace"]["src"], s["extra"]["phase_starts_monotonic_s"]
    (w,) = tr["windows"]
    on = tr["t0_monotonic_s"] + w["enabled_ms"] / 1000
    off = tr["t0_monotonic_s"] + w["disabled_ms"] / 1000
    assert starts["enable"] <= on <= starts["dirty-1"], (on, starts)        # calc-dirty-rate turned it on
    assert starts["dirty-1"] <= off <= starts["recovery"], (off, starts)    # and off when it had measured
    assert w["ended_by"] == "flags" and tr["counts"]["KVM_CLEAR_DIRTY_LOG"] + tr["counts"]["KVM_GET_DIRTY_LOG"] > 0
    subprocess.run([sys.executable, "-m", "kvmsplit", "report", str(tmp_path / "out" / "results.json"), "-o",
                    str(tmp_path / "r.html")], check=True, capture_output=True, timeout=60)
    assert '<svg class="timeline"' in (tmp_path / "r.html").read_text()


def test_selftests_run_trace_records_the_tests_logging_window(tmp_path):
    """`kvmsplit selftests run --trace`: the selftest runs under ptrace, its result is unchanged,
    and its dirty-logging window is in the results."""
    r = subprocess.run([sys.executable, "-m", "kvmsplit", "selftests", "run", "-k",
                        "dirty_log_perf_test/-s anonymous -v 1 -g", "--trace", "-o", str(tmp_path / "out")],
                       capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-2000:]
    s = json.loads((tmp_path / "out" / "results.json").read_text())["scenarios"][0]
    assert s["verdict"] == "PASS" and s["extra"]["exit_code"] == 0
    tr = s["extra"]["vmm_trace"]["kselftest"]
    assert tr["exit_code"] == 0 and tr["counts"]["KVM_RUN"] > 0
    (w,) = tr["windows"]          # dirty_log_perf_test -g: logging on once, off once, on its test slot
    assert w["ended_by"] == "flags" and w["duration_ms"] > 0 and w["size"] >= 1 << 20


def _obs(populate, enable, d1, splits, trace=True):
    from kvmsplit.runs.results import Phase
    from kvmsplit.scenario.observations import Observations
    tr = (lambda n: {"splits_by_level": {"2": n}}) if trace else (lambda n: None)
    phases = (Phase("populate", 1, 0, {"pages_2m": populate}), Phase("enable", 1, 0, {"pages_2m": enable}, {}, tr(0)),
              Phase("dirty-1", 1, 0, {"pages_2m": d1}, {}, tr(splits)))
    return Observations(size=64 * MB, backing="thp", phases=phases, trace_unavailable=None if trace else "off")


@pytest.mark.parametrize("populate,enable,d1,splits,trace,want,observed", [
    (32, 32, 0, 0, True, "pass", "lazy"),                # kept at enable, faults took them, no split events
    (32, 32, 0, 32, True, "fail", "eager"),              # KVM split them all: eager, but lazy was expected
    (32, 32, 0, 16, True, "fail", "eager-incomplete"),   # KVM split half (planted 0002's shape)
    (32, 32, 32, 0, True, "fail", "none"),               # nothing split although the guest wrote
    (32, 32, 0, 0, False, "unchecked", None),            # no tracepoints: eager and lazy look alike
], ids=["lazy", "eager-unexpected", "eager-incomplete", "not-split", "no-trace"])
def test_qemu_split_check(populate, enable, d1, splits, trace, want, observed):
    from kvmsplit.scenario.expectation import Expectation
    from kvmsplit.scenario.qemu import qemu_split_check
    got, check = qemu_split_check(_obs(populate, enable, d1, splits, trace), Expectation("lazy", None, "test"))
    assert (check.status.value, got) == (want, observed), check.summary


IN_VM = Path(__file__).parent / "qemu_data" / "in-vm.toml"


@pytest.mark.slow
@pytest.mark.timeout(1800)      # QEMU under TCG inside the VM: past 600 s on a busy day
def test_qemu_on_a_tdp_mmu_host_splits_eagerly_and_keeps_every_page(kernel_612, tmp_path):
    """QEMU inside `kvmsplit vm` on the 6.12 build (TDP MMU, eager_page_split=Y): QEMU's
    manual-init-set logging splits eagerly, the tracepoints say KVM split, nothing is lost."""
    rc, res = kvmsplit_vm(kernel_612, "--scenario", IN_VM, out=tmp_path)
    by = {s["name"]: s for s in res["scenarios"]}
    for s in by.values():
        assert s["verdict"] == "PASS", (s["name"], s["reasons"], s.get("extra", {}).get("qemu_stderr"))
        assert s["observed_split"] == "eager" and s["expectation"]["split"] == "eager"
    assert by["qemu/thp/migrate"]["dirty"]["migration"]["lost_pages"] == 0
    assert rc == 0


@pytest.mark.slow
@pytest.mark.timeout(1800)      # a kernel build (cached: seconds) and QEMU under TCG inside the VM
def test_a_kvm_bug_on_under_qemu_is_vm_bugged_with_qemus_words(tmp_path):
    """Planted 0001 (KVM_BUG_ON in the TDP MMU's eager split): QEMU's KVM_CLEAR_DIRTY_LOG or
    KVM_RUN gets EIO. Whether QEMU exits or stops the VM, the scenario is "VM bugged" with
    QEMU's own line, and the first one names the kernel's WARNING."""
    image = build_kernel(Path(__file__).resolve().parents[1] / "kselftests" / "planted" /
                         "0001-kvm-bug-on-in-eager-split.patch")
    rc, res = kvmsplit_vm(image, "--scenario", IN_VM, out=tmp_path)
    assert rc == 1
    first, second = res["scenarios"]
    for s in (first, second):
        assert s["verdict"] == "FAIL" and s["reasons"][0].startswith("VM bugged (KVM_BUG_ON?): QEMU "), s["reasons"]
        assert "failed" in s["reasons"][0] and ("-5" in s["reasons"][0] or "Input/output" in s["reasons"][0])
        assert s["extra"]["qemu_stderr"]
    assert "kernel: WARNING in tdp_mmu_split_huge_page" in first["reasons"]
