"""Hostile input, fuzzed with Hypothesis: every parser of user-supplied input,
through its real entry point, ends in its documented one-line error (or a
result), never a traceback.

    kernel logs        parse_log_text, parse_reports, parse_kmsg_record: KernelLogFormatError only
    KTAP, test output  ktap.parse: KtapError only; parse_assertion, parse_timings: nothing
    scenario files     model.load_file: BadInputError / NoInputError only
    the manifest       manifest.load: the same
    results.json       schema.load_results: the same
    the history        History.runs() / load(): the same, also corrupt, foreign or locked
    the CLI            one `kvmsplit: error:` line on stderr and the documented exit code

KVMSPLIT_FUZZ_EXAMPLES scales the examples per test (default 100, which keeps
the file well under a minute); `make fuzz` runs 100000. The CLI tests run a
fixed handful (KVMSPLIT_FUZZ_CLI_EXAMPLES, default 4): each one is a process.
"""
from __future__ import annotations

import copy
import json
import math
import os
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from hypothesis.configuration import set_hypothesis_home_dir

from kvmsplit.errors import (
    EXIT_BAD_INPUT,
    EXIT_FAILED,
    EXIT_NO_INPUT,
    EXIT_OK,
    EXIT_USAGE,
    BadInputError,
    NoInputError,
    UsageError,
)
from kvmsplit.kernellog import KernelLogFormatError, parse_log_text, parse_reports
from kvmsplit.kernellog.records import parse_kmsg_record
from kvmsplit.runs.history import History
from kvmsplit.runs.schema import load_results
from kvmsplit.scenario import model
from kvmsplit.selftests import ktap, manifest
from kvmsplit.selftests.parse import ASSERT_HEADER, parse_assertion, parse_timings

TESTS = Path(__file__).parent
CORPUS = sorted((TESTS / "kernellog" / "corpus").glob("*.log"))
SELFTEST_OUTPUT = sorted((TESTS / "selftests" / "data").glob("*.txt"))
RESULTS = TESTS / "report" / "data" / "results.json"

EXAMPLES = int(os.environ.get("KVMSPLIT_FUZZ_EXAMPLES", "100"))
CLI_EXAMPLES = int(os.environ.get("KVMSPLIT_FUZZ_CLI_EXAMPLES", "4"))
# Hypothesis keeps its files in ./.hypothesis; not in the checkout, and not in /tmp either:
# in the tests' own cache (conftest.py points KVMSPLIT_CACHE_DIR there)
set_hypothesis_home_dir(os.environ.get("HYPOTHESIS_STORAGE_DIRECTORY")
                        or Path(os.environ["KVMSPLIT_CACHE_DIR"]) / "hypothesis")


# The bounded run of `make test` is derandomized: CI sees the same examples every time, so a
# red CI is a regression, not a lucky draw; `make fuzz` (KVMSPLIT_FUZZ_EXAMPLES set) explores.
EXPLORE = "KVMSPLIT_FUZZ_EXAMPLES" in os.environ


def fuzz(share: float = 1.0, n: int | None = None):
    """Examples for one test: EXAMPLES scaled by its cost. No example database:
    the failing example is printed, and nothing is written into the checkout."""
    return settings(max_examples=n if n is not None else max(5, int(EXAMPLES * share)), deadline=None,
                    database=None, suppress_health_check=list(HealthCheck), derandomize=not EXPLORE)


def one_line(e: BaseException) -> None:
    msg = str(e)
    assert msg and "\n" not in msg and "\r" not in msg, f"not one line: {msg!r}"


def write(path: Path, text: str) -> None:
    """text as a file; bytes a lossy decode stood for (surrogate escapes) written back as they were."""
    try:
        path.write_bytes(text.encode("utf-8", "surrogateescape"))
    except UnicodeEncodeError:
        path.write_bytes(text.encode("utf-8", "surrogatepass"))


@pytest.fixture(scope="module")
def scratch(tmp_path_factory) -> Path:
    """A directory for the files the examples write (one file per test, rewritten)."""
    return tmp_path_factory.mktemp("fuzz")


# -- mutation of real inputs -----------------------------------------------------------------
NUMBERS = st.sampled_from(["0", "-1", "1" * 30, "9" * 5000, "²", "٣", "0x10", "1e9", "", " 7"])
JUNK = st.one_of(st.text(max_size=40), NUMBERS,
                 st.binary(max_size=40).map(lambda b: b.decode("utf-8", "surrogateescape")))


