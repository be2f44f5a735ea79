"""Checks every backend makes the same way."""
from __future__ import annotations

from kvmsplit.runs.results import Check, CheckStatus


def kernel_log_check(kl: dict) -> Check:
    """No new kernel report and no new taint while the work ran. A log that
    could not be read to its end (unreadable, records lost to overrun, cut at
    the record cap) is never taken as clean: it is UNCHECKED."""
    titles = [rep.get("title") for rep in kl.get("reports", [])]
    tb, ta = kl.get("taint_before"), kl.get("taint_after")
    if titles:
        return Check("kernel-log", CheckStatus.FAIL, "kernel report: " + "; ".join(map(str, titles)),
                     {"titles": titles})
    if tb is not None and ta is not None and ta != tb:
        return Check("kernel-log", CheckStatus.FAIL, f"kernel taint changed: "
                     f"'{kl.get('taint_before_letters', '')}' -> '{kl.get('taint_after_letters', '')}' ({tb} -> {ta})")
    if not kl.get("checked", False):
        return Check("kernel-log", CheckStatus.UNCHECKED,
                     f"kernel log unchecked: {kl.get('note') or 'unreadable'}")
    return Check("kernel-log", CheckStatus.PASS, "no new kernel reports, taint unchanged")
