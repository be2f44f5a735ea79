"""Judge a scenario from its Observations: seven checks, each with its own
numbers, then one verdict. A pure function: no VM, no host.

  huge-before  huge mappings existed before logging (where they can)
  split        the split behaviour (eager/lazy) matches the expectation
  dirty-log    the harvested dirty set equals what the guest wrote
  memory       the guest's writes landed in the host pages they should
  recovery     huge mappings came back after logging was disabled
  kernel-log   no new kernel report, taint unchanged
  alive        no EIO from KVM, and a final guest pass agrees with the host
  witness      the kernel's tracepoints agree with the stats, phase by phase
               (splits and huge mappings counted twice, by two witnesses)
  stats        the page counters are plausible on their own (none negative,
               none mapping more memory than the VM has)
"""
from __future__ import annotations

from dataclasses import dataclass

from kvmsplit.runs.checks import kernel_log_check
from kvmsplit.runs.results import Check, CheckStatus, Verdict
from kvmsplit.scenario.expectation import Expectation
from kvmsplit.scenario.observations import Observations

GB, MB2 = 1 << 30, 1 << 21
TAINT_W = 9      # the kernel issued a warning
HUGE_SIZES = (("pages_1g", GB), ("pages_2m", MB2))
S = CheckStatus


@dataclass(frozen=True)
class Judgement:
    verdict: Verdict
    reasons: list[str]
    checks: list[Check]
    observed_split: str | None
    error_phase: str | None = None


def _huge(stats: dict | None) -> int:
    if not stats:
        return 0
    return stats.get("pages_2m", 0) + stats.get("pages_1g", 0)


def _fmt(stats: dict | None) -> str:
    if not stats:
        return "n/a"
    return f"4k={stats.get('pages_4k', 0)} 2m={stats.get('pages_2m', 0)} 1g={stats.get('pages_1g', 0)}"


def judge(obs: Observations, exp: Expectation) -> Judgement:
    observed, split = _split(obs, exp)
    checks = [_huge_before(obs, exp), split, _dirty_log(obs), _memory(obs), _recovery(obs, exp),
              kernel_log_check(obs.kernel_log), _alive(obs), witness_check(obs, exp), _stats(obs)]
    return decide(obs, checks, observed)


def decide(obs: Observations, checks: list[Check], observed: str | None) -> Judgement:
    """One verdict from the checks (a backend that adds or replaces checks decides with this too)."""
    fails = [c.summary for c in checks if c.status is S.FAIL]
    if obs.vm_bugged:
        # the VM is dead: name the kernel report that killed it, first
        titles = [f"kernel: {r.get('title')}" for r in obs.kernel_log.get("reports", [])]
        others = [c.summary for c in checks if c.status is S.FAIL and c.name not in ("alive", "kernel-log")]
        return Judgement(Verdict.FAIL, [f"VM bugged (KVM_BUG_ON?): {obs.vm_bugged}", *titles, *others],
                         checks, observed, obs.last_phase)
    if obs.error:
        return Judgement(Verdict.ERROR, [obs.error, *fails], checks, observed, obs.last_phase)
    if fails:
        return Judgement(Verdict.FAIL, fails, checks, observed)
    skips = [c.summary for c in checks if c.status is S.SKIP]
    if skips:
        return Judgement(Verdict.SKIP, skips, checks, observed)
    unchecked = [c.summary for c in checks if c.status is S.UNCHECKED]
    if unchecked:
        return Judgement(Verdict.UNCONFIRMED, unchecked, checks, observed)
    return Judgement(Verdict.PASS, [], checks, observed)


def _huge_before(obs: Observations, exp: Expectation) -> Check:
    populate = obs.stats("populate")
    if populate is None:
        return Check("huge-before", S.SKIP, "not reached")
    if exp.split == "none":
        return Check("huge-before", S.NA, f"not expected: {exp.reason}", {"populate": populate})
    if _huge(populate) > 0:
        return Check("huge-before", S.PASS, f"{_fmt(populate)} after populate", {"populate": populate})
    host_huge = obs.host_huge_bytes
    if obs.backing == "thp" and not host_huge:
        return Check("huge-before", S.SKIP, f"THP delivered no huge pages for the {obs.size >> 20} MiB "
                     "backing (AnonHugePages=0); split behaviour not tested", {"host_huge_bytes": host_huge})
    return Check("huge-before", S.FAIL, f"KVM mapped no huge pages although the backing is huge "
                 f"({_fmt(populate)}, host huge bytes {host_huge})",
                 {"populate": populate, "host_huge_bytes": host_huge})