@st.composite
def mutated_lines(draw, lines: list[str], max_ops: int = 4) -> list[str]:
    """lines with a few line-level or character-level edits, as a truncated,
    spliced, garbled or hand-edited log would have them."""
    lines = list(lines)
    for _ in range(draw(st.integers(1, max_ops))):
        if not lines:
            lines = [draw(JUNK)]
        i = draw(st.integers(0, len(lines) - 1))
        j = draw(st.integers(i, min(len(lines), i + 20)))
        op = draw(st.sampled_from(["delete", "duplicate", "swap", "replace", "insert", "truncate", "indent",
                                   "garble", "digits", "cut"]))
        if op == "delete":
            del lines[i:j]
        elif op == "duplicate":
            lines[i:i] = lines[i:j]
        elif op == "swap":
            lines[i], lines[j - 1] = lines[j - 1], lines[i]
        elif op == "replace":
            lines[i] = draw(JUNK)
        elif op == "insert":
            lines.insert(i, draw(JUNK))
        elif op == "truncate":
            lines[i] = lines[i][:draw(st.integers(0, len(lines[i])))]
        elif op == "indent":
            lines[i] = draw(st.sampled_from([" ", "  ", "\t", "    "])) + lines[i]
        elif op == "garble":
            k = draw(st.integers(0, len(lines[i])))
            lines[i] = lines[i][:k] + draw(JUNK) + lines[i][k + 1:]
        elif op == "digits":       # a number swapped for a hostile one
            s = lines[i]
            at = next((k for k, c in enumerate(s) if c.isdigit()), None)
            if at is not None:
                end = at
                while end < len(s) and s[end].isdigit():
                    end += 1
                lines[i] = s[:at] + draw(NUMBERS) + s[end:]
        else:
            del lines[i + 1:]
    return lines


# -- kernel logs -----------------------------------------------------------------------------
CORPUS_TEXT = {p.name: p.read_text(errors="replace") for p in CORPUS}
CORPUS_LINES = sorted({ln for text in CORPUS_TEXT.values() for ln in text.splitlines()})


def as_kmsg(lines: list[str], flags: str = "-") -> list[str]:
    """A console log as a /dev/kmsg dump of the same messages."""
    return [f"{4 if 'WARN' in ln else 6},{n},{n * 1000},{flags};{ln}" for n, ln in enumerate(lines, 1)]


def as_dmesg_r(lines: list[str]) -> list[str]:
    return [f"<{n % 8}>[{n:>5}.{n * 7919 % 1000000:06d}] {ln}" for n, ln in enumerate(lines, 1)]


kmsg_header = st.builds(
    lambda prio, seq, ts, flags, more, msg: f"{prio},{seq},{ts},{flags}{more};{msg}",
    NUMBERS | st.integers(0, 2**70).map(str), NUMBERS | st.integers(0, 2**70).map(str),
    NUMBERS | st.integers(0, 2**70).map(str), st.sampled_from(["-", "c", "+", "", "x y"]),
    st.sampled_from(["", ",caller=T1", ",", ",a;b"]),
    st.sampled_from(CORPUS_LINES) | st.text(max_size=30) | st.just("a\\x0ab\\x5cc\\xzz"))
kmsg_continuation = st.one_of(st.builds(lambda k, v: f" {k}={v}", st.sampled_from(["SUBSYSTEM", "DEVICE", ""]),
                                        st.text(max_size=10)), st.text(max_size=10))
log_line = st.one_of(st.sampled_from(CORPUS_LINES), kmsg_header, kmsg_continuation, st.text(max_size=60))


def check_log(text: str) -> None:
    """The contract of the kernel-log parser: reports, or KernelLogFormatError."""
    try:
        records = parse_log_text(text)
    except KernelLogFormatError as e:
        one_line(e)
        return
    for r in parse_reports(records):
        assert r.title and "\n" not in r.title and len(r.title) <= 120
        assert r.seqs and all(isinstance(s, int) for s in r.seqs)
        json.dumps(r.to_dict())


@fuzz()
@given(st.text())
@example("")
@example("²,1,2,-;x")
@example("\ud800,1,2,-;x")
@example("9" * 5000 + ",1,1,-;x")
@example("[" + "1" * 5000 + ".5] WARNING: CPU: 0 PID: 1 at a/b.c:1 f+0x1/0x2")
@example("<" + "4" * 5000 + ">[1.5] x")
@example("WARNING: CPU: 0 PID: 1 at arch/x86/kvm/x86.c:" + "9" * 5000 + " f+0x1/0x2")
def test_kernel_log_text(text):
    check_log(text)


