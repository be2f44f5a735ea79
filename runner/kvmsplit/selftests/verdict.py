"""Judge a finished selftest from what it printed and how it ended: three
checks, then one verdict in the same terms as kvmsplit's own scenarios.

  exit        the exit status, read the kselftest way (0 pass, 4 skip, 2 xfail,
              3 xpass); a timeout, a signal or an assertion failure says why
  ktap        every KTAP result ok or skipped (when the test prints KTAP)
  kernel-log  no new kernel report, taint unchanged, attributed to this test
              because the guard was running only while it ran
"""
from __future__ import annotations

from kvmsplit.runs.checks import kernel_log_check
from kvmsplit.runs.results import ERROR, FAIL, PASS, SKIP, UNCONFIRMED, Check, ScenarioResult
from kvmsplit.selftests import ktap
from kvmsplit.selftests.ktap import KtapDoc
from kvmsplit.selftests.parse import AssertionFailure, parse_assertion, parse_timings
from kvmsplit.selftests.process import Completed

KSFT_PASS, KSFT_FAIL, KSFT_XFAIL, KSFT_XPASS, KSFT_SKIP = 0, 1, 2, 3, 4
_NOISE = ("Random seed:",)      # printed first by every KVM selftest: never a reason
TAIL_LINES = 40


def last_line(*texts: str) -> str | None:
    for text in texts:
        lines = [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.startswith(_NOISE)]
        if lines:
            return lines[-1]
    return None


def skip_reason(doc: KtapDoc | None, proc: Completed) -> str:
    """What the test said when it skipped: `1..0 # SKIP reason`, a skipped
    result's diagnostic, else its last words."""
    if doc is not None and doc.skip_reason:
        return doc.skip_reason
    skips = [r for r in doc.skips() if r.diagnostic] if doc is not None else []
    if skips:
        return "; ".join(f"{r.description}: {r.diagnostic}" for r in skips[:3])
    said = last_line(proc.stdout, proc.stderr)
    return f"exit 4 (KSFT_SKIP): {said}" if said else "exit 4 (KSFT_SKIP), no reason printed"


def exit_check(proc: Completed, timeout: float, doc: KtapDoc | None,
               assertion: AssertionFailure | None) -> Check:
    rc = proc.returncode
    details = {"exit_code": rc, "signal": proc.signal, "timed_out": proc.timed_out}
    if proc.unkillable:
        return Check("exit", "fail", f"process(es) {proc.unkillable} still alive after SIGKILL: "
                     "stuck in the kernel", details)
    if proc.timed_out:
        return Check("exit", "fail", f"timed out after {timeout:g} s; its process group was killed",
                     details)
    if rc == KSFT_PASS:
        return Check("exit", "pass", "exit 0", details)
    if rc == KSFT_SKIP:
        return Check("exit", "skip", skip_reason(doc, proc), details)
    if rc == KSFT_XFAIL:
        return Check("exit", "pass", "exit 2 (KSFT_XFAIL: a failure the test expects)", details)
    if rc == KSFT_XPASS:
        return Check("exit", "fail", "exit 3 (KSFT_XPASS: passed where the test expects a failure)",
                     details)
    if assertion is not None:
        return Check("exit", "fail", assertion.summary(), details)
    if proc.signal:
        return Check("exit", "fail", f"killed by {proc.signal}", details)
    said = last_line(proc.stderr, proc.stdout)
    return Check("exit", "fail", f"exit {rc}" + (f": {said}" if said else ""), details)


def ktap_check(doc: KtapDoc | None, error: str | None) -> Check | None:
    if error:
        return Check("ktap", "unchecked", f"output is not valid KTAP ({error}); judged by the exit code")
    if doc is None:
        return None
    if doc.plan == 0 and doc.skip_reason is not None:
        return Check("ktap", "skip", f"KTAP: all skipped: {doc.skip_reason or 'no reason given'}")
    failed = doc.failures()
    if failed:
        names = ", ".join(f"not ok {r.number} {r.description}".strip() for r in failed[:3])
        more = f" and {len(failed) - 3} more" if len(failed) > 3 else ""
        return Check("ktap", "fail", f"KTAP: {names}{more}",
                     {"failed": [r.line for r in failed]})
    skipped = len(doc.skips())
    return Check("ktap", "pass", f"KTAP: {len(doc.results) - skipped} ok"
                 + (f", {skipped} skipped" if skipped else "") + f" of {len(doc.results)}")


def judge(res: ScenarioResult, proc: Completed, timeout: float, doc: KtapDoc | None,
          ktap_error: str | None, assertion: AssertionFailure | None) -> None:
    checks = [c for c in (exit_check(proc, timeout, doc, assertion), ktap_check(doc, ktap_error),
                          kernel_log_check(res.kernel_log or {})) if c is not None]
    res.checks = checks
    by = {c.name: c for c in checks}
    fails = [c.summary for c in checks if c.status == "fail"]
    notes = [c.summary for c in checks if c.status == "unchecked"]
    if proc.leftover:
        notes.append(f"left {len(proc.leftover)} process(es) running after it exited; killed")
    if by["kernel-log"].status == "fail":
        # the kernel misbehaved while this test ran: that outranks how the test ended
        res.verdict = FAIL
        res.reasons = [by["kernel-log"].summary] + [s for s in fails if s != by["kernel-log"].summary]
    elif proc.timed_out and not proc.unkillable:
        res.verdict, res.reasons = ERROR, fails + notes
    elif fails:
        res.verdict, res.reasons = FAIL, fails + notes
    elif any(c.status == "skip" for c in checks):
        # the exit status says it best; `1..0 # SKIP` with exit 0 still skipped
        said = by["exit"] if by["exit"].status == "skip" else by["ktap"]
        res.verdict, res.reasons = SKIP, [said.summary] + notes
    elif any(c.status == "unchecked" for c in checks):
        res.verdict, res.reasons = UNCONFIRMED, notes
    else:
        res.verdict, res.reasons = PASS, notes


def record(res: ScenarioResult, proc: Completed, timeout: float) -> None:
    """Put what the test printed into `res` (phases, extra) and judge it."""
    try:
        doc, ktap_error = ktap.parse(proc.stdout), None
    except ktap.KtapError as e:
        # a test's output is whatever it printed: never let it crash the run
        doc, ktap_error = None, str(e)
    assertion = parse_assertion(proc.stderr) or parse_assertion(proc.stdout)
    res.duration_s = proc.duration_s
    res.phases = parse_timings(proc.stdout)
    res.extra.update({
        "exit_code": proc.returncode, "signal": proc.signal, "timed_out": proc.timed_out,
        "ktap": doc.to_dict() if doc else None, "ktap_error": ktap_error,
        "assertion": assertion.to_dict() if assertion else None,
        "stdout_tail": proc.stdout.splitlines()[-TAIL_LINES:],
        "stderr_tail": proc.stderr.splitlines()[-TAIL_LINES:],
        "output_truncated": proc.truncated,
        "leftover_pids": proc.leftover, "unkillable_pids": proc.unkillable,
    })
    judge(res, proc, timeout, doc, ktap_error, assertion)
