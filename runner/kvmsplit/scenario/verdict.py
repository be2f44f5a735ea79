"""Judge a finished scenario: seven checks, each with its own numbers, then
one verdict.

  huge-before  huge mappings existed before logging (where they can)
  split        the split behaviour (eager/lazy) matches the expectation
  dirty-log    the harvested dirty set equals what the guest wrote
  memory       the guest's writes landed in the host pages they should
  recovery     huge mappings came back after logging was disabled
  kernel-log   no new kernel report, taint unchanged
  alive        no EIO from KVM, and a final guest pass agrees with the host
"""
from __future__ import annotations

import numpy as np

from kvmsplit.vmm.memory import Backing
from kvmsplit.runs.results import ERROR, FAIL, PASS, SKIP, Check

GB, MB2 = 1 << 30, 1 << 21


def _huge(stats: dict | None) -> int:
    if not stats:
        return 0
    return stats.get("pages_2m", 0) + stats.get("pages_1g", 0)


def _fmt(stats: dict | None) -> str:
    if not stats:
        return "n/a"
    return f"4k={stats.get('pages_4k', 0)} 2m={stats.get('pages_2m', 0)} 1g={stats.get('pages_1g', 0)}"


def judge(run, error: str | None) -> None:
    r, s, exp = run.res, run.s, run.exp
    ph = {p.name: p.vm_stats for p in r.phases}
    checks: list[Check] = []
    add = checks.append
    huge0 = _huge(ph.get("populate"))

    # 1. huge mappings before logging
    if "populate" not in ph:
        add(Check("huge-before", "skip", "not reached"))
    elif exp.split == "none":
        add(Check("huge-before", "n/a", f"not expected: {exp.reason}", {"populate": ph["populate"]}))
    elif huge0 > 0:
        add(Check("huge-before", "pass", f"{_fmt(ph['populate'])} after populate",
                  {"populate": ph["populate"]}))
    else:
        host_huge = run.host_huge_bytes
        if s.backing is Backing.THP and not host_huge:
            add(Check("huge-before", "skip", f"THP delivered no huge pages for the {s.size >> 20} MiB "
                      "backing (AnonHugePages=0); split behaviour not tested",
                      {"host_huge_bytes": host_huge}))
        else:
            add(Check("huge-before", "fail", f"KVM mapped no huge pages although the backing is huge "
                      f"({_fmt(ph['populate'])}, host huge bytes {host_huge})",
                      {"populate": ph["populate"], "host_huge_bytes": host_huge}))

    # 2. split behaviour
    observed, split_check = _split(run, ph, huge0)
    r.observed_split = observed
    add(split_check)

    # 3. dirty log exactness
    passes = r.dirty.get("passes") or []
    if not passes:
        add(Check("dirty-log", "skip", "no dirty pass completed"))
    else:
        missing = sum(p["missing"] for p in passes)
        extra = sum(p["extra"] for p in passes)
        written = sum(p["written"] for p in passes)
        init = r.dirty.get("initially_set")
        details = {"written": written, "harvested": sum(p["harvested"] for p in passes),
                   "missing": missing, "extra": extra}
        if missing:
            first = next(p for p in passes if p["missing"])
            add(Check("dirty-log", "fail", f"dirty pages missing: {missing} written pages never "
                      f"reported dirty (data loss; first in pass {first['pass']}, pages "
                      f"{first['missing_sample'][:4]})", details))
        elif extra:
            add(Check("dirty-log", "fail", f"extra dirty pages: {extra} pages reported dirty that "
                      "the guest did not write", details))
        elif init and init["pages_wrong"]:
            add(Check("dirty-log", "fail", f"{init['pages_wrong']} pages wrong in the first "
                      f"KVM_GET_DIRTY_LOG (expected {'all set' if init['expected_all_set'] else 'none'})",
                      {**details, "initially_set": init}))
        else:
            add(Check("dirty-log", "pass", f"{written} pages written over {len(passes)} pass(es), "
                      "all harvested, none extra", details))

    # 4. memory contents
    if run.memory_mismatch:
        n = sum(x["pages"] for x in run.memory_mismatch)
        add(Check("memory", "fail", f"guest writes not in host memory for {n} pages "
                  f"(pass {run.memory_mismatch[0]['pass']}, pages {run.memory_mismatch[0]['sample'][:4]})",
                  {"mismatch": run.memory_mismatch}))
    elif "populate" in ph:
        add(Check("memory", "pass", "every guest write found in host memory"))

    # 5. recovery
    rec = ph.get("recovery")
    if exp.split == "none" or huge0 == 0:
        add(Check("recovery", "n/a", "no huge mappings to recover"))
    elif rec is None:
        add(Check("recovery", "skip", "not reached"))
    elif _huge(rec) >= huge0:
        add(Check("recovery", "pass", f"{_fmt(rec)} after the recovery pass (before logging: "
                  f"{_fmt(ph['populate'])})", {"recovery": rec}))
    else:
        add(Check("recovery", "fail", f"huge pages not recovered: {_huge(rec)} of {huge0} huge "
                  f"mappings back after logging was disabled ({_fmt(rec)})", {"recovery": rec}))

    # 6. kernel log
    kl = r.kernel_log or {}
    titles = [rep.get("title") for rep in kl.get("reports", [])]
    tb, ta = kl.get("taint_before"), kl.get("taint_after")
    if titles:
        add(Check("kernel-log", "fail", "kernel report: " + "; ".join(titles), {"titles": titles}))
    elif tb is not None and ta is not None and ta != tb:
        add(Check("kernel-log", "fail", f"kernel taint changed: '{kl.get('taint_before_letters', '')}' "
                  f"-> '{kl.get('taint_after_letters', '')}' ({tb} -> {ta})"))
    elif not kl.get("checked", False):
        add(Check("kernel-log", "unchecked", f"kernel log unchecked: {kl.get('note') or 'unreadable'}"))
    else:
        lost = kl.get("lost_records", 0)
        add(Check("kernel-log", "pass", "no new kernel reports, taint unchanged"
                  + (f" ({lost} records lost to overrun)" if lost else "")))

    # 7. alive
    if run.vm_bugged:
        add(Check("alive", "fail", f"VM bugged (KVM_BUG_ON?): {run.vm_bugged}"))
    elif run.verify is None:
        add(Check("alive", "skip", "final guest pass not reached"))
    elif run.verify["mismatch"]:
        add(Check("alive", "fail", f"final read pass disagrees with host memory: {run.verify['mismatch'][:2]}",
                  run.verify))
    else:
        add(Check("alive", "pass", f"no EIO; final read pass on {run.verify['vcpus']} vCPU(s) "
                  "matches host memory"))

    r.checks = checks
    fails = [c for c in checks if c.status == "fail"]
    if run.vm_bugged:
        # the VM is dead: name the kernel report that killed it, first
        r.verdict = FAIL
        r.error_phase = run.cur_phase
        r.reasons = [f"VM bugged (KVM_BUG_ON?): {run.vm_bugged}"] + \
            [f"kernel: {t}" for t in titles] + [c.summary for c in fails if c.name not in ("alive", "kernel-log")]
    elif error:
        r.verdict, r.error_phase = ERROR, run.cur_phase
        r.reasons = [error] + [c.summary for c in fails]
    elif fails:
        r.verdict, r.reasons = FAIL, [c.summary for c in fails]
    elif any(c.status == "skip" for c in checks):
        r.verdict, r.reasons = SKIP, [c.summary for c in checks if c.status == "skip"]
    else:
        r.verdict = PASS
        r.reasons = [c.summary for c in checks if c.status == "unchecked"]