@fuzz()
@given(st.lists(log_line, max_size=40), st.sampled_from(["\n", "\r\n", "\n\n", "\x0b"]))
def test_kernel_log_shaped_text(lines, sep):
    check_log(sep.join(lines))


@fuzz(2)
@given(st.data())
def test_kernel_log_corpus_mutated(data):
    name = data.draw(st.sampled_from(sorted(CORPUS_TEXT)), label="corpus log")
    lines = CORPUS_TEXT[name].splitlines()
    form = data.draw(st.sampled_from(["as is", "kmsg", "dmesg -r"]), label="form")
    lines = as_kmsg(lines) if form == "kmsg" else as_dmesg_r(lines) if form == "dmesg -r" else lines
    check_log("\n".join(data.draw(mutated_lines(lines), label="mutated")))


@fuzz()
@given(st.binary(max_size=300))
@example(b"6,1,2,-;\xff\xfe\\xff\n KEY=\xff")
def test_kernel_log_bytes(raw):
    check_log(raw.decode("utf-8", "replace"))              # as `kvmsplit kernellog FILE` reads it
    check_log(raw.decode("utf-8", "surrogateescape"))      # as stdin does in a C locale


@fuzz()
@given(st.one_of(st.binary(max_size=200), st.text(max_size=200),
                 st.builds(lambda h, c: "\n".join([h, *c]), kmsg_header, st.lists(kmsg_continuation, max_size=3)),
                 st.builds(lambda h, b: h.encode("utf-8", "surrogatepass") + b, kmsg_header, st.binary(max_size=30))))
@example("\ud800,1,2,-;x")
@example("6,1,2,-;\udcff")
@example(b"6,1,2,-;\\x00\\x5c")
@example("6,1,2,-;x\n" + "9" * 5000)
def test_kmsg_record(data):
    try:
        rec = parse_kmsg_record(data)
    except KernelLogFormatError as e:
        one_line(e)
        return
    assert rec.prio is not None and rec.prio >= 0 and rec.seq >= 0 and rec.ts_us is not None


# -- KTAP and the selftests' own output ----------------------------------------------------------
SELFTEST_LINES = sorted({ln for p in SELFTEST_OUTPUT for ln in p.read_text(errors="replace").splitlines()})
ktap_number = st.integers(0, 6).map(str) | NUMBERS
ktap_line = st.one_of(
    st.sampled_from(["KTAP version 1", "TAP version 13", "KTAP version x", "TAP version 14 extra", ASSERT_HEADER]),
    st.builds(lambda n, c: f"1..{n}{c}", ktap_number, st.sampled_from(["", " # SKIP why", " # skip - x", " #"])),
    st.builds(lambda ok, n, d, c: f"{ok} {n} {d}{c}", st.sampled_from(["ok", "not ok", "ok", "okay"]), ktap_number,
              st.text(max_size=8), st.sampled_from(["", " # SKIP - why", " # TODO", " # XFAIL x", " #", " # ERROR"])),
    st.builds(lambda t: "# " + t, st.text(max_size=10)),
    st.sampled_from(SELFTEST_LINES), st.text(max_size=30))
indent = st.integers(0, 4).map(lambda n: "  " * n) | st.sampled_from([" ", "   ", "\t"])


def check_ktap(text: str) -> None:
    try:
        doc = ktap.parse(text)
    except ktap.KtapError as e:
        one_line(e)
        assert e.line >= 1
        return
    if doc is not None:             # what selftests/verdict.py does with it
        doc.failures()
        doc.skips()
        json.dumps(doc.to_dict())


def check_selftest_output(text: str) -> None:
    a = parse_assertion(text)
    if a is not None:
        a.summary()
        json.dumps(a.to_dict())
    for phase in parse_timings(text):
        assert phase.name is not None and phase.duration_s >= 0


@fuzz()
@given(st.text())
@example("1..²")
@example("ok " + "1" * 5000)
@example("1.." + "1" * 5000)
@example("\n".join("  " * i + "KTAP version 1" for i in range(200)))
def test_ktap_text(text):
    check_ktap(text)
    check_selftest_output(text)


@fuzz()
@given(st.lists(st.tuples(indent, ktap_line), max_size=30))
def test_ktap_shaped_text(lines):
    text = "\n".join(i + ln for i, ln in lines)
    check_ktap(text)
    check_selftest_output(text)


@fuzz()
@given(st.data())
def test_selftest_output_mutated(data):
    p = data.draw(st.sampled_from(SELFTEST_OUTPUT), label="selftest output")
    text = "\n".join(data.draw(mutated_lines(p.read_text(errors="replace").splitlines()), label="mutated"))
    check_ktap(text)
    check_selftest_output(text)