def _silent_warning(obs: Observations) -> str:
    """Why a KVM bug may show no kernel report: taint W was set before this
    scenario, and a WARN_ON_ONCE that fired earlier in this boot stays quiet."""
    kl = obs.kernel_log
    if kl.get("reports") or not (int(kl.get("taint_before") or 0) >> TAINT_W & 1):
        return ""
    return ("; no kernel report this time, but taint W was already set before this scenario: a "
            "WARN_ON_ONCE that fired earlier in this boot (e.g. kvm_dirty_ring_push's) does not print "
            "again, so later runs show only the lost pages")


def _dirty_log(obs: Observations) -> Check:
    passes = obs.dirty_passes
    if not passes:
        return Check("dirty-log", S.SKIP, "no dirty pass completed")
    missing = sum(p["missing"] for p in passes)
    extra = sum(p["extra"] for p in passes)
    written = sum(p["written"] for p in passes)
    init = obs.initially_set
    details = {"written": written, "harvested": sum(p["harvested"] for p in passes),
               "missing": missing, "extra": extra}
    stuck = next((p for p in passes if p.get("ring_stuck")), None)
    if stuck:
        details["ring_stuck"] = stuck["ring_stuck"]
        lost = (f"{stuck['missing']} of the {stuck['written']} pages written before it were never reported "
                f"dirty (data loss; pages {stuck['missing_sample'][:4]})" if stuck["missing"] else
                f"the {stuck['written']} pages written before it were all reported")
        return Check("dirty-log", S.FAIL, f"dirty ring stuck in pass {stuck['pass']}: "
                     f"{stuck['ring_stuck'].split('dirty ring stuck: ', 1)[-1]}; {lost}" + _silent_warning(obs),
                     details)
    if missing:
        first = next(p for p in passes if p["missing"])
        return Check("dirty-log", S.FAIL, f"dirty pages missing: {missing} written pages never reported "
                     f"dirty (data loss; first in pass {first['pass']}, pages {first['missing_sample'][:4]})"
                     + _silent_warning(obs), details)
    if extra:
        return Check("dirty-log", S.FAIL, f"extra dirty pages: {extra} pages reported dirty that the "
                     "guest did not write", details)
    if written == 0:
        return Check("dirty-log", S.SKIP, f"the dirty passes wrote no page ({len(passes)} pass(es)): "
                     "nothing to judge the log on", details)
    if init and init["pages_wrong"]:
        want = "all set" if init["expected_all_set"] else "none"
        return Check("dirty-log", S.FAIL, f"{init['pages_wrong']} pages wrong in the first "
                     f"KVM_GET_DIRTY_LOG (expected {want})", {**details, "initially_set": init})
    return Check("dirty-log", S.PASS, f"{written} pages written over {len(passes)} pass(es), all "
                 "harvested, none extra", details)


def _memory(obs: Observations) -> Check:
    if obs.memory_mismatch:
        n = sum(x["pages"] for x in obs.memory_mismatch)
        first = obs.memory_mismatch[0]
        return Check("memory", S.FAIL, f"guest writes not in host memory for {n} pages "
                     f"(pass {first['pass']}, pages {first['sample'][:4]})",
                     {"mismatch": list(obs.memory_mismatch)})
    if obs.stats("populate") is None:
        return Check("memory", S.SKIP, "not reached")
    return Check("memory", S.PASS, "every guest write found in host memory")


def _recovery(obs: Observations, exp: Expectation) -> Check:
    populate, rec = obs.stats("populate"), obs.stats("recovery")
    huge0 = _huge(populate)
    if exp.split == "none" or huge0 == 0:
        return Check("recovery", S.NA, "no huge mappings to recover")
    if rec is None:
        return Check("recovery", S.SKIP, "not reached")
    if _huge(rec) >= huge0:
        return Check("recovery", S.PASS, f"{_fmt(rec)} after the recovery pass (before logging: "
                     f"{_fmt(populate)})", {"recovery": rec})
    return Check("recovery", S.FAIL, f"huge pages not recovered: {_huge(rec)} of {huge0} huge mappings "
                 f"back after logging was disabled ({_fmt(rec)})", {"recovery": rec})


