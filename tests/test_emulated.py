"""Writes through KVM's instruction emulator (write_via), for real on this
host's /dev/kvm: where the host emulates guest CPL0 code (PVM) the dirty
passes run at CPL0, elsewhere behind the forced-emulation prefix, and with
neither the scenario SKIPs with the reason. The rings are KVM's smallest, so
ring-full exits come in the middle of emulated (rep-string) instructions.
"""
from dataclasses import replace

import pytest

from conftest import need
from kvmsplit.host.facts import HostFacts, ModuleParam
from kvmsplit.runs.results import FAIL, PASS, SKIP, Phase
from kvmsplit.scenario.expectation import Expectation, expect
from kvmsplit.scenario.model import DirtyMode, Scenario, WriteVia, default_suite, emulated_suite
from kvmsplit.scenario.observations import Observations
from kvmsplit.scenario.verdict import judge
from kvmsplit.vmm.guest import ucall
from kvmsplit.vmm.guest.ucall import WriteRoute
from kvmsplit.vmm.memory import Backing

MB = 1 << 20
NONE = Expectation("none", None, "4K anonymous backing")


def small(name, mode, via=WriteVia.EMULATED, **kw):
    return Scenario(name, backing=Backing.ANON, guest_page="4k", size=4 * MB, dirty_mode=mode, write_via=via,
                    **{"ring_size": 4096, **kw})


# -- where the emulator can be reached ------------------------------------------------------
def test_no_route_into_the_emulator_is_a_skip_with_the_reason(facts):
    """A host that is not PVM and has kvm.force_emulation_prefix off: the engine
    skips before booting anything, saying how to get a route."""
    plain = replace(facts, modules=(), params={**facts.params, "force_emulation_prefix": ModuleParam(0)})
    route, why = plain.emulation_route()
    assert route is None and "force_emulation_prefix" in why
    from kvmsplit.scenario.engine import ScenarioRun
    res = ScenarioRun(small("e/bitmap", DirtyMode.BITMAP), plain, None, None, None).run()
    assert res.verdict == SKIP
    assert "write_via emulated: no route into KVM's instruction emulator" in res.reasons[0]
    assert "kvm.force_emulation_prefix=1" in res.reasons[0]
    # the default suite leaves them out there (a scenario file still gets the SKIP above)
    assert not emulated_suite(plain) and not [s for s in default_suite(plain) if s.write_via.emulated]


def test_the_route_comes_from_the_host_facts():
    assert HostFacts(modules=("kvm_pvm",)).emulation_route()[0] is WriteRoute.CPL0
    fep = HostFacts().with_params(force_emulation_prefix=True)
    assert fep.emulation_route()[0] is WriteRoute.FEP
    assert HostFacts().emulation_route()[0] is None           # the parameter absent: an older kernel


def test_on_pvm_huge_mappings_are_kept_while_the_emulator_writes():
    pvm = HostFacts(modules=("kvm_pvm",), paging="shadow").with_params(tdp_mmu=False, eager_page_split=True)
    s = Scenario("e/thp", backing=Backing.THP, size=16 * MB, write_via=WriteVia.EMULATED)
    assert expect(s, pvm).split == "kept"
    assert expect(replace(s, write_via=WriteVia.NATIVE), pvm).split == "lazy"


def test_emulated_scenarios_refuse_what_cannot_be_emulated():
    from kvmsplit.errors import BadInputError
    with pytest.raises(BadInputError, match="nested"):
        Scenario.from_dict({"name": "x", "write_via": "emulated", "nested": "svm", "size": "64M"})
    with pytest.raises(BadInputError, match="unknown value 'cpl0'"):
        Scenario.from_dict({"name": "x", "write_via": "cpl0"})
    # native scenarios keep their dict (the history matches scenarios by it)
    assert "write_via" not in Scenario("n").to_dict()
    assert Scenario("e", write_via=WriteVia.EMULATED_STRING).to_dict()["write_via"] == "emulated-string"


def test_a_native_write_line_is_the_one_every_guest_knows():
    assert ucall.cmd_write(1, "seq", 100, 1, 0, 8) == "W 1 0 64 1 0 8\n"
    assert ucall.cmd_write(1, "seq", 100, 1, 0, 8, route=WriteRoute.CPL0, string=True) == "W 1 0 64 1 0 8 5\n"