def _split(run, ph: dict, huge0: int):
    """Observed split behaviour from the snapshots, and the check against the
    expectation. Lazy is exact: after the first dirty pass the huge mappings
    left must be those of huge regions the pass did not write."""
    exp = run.exp
    enable, clear, d1 = ph.get("enable"), ph.get("first-clear"), ph.get("dirty-1")
    details = {"expected": exp.to_dict(), "populate": ph.get("populate"), "enable": enable,
               "first_clear": clear, "dirty_1": d1}
    if "populate" not in ph:
        return None, Check("split", "skip", "not reached", details)
    if huge0 == 0:
        st = "pass" if exp.split == "none" else "skip"
        return "none", Check("split", st, "no huge mappings, nothing to split"
                             + ("" if st == "pass" else f" (expected {exp.split})"), details)
    if enable is None:
        return None, Check("split", "skip", "logging was never enabled", details)
    untouched = _untouched_huge(run, ph["populate"])
    details["predicted_after_lazy"] = untouched
    if _huge(enable) == 0:
        observed = "eager@enable"
    elif _huge(enable) < huge0:
        observed = "eager-incomplete@enable"
    elif clear is not None and _huge(clear) == 0:
        observed = "eager@first-clear"
    elif clear is not None and _huge(clear) < huge0:
        observed = "eager-incomplete@first-clear"
    elif d1 is None:
        return None, Check("split", "skip", "no dirty pass completed", details)
    elif untouched is not None and _huge(d1) == untouched or untouched is None and _huge(d1) < huge0:
        observed = "lazy"
    else:
        observed = "incomplete"
    want = exp.split if exp.split != "eager" else f"eager@{exp.when}"
    faults = next((p.vcpu_delta.get("pf_taken") for p in run.res.phases if p.name == "dirty-1"), None)
    details["dirty_1_faults"] = faults
    if observed == want:
        how = {"lazy": f"lazy: huge mappings kept at enable ({_fmt(enable)}), split by "
                       f"{faults} write faults in pass 1 ({_fmt(d1)})"}.get(
            observed, f"eager: huge mappings gone before the guest ran again ({_fmt(clear or enable)})")
        return observed, Check("split", "pass", f"{how}; expected {want}: {exp.reason}", details)
    if observed.startswith("eager-incomplete"):
        at = clear if "clear" in observed else enable
        msg = f"eager split incomplete: {_huge(at)} of {huge0} huge mappings left after " \
              f"{observed.split('@')[1]} ({_fmt(at)})"
    elif observed == "incomplete":
        msg = f"split incomplete: {_huge(d1)} huge mappings survived the first write pass " \
              f"(expected {untouched if untouched is not None else 'fewer'}; {_fmt(d1)})"
    else:
        msg = f"split was {observed}, expected {want} ({exp.reason})"
    return observed, Check("split", "fail", msg, details)


def _untouched_huge(run, populate: dict) -> int | None:
    """How many huge mappings a lazy split leaves after dirty pass 1: those
    whose region the pass did not write. Only predictable when every region
    was mapped huge at one size."""
    s = run.s
    if run.pass1_pages is None:
        return None
    for key, size in (("pages_1g", GB), ("pages_2m", MB2)):
        n = populate.get(key, 0)
        other = populate.get("pages_2m" if key == "pages_1g" else "pages_1g", 0)
        if n and not other and n == s.size // size:
            return n - np.unique(run.pass1_pages // (size >> 12)).size
    return None