def _alive(obs: Observations) -> Check:
    if obs.vm_bugged:
        return Check("alive", S.FAIL, f"VM bugged (KVM_BUG_ON?): {obs.vm_bugged}")
    if obs.verify is None:
        return Check("alive", S.SKIP, "final guest pass not reached")
    if obs.verify["mismatch"]:
        return Check("alive", S.FAIL, f"final read pass disagrees with host memory: "
                     f"{obs.verify['mismatch'][:2]}", obs.verify)
    return Check("alive", S.PASS, f"no EIO; final read pass on {obs.verify['vcpus']} vCPU(s) matches "
                 "host memory")


def _split(obs: Observations, exp: Expectation) -> tuple[str | None, Check]:
    """Observed split behaviour from the snapshots, and the check against the
    expectation. Lazy is exact: after the first dirty pass the huge mappings
    left must be those of huge regions the pass did not write."""
    populate, enable = obs.stats("populate"), obs.stats("enable")
    clear, d1 = obs.stats("first-clear"), obs.stats("dirty-1")
    details: dict = {"expected": exp.to_dict(), "populate": populate, "enable": enable,
                     "first_clear": clear, "dirty_1": d1}
    early = nothing_to_split(populate, exp, details)
    if early is not None or populate is None:
        return early or (None, Check("split", S.SKIP, "not reached", details))
    huge0 = _huge(populate)
    if enable is None:
        return None, Check("split", S.SKIP, "logging was never enabled", details)
    if exp.split == "kept":
        return _kept(huge0, enable, clear, d1, exp, details)
    untouched = _untouched_huge(obs, populate)
    details["predicted_after_lazy"] = untouched
    observed = _observed(huge0, enable, clear, d1, untouched)
    if observed is None:
        return None, Check("split", S.SKIP, "no dirty pass completed", details)
    want = exp.split if exp.split != "eager" else f"eager@{exp.when}"
    faults = obs.vcpu_delta("dirty-1", "pf_taken")
    details["dirty_1_faults"] = faults
    if observed == want:
        if observed == "lazy":
            how = (f"lazy: huge mappings kept at enable ({_fmt(enable)}), split by {faults} write faults "
                   f"in pass 1 ({_fmt(d1)})")
        else:
            how = f"eager: huge mappings gone before the guest ran again ({_fmt(clear or enable)})"
        return observed, Check("split", S.PASS, f"{how}; expected {want}: {exp.reason}", details)
    return observed, Check("split", S.FAIL, _split_failure(observed, want, exp, huge0, enable, clear, d1,
                                                           untouched), details)


def _kept(huge0: int, enable: dict, clear: dict | None, d1: dict | None, exp: Expectation,
          details: dict) -> tuple[str | None, Check]:
    """Writes that never fault (KVM's emulator on PVM) must leave every huge mapping in place."""
    if d1 is None:
        return None, Check("split", S.SKIP, "no dirty pass completed", details)
    for when, at in (("enable", enable), ("first-clear", clear), ("dirty-1", d1)):
        if at is not None and _huge(at) != huge0:
            return "changed", Check("split", S.FAIL, f"huge mappings changed by {when}: {_huge(at)} of {huge0} "
                                    f"left ({_fmt(at)}), expected all kept: {exp.reason}", details)
    return "kept", Check("split", S.PASS, f"kept: all {huge0} huge mappings in place through dirty pass 1 "
                         f"({_fmt(d1)}); expected kept: {exp.reason}", details)


def nothing_to_split(populate: dict | None, exp: Expectation, details: dict) -> tuple[str | None, Check] | None:
    """The split check's answer before any split can be judged (not reached, or no huge mappings
    to split), else None: every backend's split check starts here."""
    if populate is None:
        return None, Check("split", S.SKIP, "not reached", details)
    if _huge(populate) == 0:
        st = S.PASS if exp.split == "none" else S.SKIP
        return "none", Check("split", st, "no huge mappings, nothing to split"
                             + ("" if st is S.PASS else f" (expected {exp.split})"), details)
    return None


def huge_mappings(stats: dict | None) -> int:
    """2M and 1G mappings in a stats snapshot."""
    return _huge(stats)


def _observed(huge0: int, enable: dict, clear: dict | None, d1: dict | None, untouched: int | None) -> str | None:
    for when, at in (("enable", enable), ("first-clear", clear)):
        if at is not None and _huge(at) == 0:
            return f"eager@{when}"
        if at is not None and _huge(at) < huge0:
            return f"eager-incomplete@{when}"
    if d1 is None:
        return None
    if (_huge(d1) == untouched) if untouched is not None else (_huge(d1) < huge0):
        return "lazy"
    return "incomplete"


