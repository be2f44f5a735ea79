"""`kvmsplit vm` reads the kernel-under-test's console with the follower of
`kvmsplit kernellog --follow` and says each report as it completes; what it
records for a dead VM is the same parser's, over the console's last lines
(whole: a fatal panic line that came after a report is part of it there)."""
from __future__ import annotations

from pathlib import Path

from kvmsplit.kernel.vm import _console_reports, _say_report
from kvmsplit.kernellog.follow import ReportFollower

CORPUS = Path(__file__).parent / "corpus"


def test_live_and_recorded_console_reports_have_the_same_titles():
    for path in sorted(CORPUS.glob("*.log")):
        lines = path.read_text().partition("\n\n")[2].splitlines()
        watch = ReportFollower()
        for line in lines:
            watch.feed_line(line)
        watch.finish()
        assert [r["title"] for r in _console_reports(lines)] == [r.title for r in watch.reports], path.name


def test_each_report_is_said_as_it_completes():
    said: list[str] = []
    watch = ReportFollower(_say_report(said.append))
    lines = (CORPUS / "planted-tdp-mmu-split-huge-page-6.12.log").read_text().partition("\n\n")[2].splitlines()
    for line in lines:
        watch.feed_line(line)
    watch.finish()
    assert said == ["kvmsplit vm: kernel report: WARNING in tdp_mmu_split_huge_page"]
    assert _say_report(None) is None