# -- the verdict ---------------------------------------------------------------------------
def stuck_run(taint_before=512, reports=()):
    log = {"checked": True, "reports": list(reports), "taint_before": taint_before, "taint_after": 512}
    stuck = {"pass": 1, "written": 5, "harvested": 2, "missing": 3, "extra": 0, "missing_sample": [1, 2, 4],
             "ring_stuck": "vcpu 0: dirty ring stuck: 8 DIRTY_RING_FULL exits in a row with no entry"}
    return Observations(size=4 * MB, backing="anon", last_phase="dirty-1", dirty_passes=(stuck,),
                        phases=(Phase("populate", 0.1, vm_stats={"pages_4k": 1024}),
                                Phase("enable", 0.0, vm_stats={"pages_4k": 1024})),
                        kernel_log=log)


def test_a_stuck_ring_fails_with_the_pages_it_lost_and_says_a_set_w_taint_hides_the_warning():
    j = judge(stuck_run(), NONE)
    assert j.verdict == FAIL
    dirty = next(c for c in j.checks if c.name == "dirty-log")
    assert "dirty ring stuck in pass 1: 8 DIRTY_RING_FULL exits" in dirty.summary
    assert "3 of the 5 pages written before it were never reported dirty" in dirty.summary
    assert "taint W was already set before this scenario" in dirty.summary
    assert "WARN_ON_ONCE" in dirty.summary


def test_the_first_run_in_a_boot_names_the_warning_instead():
    j = judge(stuck_run(taint_before=0, reports=[{"title": "WARNING in kvm_dirty_ring_push"}]), NONE)
    assert j.verdict == FAIL
    assert "kernel report: WARNING in kvm_dirty_ring_push" in j.reasons
    assert not any("taint W was already set" in r for r in j.reasons)


# -- for real on this host -------------------------------------------------------------------
def _route_or_fail(facts):
    """The host's route into KVM's emulator (PVM here); elsewhere a skip, or a
    failure under KVMSPLIT_REQUIRE_KVM=1."""
    route, why = facts.emulation_route()
    need(route is not None, why)
    assert route is not None
    return route


@pytest.mark.parametrize("via", [WriteVia.EMULATED, WriteVia.EMULATED_STRING], ids=lambda v: v.value)
@pytest.mark.parametrize("mode", [DirtyMode.BITMAP, DirtyMode.MANUAL_INIT_SET], ids=lambda m: m.value)
def test_emulated_writes_are_logged_exactly_in_bitmap_modes(run_scenario, facts, mode, via):
    route = _route_or_fail(facts)
    res = run_scenario(small(f"e/{mode.value}", mode, via, pattern="random", percent=50, seed=17))
    assert res.verdict == PASS, res.reasons
    assert res.extra["write_route"]["route"] == route.name.lower()
    for p in res.dirty["passes"]:
        assert p["harvested"] == p["written"] > 400 and p["missing"] == p["extra"] == 0
    # the passes really went through the emulator: KVM counted an emulation per store at least, and
    # none of them was a write fault (a native pass here: one fault and ~0 emulations per page)
    for p, ph in zip(res.dirty["passes"], [ph for ph in res.phases if ph.name.startswith("dirty")]):
        assert ph.vcpu_delta["insn_emulation"] >= p["written"] > ph.vcpu_delta["pf_taken"], ph.vcpu_delta


def test_one_emulated_mov_per_page_through_the_smallest_ring_is_exact(run_scenario, facts):
    _route_or_fail(facts)
    res = run_scenario(small("e/ring", DirtyMode.RING, ring_size=facts.dirty_ring_min))
    assert res.verdict == PASS, res.reasons
    assert all(p["ring_full_exits"] > 0 and p["missing"] == 0 for p in res.dirty["passes"])


def test_rep_strings_through_the_smallest_ring(run_scenario, facts):
    """One rep stosq/movsq writes up to 4 pages, ~1500 emulated stores, each a
    ring entry: far past a 256-entry ring's reserve. This host's kernel
    (README, known kernel findings) overflows the ring: the vCPU is stuck
    DIRTY_RING_FULL for good and entries not yet harvested are overwritten.
    Either way the run ends promptly, never as a hang, and a failure names it."""
    _route_or_fail(facts)
    res = run_scenario(small("e-str/ring", DirtyMode.RING, WriteVia.EMULATED_STRING, pattern="random",
                             percent=50, seed=17, ring_size=facts.dirty_ring_min))
    assert res.duration_s < 30
    if res.verdict == PASS:
        return
    assert res.verdict == FAIL, res.reasons
    dirty = res.check("dirty-log")
    assert dirty.status == "fail" and "dirty ring stuck in pass 1" in dirty.summary
    p = res.dirty["passes"][0]
    assert p["ring_stuck"] and p["extra"] == 0 and p["written"] <= p["selected"]
    failing = {c.name for c in res.checks if c.status == "fail"}
    assert failing <= {"dirty-log", "kernel-log"}, failing
    # the kernel-log check names the WARNING the first time in a boot; afterwards the text says why not
    if res.kernel_log["reports"]:
        assert any(r["title"] == "WARNING in kvm_dirty_ring_push" for r in res.kernel_log["reports"])
    else:
        assert res.kernel_log["taint_before"] & 512 and "taint W was already set" in dirty.summary


