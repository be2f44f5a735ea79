"""KTAP/TAP test output (Documentation/dev-tools/ktap.rst), as the kernel's
selftests print it.

A selftest mixes KTAP with free text ("Random seed: 0x6b8b4567" comes before
"TAP version 13"), and KTAP allows that: lines that are not version, plan,
result or diagnostic lines are "unknown lines" and ignored. What is refused,
with its line number, is a KTAP line that is broken or out of place: a result
without a number, numbers out of sequence, a second plan, a plan the results
do not match. Subtests are indented (KTAP says two spaces per level; any
deeper indent is taken) and attach to the result line that follows them.

Plain TAP without a version line is accepted because kselftest's
`ksft_exit_skip()` prints just `1..0 # SKIP reason`.
"""
from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field

VERSION_RE = re.compile(r"(KTAP|TAP) version (\S+)$")
PLAN_RE = re.compile(r"1\.\.(\S*?)(?:\s*#\s*(.*))?$")
RESULT_RE = re.compile(r"(not ok|ok)(?=\s|$)(.*)$")
RESULT_REST_RE = re.compile(r"\s+(\d+)(?:\s+([^#]*?))?\s*(?:#\s*(.*))?$")
DIRECTIVES = ("SKIP", "TODO", "XFAIL", "TIMEOUT", "ERROR")
MAX_DIGITS = 9      # test numbers and plans: a billion tests is past any real suite
MAX_DEPTH = 32      # subtest levels (KUnit nests two or three)


class KtapError(ValueError):
    """Malformed KTAP; `line` is 1-based in the text that was parsed."""

    def __init__(self, line: int, message: str):
        super().__init__(f"line {line}: {message}")
        self.line, self.message = line, message


@dataclass
class KtapResult:
    number: int
    ok: bool
    description: str
    directive: str | None       # SKIP, TODO, XFAIL, TIMEOUT, ERROR
    diagnostic: str             # the text after '#' (and after the directive)
    line: int
    subtests: KtapDoc | None = None

    @property
    def failed(self) -> bool:
        """A real failure: not ok, and not excused by SKIP/TODO/XFAIL."""
        return not self.ok and self.directive not in ("SKIP", "TODO", "XFAIL")


@dataclass
class KtapDoc:
    version: str | None = None            # "KTAP version 1", "TAP version 13", or None
    plan: int | None = None
    skip_reason: str | None = None        # from `1..0 # SKIP reason`
    results: list[KtapResult] = field(default_factory=list)
    diagnostics: list[str] = field(default_factory=list)

    def failures(self) -> list[KtapResult]:
        """Failed results, innermost first where a subtest failed."""
        out = []
        for r in self.results:
            if r.subtests:
                out += r.subtests.failures()
            if r.failed:
                out.append(r)
        return out

    def skips(self) -> list[KtapResult]:
        return [r for r in self.results if r.directive == "SKIP"]

    def to_dict(self) -> dict:
        return asdict(self)


def _indent(line: str) -> int:
    return len(line) - len(line.lstrip(" "))


def _skip_text(text: str | None) -> str:
    # kselftest's ksft_exit_skip() callers often start the reason with "- "
    return (text or "").strip().removeprefix("-").strip()


def _parse_result(m: re.Match, lineno: int) -> KtapResult:
    rest = RESULT_REST_RE.fullmatch(m.group(2))
    if not rest:
        raise KtapError(lineno, f"result line without a test number: '{m.group(0)}'")
    if len(rest.group(1)) > MAX_DIGITS:
        raise KtapError(lineno, f"test number {rest.group(1)[:20]}... out of range")
    number, desc, comment = int(rest.group(1)), (rest.group(2) or "").strip(), rest.group(3)
    directive, diag = None, (comment or "").strip()
    if comment is not None:
        word, _, after = diag.partition(" ")
        if word.upper() in DIRECTIVES:
            directive, diag = word.upper(), _skip_text(after) if word.upper() == "SKIP" else after.strip()
    return KtapResult(number, m.group(1) == "ok", desc, directive, diag, lineno)