assertion_line = st.one_of(
    st.builds(lambda f, n, e: f"  {f}:{n}: {e}", st.sampled_from(["x.c", "a:b.c", ""]), ktap_number,
              st.text(max_size=8)),
    st.builds(lambda p, e: f"  pid={p} tid={p} errno={e} - why", ktap_number,
              st.sampled_from(["-1", "4", "9" * 5000])),
    st.builds(lambda n, a: f"     {n}\t{a} run_test at x.c:1", ktap_number,
              st.sampled_from(["0x1:", "(inlined by)", "zz"])),
    st.builds(lambda label, s: f"{label}: {s}s",
              st.sampled_from(["Populate memory time", "Iteration 1 dirty memory time", "x", ""]),
              st.sampled_from(["0.1", "9" * 5000 + ".5", "1"])),
    st.sampled_from([ASSERT_HEADER, "  ", "  message"]), st.text(max_size=20))


@fuzz()
@given(st.lists(assertion_line, max_size=15))
@example([ASSERT_HEADER, "  x.c:" + "9" * 5000 + ": e", "  pid=1 tid=1 errno=" + "9" * 5000 + " - x"])
def test_assertion_shaped_text(lines):
    check_selftest_output("\n".join(lines))


@st.composite
def ktap_tree(draw, depth: int = 0) -> list:
    """[(ok, directive, children)]: a well-formed KTAP document, as a tree."""
    n = draw(st.integers(0 if depth else 1, 3))
    return [(draw(st.booleans()), draw(st.sampled_from([None, "SKIP", "TODO"])),
             draw(ktap_tree(depth + 1)) if depth < 3 and draw(st.booleans()) else []) for _ in range(n)]


def render_ktap(tree: list, depth: int = 0) -> list[str]:
    pad = "  " * depth
    out = [f"{pad}KTAP version 1", f"{pad}1..{len(tree)}"]
    for i, (ok, directive, children) in enumerate(tree, 1):
        if children:
            out += render_ktap(children, depth + 1)
        out.append(f"{pad}{'ok' if ok else 'not ok'} {i} t{i}" + (f" # {directive} why" if directive else ""))
    return out


@fuzz()
@given(ktap_tree(), st.lists(st.text(st.characters(exclude_characters="\n\r\x0b\x0c\x1c\x1d\x1e\x85\u2028\u2029"),
                                     min_size=1, max_size=20).filter(lambda s: s.strip()[:1] not in "#okn1KT"),
                             max_size=3))
def test_well_formed_ktap_still_parses(tree, noise):
    """The limits added for hostile input refuse nothing a real test prints."""
    doc = ktap.parse("\n".join([*noise, *render_ktap(tree)]))
    assert doc is not None and [r.ok for r in doc.results] == [ok for ok, _, _ in tree]


# -- TOML: scenario files and the manifest -----------------------------------------------------------
def toml_str(s: str) -> str:
    return '"' + "".join(f"\\u{ord(c):04x}" if ord(c) < 0x20 or ord(c) == 0x7f else "\\" + c if c in '"\\' else c
                         for c in s) + '"'