def _split_failure(observed: str, want: str, exp: Expectation, huge0: int, enable: dict,
                   clear: dict | None, d1: dict | None, untouched: int | None) -> str:
    if observed.startswith("eager-incomplete"):
        at = clear if "clear" in observed else enable
        return (f"eager split incomplete: {_huge(at)} of {huge0} huge mappings left after "
                f"{observed.split('@')[1]} ({_fmt(at)})")
    if observed == "incomplete":
        return (f"split incomplete: {_huge(d1)} huge mappings survived the first write pass "
                f"(expected {untouched if untouched is not None else 'fewer'}; {_fmt(d1)})")
    return f"split was {observed}, expected {want} ({exp.reason})"


def _untouched_huge(obs: Observations, populate: dict) -> int | None:
    """How many huge mappings a lazy split leaves after dirty pass 1: those
    whose region the pass did not write. Only predictable when every region
    was mapped huge at one size."""
    for key, size in HUGE_SIZES:
        n = populate.get(key, 0)
        other = populate.get("pages_2m" if key == "pages_1g" else "pages_1g", 0)
        if n and not other and n == obs.size // size and key in obs.pass1_regions:
            return n - obs.pass1_regions[key]
    return None


# -- the second witness ------------------------------------------------------------------
PAGE_KEYS = (("pages_4k", 4 << 10), ("pages_2m", MB2), ("pages_1g", GB))
NEGATIVE = 1 << 63       # a u64 counter this large went below zero
SPLIT_PHASES = ("enable", "first-clear", "dirty-1")


def _stats(obs: Observations) -> Check:
    """The kernel's own bookkeeping, checked for sense before it is believed."""
    for ph in obs.phases:
        st = ph.vm_stats or {}
        for key, _ in PAGE_KEYS:
            if st.get(key, 0) >= NEGATIVE:
                return Check("stats", S.FAIL, f"{key} reads {st[key]} after {ph.name}: the kernel's count "
                             f"went below zero ({st[key] - (1 << 64)})", {"phase": ph.name, key: st[key]})
        mapped = sum(st.get(key, 0) * size for key, size in PAGE_KEYS)
        if obs.memory_bytes and mapped > obs.memory_bytes:
            return Check("stats", S.FAIL, f"the page counts after {ph.name} map {mapped >> 20} MiB, more than "
                         f"the {obs.memory_bytes >> 20} MiB the VM has ({_fmt(st)})",
                         {"phase": ph.name, "mapped_bytes": mapped, "memory_bytes": obs.memory_bytes})
    return Check("stats", S.PASS, "page counters plausible in every phase")


def _previous(obs: Observations, phase: str) -> dict | None:
    names = [p.name for p in obs.phases]
    i = names.index(phase)
    return obs.phases[i - 1].vm_stats if i else None


def _level(d: dict, key: str, level: int) -> int:
    return int(d.get(key, {}).get(str(level), 0))


def _compare_phase(obs: Observations, phase: str, eager: bool) -> list[str]:
    """Where the stats and the tracepoints disagree about one phase, in words."""
    tr, before, after = obs.trace(phase), _previous(obs, phase), obs.stats(phase)
    if tr is None or before is None or after is None:
        return []
    split_1g = _level(tr, "splits_by_level", 3)
    split_2m = max(tr.get("regions_dismantled", 0) - split_1g, 0)     # 2M regions: splits + shadow l1 pages
    d1g = after.get("pages_1g", 0) - before.get("pages_1g", 0)
    d2m = after.get("pages_2m", 0) - before.get("pages_2m", 0)
    d4k = after.get("pages_4k", 0) - before.get("pages_4k", 0)
    out = []
    if d1g != -split_1g:
        out.append(f"{phase}: stats say {-d1g} fewer 1G mappings, tracepoints show {split_1g} 1G splits")
    if d2m != 512 * split_1g - split_2m:
        out.append(f"{phase}: stats say {-d2m} fewer 2M mappings, tracepoints show {split_2m} 2M regions "
                   f"split" + (f" and {split_1g} 1G splits (+512 2M each)" if split_1g else ""))
    if eager and split_2m and d4k != 512 * split_2m:
        out.append(f"{phase}: {split_2m} 2M splits should add {512 * split_2m} 4K mappings; stats say {d4k}")
    return out