class _Level:
    """One nesting level being parsed: a document and where its lines start."""

    def __init__(self, indent: int, doc: KtapDoc, opened_at: int):
        self.indent, self.doc, self.opened_at = indent, doc, opened_at
        self.plan_line: int | None = None


def _close(level: _Level) -> KtapDoc:
    doc = level.doc
    if doc.plan is not None and len(doc.results) != doc.plan:
        at = level.plan_line or level.opened_at
        got = len(doc.results)
        missing = f" (missing {got + 1}..{doc.plan})" if got < doc.plan else ""
        raise KtapError(at, f"plan 1..{doc.plan} but {got} result(s){missing}")
    return doc


def parse(text: str) -> KtapDoc | None:
    """The KTAP document in `text`, or None when it holds no KTAP line at all.
    Raises KtapError for malformed KTAP."""
    stack: list[_Level] = []
    for lineno, raw in enumerate(text.splitlines(), 1):
        line = raw.rstrip()
        body, ind = line.lstrip(" "), _indent(line)
        version, plan, result = VERSION_RE.match(body), PLAN_RE.match(body), RESULT_RE.match(body)
        if not (version or plan or result):
            if body.startswith("#") and stack and ind >= stack[-1].indent:
                stack[-1].doc.diagnostics.append(body[1:].strip())
            continue                       # an unknown line: allowed anywhere
        if not stack:
            stack.append(_Level(ind, KtapDoc(), lineno))
        subtests = None
        if ind < stack[-1].indent:
            # a subtest level ends: this line must be its parent's result
            if len(stack) == 1:
                raise KtapError(lineno, "KTAP line indented less than the document it is in "
                                        f"(which starts at line {stack[0].opened_at})")
            sub = stack.pop()
            subtests = _close(sub)
            if ind != stack[-1].indent or not result:
                raise KtapError(lineno, f"subtests (from line {sub.opened_at}) not followed by "
                                        "their parent's result line")
        elif ind > stack[-1].indent:
            if len(stack) > MAX_DEPTH:
                raise KtapError(lineno, f"subtests nested more than {MAX_DEPTH} levels deep")
            stack.append(_Level(ind, KtapDoc(), lineno))
        level = stack[-1]
        doc = level.doc
        if version:
            if doc.version is not None or doc.plan is not None or doc.results:
                after = "results" if doc.results else "plan" if doc.plan is not None else "version line"
                raise KtapError(lineno, f"unexpected version line '{body}' after the document's {after}")
            if not version.group(2).isdigit():
                raise KtapError(lineno, f"bad version number in '{body}'")
            doc.version = body
        elif plan:
            if not (plan.group(1).isascii() and plan.group(1).isdigit()):
                raise KtapError(lineno, f"bad plan '{body}': expected 1..N")
            if len(plan.group(1)) > MAX_DIGITS:
                raise KtapError(lineno, f"plan 1..{plan.group(1)[:20]}... out of range")
            if doc.plan is not None:
                raise KtapError(lineno, f"second plan (the first is at line {level.plan_line})")
            n = int(plan.group(1))
            if doc.results and n != len(doc.results):
                raise KtapError(lineno, f"trailing plan 1..{n} but {len(doc.results)} result(s) before it")
            doc.plan, level.plan_line = n, lineno
            comment = (plan.group(2) or "").strip()
            if comment.upper().startswith("SKIP"):
                doc.skip_reason = _skip_text(comment[4:])
        elif result:
            r = _parse_result(result, lineno)
            want = len(doc.results) + 1
            if r.number != want:
                raise KtapError(lineno, f"test number {r.number} out of sequence (expected {want})")
            if doc.plan is not None and r.number > doc.plan:
                raise KtapError(lineno, f"result {r.number} beyond the plan 1..{doc.plan}")
            r.subtests = subtests
            doc.results.append(r)
    if not stack:
        return None
    if len(stack) > 1:
        raise KtapError(stack[-1].opened_at, "subtests never closed by their parent's result line")
    return _close(stack[0])