def toml_value(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        return "nan" if math.isnan(v) else ("inf" if v > 0 else "-inf") if math.isinf(v) else repr(v)
    if isinstance(v, str):
        return toml_str(v)
    if isinstance(v, list):
        return "[" + ", ".join(map(toml_value, v)) + "]"
    return "{" + ", ".join(f"{toml_str(k)} = {toml_value(x)}" for k, x in v.items()) + "}"


def toml_doc(doc: dict) -> str:
    """doc as TOML; tables of tables in the [x] / [[x]] form, the rest inline."""
    out = [f"{toml_str(k)} = {toml_value(v)}" for k, v in doc.items()
           if not isinstance(v, dict) and not (isinstance(v, list) and v and all(isinstance(x, dict) for x in v))]
    for k, v in doc.items():
        for table, header in ([(v, f"[{toml_str(k)}]")] if isinstance(v, dict) else
                              [(x, f"[[{toml_str(k)}]]") for x in v] if isinstance(v, list) and v
                              and all(isinstance(x, dict) for x in v) else []):
            out += ["", header, *(f"{toml_str(kk)} = {toml_value(vv)}" for kk, vv in table.items())]
    return "\n".join(out) + "\n"


text_chars = st.text(st.characters(exclude_categories=["Cs"]), max_size=12)
scalar = st.one_of(st.booleans(), st.integers(), st.sampled_from([0, -1, 1, 64, 65, 10**9, 2**63, 2**64, -2**63]),
                   st.floats(), text_chars)
anything = st.recursive(scalar, lambda c: st.lists(c, max_size=3) | st.dictionaries(text_chars, c, max_size=3),
                        max_leaves=6)
sizes = st.one_of(st.sampled_from(["0", "-1M", "4k", "4K", "2M", "16M", "256M", "1G", "512G", "513G", "1T", "99999T",
                                   "9" * 30 + "T", "1.5G", "", "G", " 16 MiB ", "0x10", "16MB"]),
                  st.sampled_from([0, -1, 4096, 2 << 20, 10**9, 2**63, 2**70]))


def choice(*values):
    return st.sampled_from(values) | anything


SCENARIO_FIELDS = {
    "name": choice("a", "", "b", "a\nb", "x/y"), "backing": choice(*[b.value for b in model.Backing], "hugetlb"),
    "guest_page": choice("4k", "2m", "1g", "2M"), "size": sizes | anything,
    "vcpus": choice(0, 1, 2, 64, 65, 10**9, -1), "memslots": choice(0, 1, 2, 256, 257),
    "dirty_mode": choice(*[m.value for m in model.DirtyMode]), "pattern": choice("seq", "random"),
    "percent": choice(0, 1, 50, 100, 101), "seed": choice(0, 1, 2**63 - 1, 2**63, -1),
    "passes": choice(0, 1, 1000, 1001), "expect": choice(*model.EXPECTATIONS), "ring_size": sizes | anything,
    "clear_chunk": sizes | anything, "phase_timeout": choice(0, -1.0, 1e308, math.inf, math.nan, 10),
    "nested": choice(*model.NESTED), "l2_page": choice("4k", "2m", "1g"),
}
scenario_table = st.fixed_dictionaries({}, optional={**SCENARIO_FIELDS, "sise": anything, "": anything})


@st.composite
def toml_text(draw, doc) -> str:
    """A generated document as TOML, now and then garbled (then mostly not TOML at all)."""
    text = toml_doc(draw(doc))
    if draw(st.integers(0, 9)) == 0:
        text = "\n".join(draw(mutated_lines(text.splitlines(), max_ops=2)))
    return text


scenario_doc = st.fixed_dictionaries(
    {"scenario": st.lists(scenario_table | anything, max_size=3) | anything},
    optional={"defaults": scenario_table | anything, "other": anything})
ALLOWED = (BadInputError, NoInputError)


def load_or_refuse(load, path: Path):
    try:
        return load(path)
    except ALLOWED as e:
        one_line(e)
        return None


@fuzz(0.5)
@given(toml_text(scenario_doc))
@example('scenario = [1]\n')
@example('defaults = 1\n[[scenario]]\nname = "a"\n')
@example('[[scenario]]\nname = "a"\nguest_page = []\n')
@example('[[scenario]]\nname = "a"\npattern = {}\n')
@example('[[scenario]]\nname = []\n[[scenario]]\nname = []\n')
@example('[[scenario]]\nname = "a"\nsize = 1' + "0" * 5000 + '\n')
@example('[[scenario]]\nname = "a"\nsize = "1' + "0" * 5000 + 'G"\n')
@example('[[scenario]]\nname = "a"\nvcpus = 1000000000\n')
@example('[[scenario]]\nname = "a\\nb"\npercent = 0\n')
@example('[[scenario]]\n"bad\\nkey" = 1\nname = "a"\n')
@example('x = ' + "[" * 2000 + "]" * 2000 + "\n")
def test_scenario_file(scratch, text):
    f = scratch / "scenario.toml"
    write(f, text)
    for s in load_or_refuse(model.load_file, f) or []:
        assert isinstance(s, model.Scenario)
        s.to_dict()


def test_scenario_file_not_utf8_or_missing(scratch):
    f = scratch / "latin1.toml"
    f.write_bytes('[[scenario]]\nname = "caf\xe9"\n'.encode("latin-1"))
    with pytest.raises(BadInputError, match="not UTF-8"):
        model.load_file(f)
    with pytest.raises(NoInputError):
        model.load_file(scratch / "nothing.toml")
    with pytest.raises(NoInputError):
        model.load_file(scratch)


MANIFEST_FIELDS = {
    "test": choice("dirty_log_perf_test", "x86_64/vmx_dirty_log_test", "../up", "/abs", "a b", ""),
    "about": choice("why"), "args": choice(["-i", "2"], [1, True], [2**70], []),
    "timeout": choice(0, -1, 1, 60.5, math.inf, math.nan, 1e308, True, "60"),
    "requires": choice([*manifest.REQUIREMENTS][:3], ["nope"], []),
    "hugepages": choice({"2M": 40}, {"1G": 0}, {"4K": 1}, {"2M": True}, {"2M": 2**70}),
    "matrix": choice({"-s": ["anonymous", "anonymous_thp"], "-g": [False, True]}, {"s": [1]}, {"-x": []},
                     {"-y": [1.5]}, {f"-{c}": [1, 2] for c in "abcdefghijklmn"}),
}
manifest_doc = st.fixed_dictionaries(
    {"test": st.lists(st.fixed_dictionaries({}, optional={**MANIFEST_FIELDS, "colour": anything}) | anything,
                      max_size=3) | anything},
    optional={"defaults": st.fixed_dictionaries({}, optional={"timeout": MANIFEST_FIELDS["timeout"],
                                                               "x": anything}) | anything, "tests": anything})


@fuzz(0.5)
@given(toml_text(manifest_doc))
@example('test = [1]\n')
@example('[[test]]\ntest = "t"\ntimeout = nan\n')
@example('[[test]]\ntest = "t"\ntimeout = 1\n[test.matrix]\n' + "".join(f'"-{c}" = [1, 2]\n' for c in "abcdefghijklmn"))
@example('[[test]]\n"a\\nb" = 1\n')
def test_manifest(scratch, text):
    f = scratch / "manifest.toml"
    write(f, text)
    for case in load_or_refuse(manifest.load, f) or []:
        json.dumps(case.to_dict())


# -- results.json ----------------------------------------------------------------------------------
RESULTS_TEXT = RESULTS.read_text()
RESULTS_DOC = json.loads(RESULTS_TEXT)


def json_paths(obj, prefix: tuple = ()) -> list[tuple]:
    out = [prefix]
    if isinstance(obj, dict):
        for k, v in obj.items():
            out += json_paths(v, (*prefix, k))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            out += json_paths(v, (*prefix, i))
    return out


RESULTS_PATHS = json_paths(RESULTS_DOC)[1:]
json_value = st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=10),
                          lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=6), c, max_size=3),
                          max_leaves=8)


