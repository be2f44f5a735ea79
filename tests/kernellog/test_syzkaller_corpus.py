"""The report parser against syzkaller's whole Linux report corpus (issue 15).

syzbot files bugs under these titles; users compare kvmsplit's titles with
syzbot's and across nights. The corpus (see syzcorpus.py) is pinned in the
repository, so the figures are reproducible offline. The test prints them
(`pytest -s`) and fails below the goals:

  detection  files with a report (a TITLE) where the parser finds one
  exact      first title == syzkaller's TITLE, over files that are neither
             CORRUPTED (syzkaller's title is a guess there) nor SUPPRESSED
  x86 / non-x86  split by syzcorpus.NON_X86 (arm64 `Internal error`, 32-bit
             ARM backtraces, powerpc, s390, riscv layouts)
"""
from __future__ import annotations

import random
import re
from dataclasses import dataclass

import pytest
from tests.kernellog.syzcorpus import ARCHIVE, CorpusFile, load_corpus

from kvmsplit.kernellog import Report, parse_log_text, parse_reports

GOALS = {"x86": {"detection": 98.0, "exact": 90.0}, "non-x86": {"detection": 75.0, "exact": 75.0}}


@dataclass
class Figures:
    with_report: int = 0
    detected: int = 0
    compared: int = 0
    exact: int = 0

    def pct(self, part: int, whole: int) -> float:
        return 100.0 * part / whole if whole else 100.0

    @property
    def detection(self) -> float:
        return self.pct(self.detected, self.with_report)

    @property
    def exact_pct(self) -> float:
        return self.pct(self.exact, self.compared)


def titles(log: str) -> list[str]:
    return [r.title for r in parse_reports(parse_log_text(log))]


@pytest.fixture(scope="module")
def corpus() -> tuple[str, list[CorpusFile]]:
    return load_corpus()


@pytest.fixture(scope="module")
def parsed(corpus) -> dict[str, list[Report]]:
    """Each corpus file's reports, parsed once for the module."""
    return {cf.name: parse_reports(parse_log_text(cf.log)) for cf in corpus[1]}


def test_corpus_is_pinned_whole(corpus):
    commit, files = corpus
    assert re.fullmatch(r"[0-9a-f]{40}", commit)
    assert len(files) >= 700 and ARCHIVE.stat().st_size < 1_000_000
    notice = (ARCHIVE.parent.parent.parent / "LICENSES" / "other" / "Apache-2.0").read_text()
    assert "tests/kernellog/syzkaller-corpus.tar.xz" in notice


def test_titles_agree_with_syzkaller(corpus, parsed):
    _, files = corpus
    figs = {"x86": Figures(), "non-x86": Figures()}
    misses: list[str] = []
    for cf in files:
        if cf.title is None:
            continue
        fig = figs["non-x86" if cf.non_x86 else "x86"]
        got = [r.title for r in parsed[cf.name]]
        fig.with_report += 1
        fig.detected += bool(got)
        if cf.corrupted or cf.suppressed:
            continue
        fig.compared += 1
        if got and got[0] == cf.title:
            fig.exact += 1
        else:
            misses.append(f"  {cf.name}: want {cf.title!r}, got {got[0] if got else None!r}")
    for name, fig in figs.items():
        print(f"\nsyzkaller corpus, {name}: detection {fig.detected}/{fig.with_report} "
              f"= {fig.detection:.1f} %, exact titles {fig.exact}/{fig.compared} = {fig.exact_pct:.1f} %")
    print("misses:\n" + "\n".join(misses))
    for name, fig in figs.items():
        assert fig.detection >= GOALS[name]["detection"], f"{name} detection {fig.detection:.1f} %"
        assert fig.exact_pct >= GOALS[name]["exact"], f"{name} exact titles {fig.exact_pct:.1f} %"


def test_corrupted_flags_agree_with_syzkaller(corpus, parsed):
    """Not a goal of issue 15's, a floor under what was measured (92.1 %): syzkaller also
    calls reports corrupted for reasons kvmsplit does not check (e.g. a stack
    that looks like another report's), so agreement is not total."""
    _, files = corpus
    agree = total = 0
    for cf in files:
        reports = parsed[cf.name] if cf.title and not cf.suppressed else []
        if reports:
            total += 1
            agree += reports[0].corrupted == cf.corrupted
    print(f"\ncorrupted flag agrees with syzkaller's on {agree}/{total} = {100 * agree / total:.1f} %")
    assert agree / total >= 0.90


def test_no_reports_in_report_free_files(corpus, parsed):
    _, files = corpus
    free = [cf for cf in files if cf.title is None]
    assert len(free) >= 30
    found = {cf.name: [r.title for r in parsed[cf.name]] for cf in free}
    print(f"\nreport-free files: {len(free)}, with a report found: "
          f"{sum(bool(t) for t in found.values())}")
    assert {name: t for name, t in found.items() if t} == {}


_HEX = re.compile(r"(?<![0-9a-zA-Z])(?:0x)?[0-9a-f]{8,16}(?![0-9a-zA-Z])")
_STAMP = re.compile(r"\[\s*(\d+)\.(\d+)\]")
_PID = re.compile(r"((?:PID: |pid[:= ]|\[\s*T|tid=|task |Comm: syz-executor|syz\.)\s*)(\d+)")
_SECS = re.compile(r"((?:stuck for |blocked for more than )\s*)(\d+)(s| seconds)")


def another_run(log: str, rng: random.Random) -> str:
    """The same bug on another night: other pids, addresses, timestamps, stall lengths."""
    def hexnum(m: re.Match) -> str:
        text = m[0]
        digits = text[2:] if text.startswith("0x") else text
        new = "".join(rng.choice("0123456789abcdef") for _ in digits[4:])
        return text[:len(text) - len(digits)] + digits[:4] + new     # keep ffff.../0000... kind
    shift = rng.randint(1, 5000)
    log = _STAMP.sub(lambda m: f"[{int(m[1]) + shift:5d}.{m[2]}]", log)
    log = _HEX.sub(hexnum, log)
    pids: dict[str, int] = {}       # one task keeps one (new) pid through the run
    log = _PID.sub(lambda m: f"{m[1]}{pids.setdefault(m[2], rng.randint(2, 99999))}", log)
    return _SECS.sub(lambda m: f"{m[1]}{int(m[2]) + rng.randint(1, 60)}{m[3]}", log)


def test_titles_are_stable_across_runs_of_the_same_bug(corpus, parsed):
    _, files = corpus
    rng = random.Random(15)
    unstable = []
    compared = 0
    for cf in files:
        first = [r.title for r in parsed[cf.name]]
        if not first:
            continue
        compared += 1
        again = titles(another_run(cf.log, rng))
        if again != first:
            unstable.append(f"  {cf.name}: {first} != {again}")
    print(f"\ntitles compared across two runs: {compared} files, {len(unstable)} differ")
    assert not unstable, "titles differ between runs of the same bug:\n" + "\n".join(unstable[:30])


def test_another_run_really_changes_the_variable_parts():
    log = ("[  897.203644][ T1083] BUG: workqueue lockup - pool cpus=0 node=0 flags=0x0 nice=0 "
           "stuck for 32s!\n[  897.2][ T1083] CPU: 1 PID: 4070 Comm: x ffff88002bde1e40\n")
    changed = another_run(log, random.Random(1))
    assert changed != log
    for old in ("897.203644", "T1083", "PID: 4070", "stuck for 32s", "ffff88002bde1e40"):
        assert old not in changed