# -- the guest side: what a rep-string pass writes, exactly ---------------------------------
@pytest.fixture
def booted(kvm, guest_image):
    """A guest with 4 MiB of 4K anonymous memory at 4 GiB, mapped with 4K pages."""
    from kvmsplit.vmm.machine import Machine
    from kvmsplit.vmm.memory import GuestMemory
    m = Machine(kvm, nr_vcpus=1, sys_mem=12 << 20)
    mem = GuestMemory(Backing.ANON, 4 * MB)
    m.add_slot(1, 1 << 32, mem)
    m.load(guest_image)
    m.start()
    m.expect(0, "HELLO", 10)
    m.send(0, ucall.cmd_map(1 << 32, mem.size, 12))
    m.expect(0, "MAPPED", 10)
    m.expect(0, "READY", 10)
    yield m, mem
    m.close()
    mem.close()


def test_a_string_pass_writes_the_selected_pages_whole_runs_at_a_time(booted, facts):
    """Each run of consecutive selected pages a..b: pages a..b-1 whole with the
    fill, b's first qword, then every page's marker; no other page is touched."""
    import numpy as np
    m, mem = booted
    route = _route_or_fail(facts)
    n = mem.size >> 12
    m.send(0, ucall.cmd_write(5, "random", 50, 17, 0, n, route=route, string=True))
    done = m.expect(0, "DONE", 30)
    pages = ucall.written_pages(5, "random", 50, 17, 0, n)
    assert int(done.args[2], 16) == len(pages)
    q = mem.qwords().reshape(n, 512)
    assert np.array_equal(q[pages.astype(np.int64), 0], ucall.marker(5, pages))
    sel = np.zeros(n, dtype=bool)
    sel[pages.astype(np.int64)] = True
    fill = np.uint64(ucall.string_fill(5))
    filled = (q[:, 1:] == fill).all(axis=1)              # written whole by a rep stosq/movsq
    assert not (filled & ~sel).any() and not q[~sel].any()   # nothing outside the selection
    # a selected page is filled whole exactly when the next page is selected too and in the same run
    runs, i = [], 0
    while i < n:
        if sel[i]:
            k = 1
            while k < ucall.STRING_PAGES and i + k < n and sel[i + k]:
                k += 1
            runs.append((i, k))
            i += k
        else:
            i += 1
    want = np.zeros(n, dtype=bool)
    for a, k in runs:
        want[a:a + k - 1] = True
    assert np.array_equal(filled, want)
    assert max(k for _, k in runs) == ucall.STRING_PAGES     # some instructions did write 4 pages


def test_huge_mappings_lost_while_only_the_emulator_wrote_fail_the_split_check():
    """The 'kept' expectation is judged, not assumed: a huge mapping that goes
    away while nothing faulted is a failure naming the phase and the numbers."""
    kept = Expectation("kept", None, "PVM emulates the CPL0 write passes")
    st = {"pages_4k": 24, "pages_2m": 8, "pages_1g": 0}
    phases = [Phase("populate", 0.1, vm_stats=st), Phase("enable", 0.0, vm_stats=st),
              Phase("dirty-1", 0.1, vm_stats=st)]
    obs = Observations(size=16 * MB, backing="thp", phases=tuple(phases), host_huge_bytes=16 * MB,
                       kernel_log={"checked": True, "reports": [], "taint_before": 0, "taint_after": 0})
    split = next(c for c in judge(obs, kept).checks if c.name == "split")
    assert split.status == "pass" and split.summary.startswith("kept: all 8 huge mappings")
    phases[2] = Phase("dirty-1", 0.1, vm_stats={**st, "pages_2m": 3})
    j = judge(replace(obs, phases=tuple(phases)), kept)
    split = next(c for c in j.checks if c.name == "split")
    assert j.verdict == FAIL and split.status == "fail"
    assert "huge mappings changed by dirty-1: 3 of 8 left" in split.summary


def test_a_ring_below_the_smallest_kvm_accepts_is_a_skip(facts):
    """What a host with Intel PML (512 reserved entries more) says of a 4K ring."""
    from kvmsplit.scenario.engine import ScenarioRun
    pml = replace(facts, dirty_ring_min=16384)
    res = ScenarioRun(small("r", DirtyMode.RING), pml, None, None, None).run()
    assert res.verdict == SKIP and "below the smallest ring KVM accepts here (16384" in res.reasons[0]
    assert facts.dirty_ring_min and facts.dirty_ring_min & (facts.dirty_ring_min - 1) == 0