@st.composite
def mutated_results(draw) -> str:
    """The real results.json with a few values replaced, retyped, removed or added."""
    doc = copy.deepcopy(RESULTS_DOC)
    for _ in range(draw(st.integers(1, 3))):
        path = draw(st.sampled_from(RESULTS_PATHS))
        parent = doc
        try:
            for key in path[:-1]:
                parent = parent[key]
            old = parent[path[-1]]
        except (KeyError, IndexError, TypeError):
            continue            # an earlier mutation took it away
        op = draw(st.sampled_from(["replace", "retype", "delete", "add"]))
        if op == "replace":
            parent[path[-1]] = draw(json_value)
        elif op == "retype":
            parent[path[-1]] = draw(st.sampled_from([str(old), [old], {"x": old}, None, -1, 10**30, 1e308,
                                                     math.nan, "", True]))
        elif op == "delete":
            del parent[path[-1]]
        elif isinstance(parent, dict):
            parent[draw(st.text(max_size=6))] = draw(json_value)
        else:
            parent.insert(path[-1], draw(json_value))
    text = json.dumps(doc)
    if draw(st.integers(0, 4)) == 0:            # and now and then a damaged file
        text = "\n".join(draw(mutated_lines(json.dumps(doc, indent=1).splitlines(), max_ops=2)))
    return text


@fuzz(0.5)
@given(st.one_of(mutated_results(), json_value.map(json.dumps), st.text(),
                 st.builds(lambda d: json.dumps({**RESULTS_DOC, **d}),
                           st.dictionaries(st.sampled_from(sorted(RESULTS_DOC)), json_value, max_size=2))))
@example(RESULTS_TEXT)
@example("[" * 100000)
@example("[" * 900 + "]" * 900)
@example('{"scenarios": ' + "[" * 900 + "]" * 900 + "}")
@example("9" * 5000)
@example('{"host": {"kernel": {"release": "x"}}, "argv": [], "kvmsplit_version": "x", "schema_version": 2, '
         '"run_id": "x", "started": NaN, "scenarios": []}')
def test_results_json(scratch, text):
    f = scratch / "results.json"
    write(f, text)
    rr = load_or_refuse(load_results, f)
    if rr is not None:
        rr.exit_code()


@fuzz(0.2)
@given(st.binary(max_size=200))
@example(b"\xff{}")
def test_results_json_bytes(scratch, raw):
    f = scratch / "results.bin.json"
    f.write_bytes(raw)
    load_or_refuse(load_results, f)