def _installed(obs: Observations, phase: str, since: str) -> list[str]:
    """Huge mappings the stats count after `phase` must have been installed (set_spte at level > 1)."""
    tr, before, after = obs.trace(phase), obs.stats(since), obs.stats(phase)
    if tr is None or after is None:
        return []
    made = sum(int(v) for v in tr.get("huge_mapped_by_level", {}).values())
    grown = _huge(after) - _huge(before)
    if grown > made:
        return [f"{phase}: stats say {grown} new huge mappings, tracepoints show {made} installed"]
    return []


def _shadow_mmu_split(obs: Observations, phase: str) -> list[str]:
    """A nested scenario's eager split must be the shadow MMU's: each 2M split
    comes with a new direct level-1 shadow page whose role has guest_mode
    (shadow_mmu_get_sp_for_split), which the TDP MMU never makes."""
    tr = obs.trace(phase)
    if not tr:
        return []
    splits, gm = _level(tr, "splits_by_level", 2), tr.get("new_direct_l1_guest_mode")
    if gm is None:
        return [f"{phase}: the trace has no role words, so the shadow MMU's splits cannot be told "
                "from the TDP MMU's"] if splits else []
    if splits > gm:
        return [f"{phase}: {splits} 2M splits, but only {gm} new guest_mode shadow pages: not (all) the "
                "shadow MMU's split of L2 memory"]
    return []


def witness_check(obs: Observations, exp: Expectation) -> Check:
    if obs.trace_unavailable:
        return Check("witness", S.UNCHECKED, f"tracepoints unavailable ({obs.trace_unavailable}): the "
                     "split evidence rests on the stats alone")
    traces = {p.name: p.trace for p in obs.phases if p.trace is not None}
    if not traces:
        return Check("witness", S.SKIP, "not reached")
    lost = {n: tr["lost"] for n, tr in traces.items() if tr.get("lost")}
    errors = [(n, g, e) for n, tr in traces.items() for g, e in tr.get("split_errnos", [])]
    if errors:
        n, g, e = errors[0]
        return Check("witness", S.FAIL, f"kvm_mmu_split_huge_page failed: errno {e} for gfn {g:#x} in {n}"
                     + (f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""),
                     {"split_errnos": errors[:16]})
    eager = exp.split == "eager"
    problems = [msg for ph in SPLIT_PHASES if ph in traces for msg in _compare_phase(obs, ph, eager)]
    problems += _installed(obs, "populate", "boot") + _installed(obs, "recovery", "disable")
    if obs.nested and eager and exp.when:
        problems += _shadow_mmu_split(obs, exp.when)
    details = {"phases": {n: {k: tr.get(k) for k in ("splits_by_level", "split_retries", "regions_dismantled",
                                                     "new_direct_l1", "new_direct_l1_guest_mode",
                                                     "huge_mapped_by_level", "lost")}
                          for n, tr in traces.items()}}
    if problems:
        return Check("witness", S.FAIL, "the witnesses disagree: " + "; ".join(problems), details)
    if lost:
        return Check("witness", S.UNCHECKED, f"trace events lost in {', '.join(f'{n} ({c})' for n, c in lost.items())}"
                     ": the tracepoint witness is incomplete", details)
    return Check("witness", S.PASS, f"tracepoints agree with the stats: {_witness_summary(traces, obs.nested)}",
                 details)


def _witness_summary(traces: dict, nested: bool = False) -> str:
    parts = []
    for n in ("populate", *SPLIT_PHASES, "recovery"):
        tr = traces.get(n)
        if not tr:
            continue
        splits = sum(int(v) for v in tr.get("splits_by_level", {}).values())
        huge = sum(int(v) for v in tr.get("huge_mapped_by_level", {}).values())
        gm = tr.get("new_direct_l1_guest_mode")
        bits = [f"{splits} splits" + (f" ({gm} by the shadow MMU, of L2 memory)" if gm else "")] if splits else []
        bits += [f"{tr['new_direct_l1']} new 4K shadow tables"] if tr.get("new_direct_l1") else []
        bits += [f"{huge} huge mapped" + (" (L2 memory, by the shadow MMU)" if nested else "")] if huge else []
        bits += [f"{tr['split_retries']} retried (EAGAIN)"] if tr.get("split_retries") else []
        if bits:
            parts.append(f"{n} {', '.join(bits)}")
    return "; ".join(parts) or "no split or huge-mapping events"