# -- the history database -------------------------------------------------------------------
@pytest.fixture(scope="module")
def real_db(scratch) -> bytes:
    """A history holding two real runs, as bytes."""
    db = scratch / "real.sqlite"
    h = History(db)
    rr = load_results(RESULTS)
    h.add_run(rr)
    rr.run_id, rr.series = "second", {"name": "x", "version": 2}
    h.add_run(rr)
    return db.read_bytes()


def open_history(path: Path, timeout: float = 1.0) -> None:
    """What `kvmsplit history`, report and rerun do with it."""
    h = History(path, timeout=timeout)
    for call in (h.runs, lambda: h.load(1), lambda: h.find("second")):
        try:
            call()
        except ALLOWED as e:
            one_line(e)


def fresh(path: Path, content: bytes) -> Path:
    for leftover in path.parent.glob(path.name + "-*"):      # a journal of the example before
        leftover.unlink()
    path.write_bytes(content)
    return path


@fuzz(0.3)
@given(st.binary(max_size=2048))
@example(b"")
@example(b"SQLite format 3\x00" + b"\x00" * 200)
def test_history_random_bytes(scratch, raw):
    open_history(fresh(scratch / "random.sqlite", raw))


@fuzz(0.3)
@given(st.data())
def test_history_damaged(scratch, real_db, data):
    raw = bytearray(real_db)
    if data.draw(st.booleans(), label="truncate"):
        raw = raw[:data.draw(st.integers(0, len(raw)), label="length")]
    for at, byte in data.draw(st.lists(st.tuples(st.integers(0, max(len(raw) - 1, 0)), st.integers(0, 255)),
                                       max_size=8), label="flips"):
        if raw:
            raw[at] = byte
    open_history(fresh(scratch / "damaged.sqlite", bytes(raw)))


stored = st.one_of(st.none(), st.integers(-2**63, 2**63 - 1), st.floats(), st.binary(max_size=20), st.text(max_size=20),
                   json_value.map(json.dumps), st.sampled_from(["[" * 5000, "9" * 5000, "{}", "[]", '{"x": 1}']))


@fuzz(0.3)
@given(st.sampled_from([("runs", "run"), ("runs", "series"), ("scenarios", "result"), ("runs", "started"),
                        ("scenarios", "verdict"), ("runs", "interrupted")]), stored)
def test_history_garbled_columns(scratch, real_db, column, value):
    db = fresh(scratch / "garbled.sqlite", real_db)
    with sqlite3.connect(db) as c:
        try:
            c.execute(f"UPDATE {column[0]} SET {column[1]} = ?", (value,))
        except sqlite3.IntegrityError:      # NOT NULL: this layout cannot hold it
            return
    c.close()
    open_history(db)


@fuzz(0.3)
@given(st.lists(st.tuples(st.sampled_from(["runs", "scenarios", "phases", "t", "x y"]),
                          st.lists(st.sampled_from(["id", "run", "idx", "result", "a"]), min_size=1, max_size=3,
                                   unique=True)), max_size=3, unique_by=lambda t: t[0]),
       st.sampled_from([0, 1, 2, 3, -1, 2**31 - 1]))
def test_history_foreign_sqlite(scratch, tables, version):
    db = fresh(scratch / "foreign.sqlite", b"")
    with sqlite3.connect(db) as c:
        for name, columns in tables:
            c.execute(f'CREATE TABLE "{name}" ({", ".join(columns)})')
            c.execute(f'INSERT INTO "{name}" VALUES ({", ".join("?" * len(columns))})', [1] * len(columns))
        c.execute(f"PRAGMA user_version = {version}")
    c.close()
    open_history(db)


def test_a_locked_history_fails_in_bounded_time(scratch, real_db, monkeypatch):
    db = fresh(scratch / "locked.sqlite", real_db)
    holder = sqlite3.connect(db, isolation_level=None)
    holder.execute("BEGIN EXCLUSIVE")
    try:
        for h in (History(db, timeout=0.2), History(db, timeout=0)):
            t0 = time.monotonic()
            with pytest.raises(BadInputError, match="locked by another process") as e:
                h.runs()
            one_line(e.value)
            assert time.monotonic() - t0 < 5
        monkeypatch.setenv("KVMSPLIT_DB_TIMEOUT", "0.1")
        assert History(db).timeout == 0.1
        with pytest.raises(BadInputError, match="locked"):
            History(db).load(1)
        r = kvmsplit("history", "--db", db, env={"KVMSPLIT_DB_TIMEOUT": "0.1"})
        assert_one_error(r, EXIT_BAD_INPUT)
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    assert [r.id for r in History(db).runs()] == [2, 1]


@pytest.mark.parametrize("value", ["x", "-1", "inf", "nan"])
def test_a_bad_db_timeout_is_a_usage_error(monkeypatch, value):
    monkeypatch.setenv("KVMSPLIT_DB_TIMEOUT", value)
    with pytest.raises(UsageError, match="KVMSPLIT_DB_TIMEOUT"):
        History("unused.sqlite")


# -- the command line, end to end -------------------------------------------------------------
def kvmsplit(*args, env=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "kvmsplit", *map(str, args)], capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, timeout=120)


def assert_one_error(r: subprocess.CompletedProcess, code: int) -> None:
    assert "Traceback" not in r.stderr, r.stderr
    assert r.returncode == code and r.stderr.startswith("kvmsplit: error: ") and r.stderr.count("\n") == 1, \
        (r.returncode, r.stderr)


@fuzz(n=CLI_EXAMPLES)
@given(st.builds(lambda h, tail: h.encode("utf-8", "surrogatepass") + b"\n" + tail,
                 kmsg_header, st.binary(max_size=100)))
@example(b"6,1,2,-;x\nnot a continuation")
@example(b"6,\xb2,2,-;x")
@example(b"6,1,2,-;ok\n\xff\xfe")
def test_cli_kernellog(scratch, raw):
    f = scratch / "cli.log"
    f.write_bytes(raw)
    r = kvmsplit("kernellog", f)
    if r.returncode in (EXIT_OK, EXIT_FAILED):         # it parsed: no reports, or some
        assert r.stderr == "" and r.stdout.endswith(f"report(s) in {f}\n")
    else:
        assert_one_error(r, EXIT_BAD_INPUT)


def test_cli_missing_inputs(scratch):
    assert_one_error(kvmsplit("kernellog", scratch / "nothing.log"), EXIT_NO_INPUT)
    assert_one_error(kvmsplit("list", "--scenario", scratch / "nothing.toml"), EXIT_NO_INPUT)
    assert_one_error(kvmsplit("report", scratch / "nothing.json"), EXIT_NO_INPUT)


# Each of these is refused before anything touches the host.
BAD_SCENARIO = st.sampled_from([("percent", 0), ("vcpus", 0), ("vcpus", 10**9), ("size", "0"), ("size", -1),
                                ("size", "99999T"), ("memslots", 0), ("passes", "2"), ("backing", 1),
                                ("sise", "1G"), ("seed", -1), ("ring_size", 3)])


@fuzz(n=CLI_EXAMPLES)
@given(BAD_SCENARIO, st.fixed_dictionaries({}, optional={k: SCENARIO_FIELDS[k] for k in ("pattern", "expect")}))
@example(("percent", 0), {})
@example(("name", "a\nb"), {"percent": 0})
def test_cli_list_scenario(scratch, bad, rest):
    f = scratch / "cli.toml"
    f.write_text(toml_doc({"scenario": [{"name": "s", **rest, bad[0]: bad[1]}]}))
    assert_one_error(kvmsplit("list", "--scenario", f), EXIT_BAD_INPUT)


@fuzz(n=CLI_EXAMPLES)
@given(st.one_of(st.integers(1, len(RESULTS_TEXT) - 2).map(lambda n: RESULTS_TEXT[:n]),
                 st.sampled_from(["started", "scenarios", "host", "argv"]).map(
                     lambda k: json.dumps({**RESULTS_DOC, k: "wrong"}))))
@example("{}")
@example("[" * 100000)
def test_cli_report(scratch, text):
    f = scratch / "cli-results.json"
    write(f, text)
    assert_one_error(kvmsplit("report", f, "--output", scratch / "cli.html"), EXIT_BAD_INPUT)


def test_cli_usage_exit_code():
    r = kvmsplit("history", "--db", "x.sqlite", env={"KVMSPLIT_DB_TIMEOUT": "soon"})
    assert_one_error(r, EXIT_USAGE)


def test_a_history_row_whose_check_status_was_garbled_is_one_line(scratch, real_db):
    """Found by test_history_damaged: a byte flip turned a check's "pass" into " ass", which the
    schema let through and the model refused with a traceback."""
    db = fresh(scratch / "status.sqlite", real_db)
    with sqlite3.connect(db) as c:
        c.execute("""UPDATE scenarios SET result = replace(result, '"status": "pass"', '"status": " ass"')""")
    c.close()
    open_history(db)
