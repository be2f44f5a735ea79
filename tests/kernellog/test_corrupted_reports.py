"""A corrupted report (cut off, printk messages dropped, no readable frames)
says so, with its reason, in the results model and every output that prints
report titles; its title stays the searchable one."""
from __future__ import annotations

import copy
import io
import json
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
from kcidb_io.schema import V5_3
from tests.report.samples import make_run

from kvmsplit.errors import BadInputError
from kvmsplit.kernellog import parse_log_text, parse_reports
from kvmsplit.report.html import html_report
from kvmsplit.report.junit import junit_xml
from kvmsplit.report.kcidb import kcidb_fragment
from kvmsplit.report.ktap import KtapStream
from kvmsplit.runs.results import RunResult
from kvmsplit.runs.schema import validate

CORPUS = Path(__file__).parent / "corpus"
SOURCE = "/srv/ci/run-7/results.json"


def planted_log() -> list[str]:
    text = (CORPUS / "planted-tdp-mmu-split-huge-page-6.12.log").read_text()
    return text.partition("\n\n")[2].splitlines()


def report_of(lines: list[str]):
    [rep] = parse_reports(parse_log_text("\n".join(lines)))
    return rep


def truncated_report():
    """The planted TDP MMU bug's report as a console that died two frames into the trace shows it."""
    lines = planted_log()
    trace = next(i for i, ln in enumerate(lines) if "Call Trace:" in ln)
    frames = [i for i, ln in enumerate(lines) if i > trace and "+0x" in ln and "? " not in ln]
    return report_of(lines[:frames[1] + 1])


def test_a_whole_report_is_not_corrupted():
    rep = report_of(planted_log())
    assert (rep.corrupted, rep.corrupted_reason) == (False, None)
    assert rep.title == "WARNING in tdp_mmu_split_huge_page"


def test_a_report_cut_off_in_its_call_trace_is_corrupted_and_keeps_its_title():
    rep = truncated_report()
    assert rep.corrupted and rep.corrupted_reason == "truncated: the log ends inside its call trace"
    assert rep.title == "WARNING in tdp_mmu_split_huge_page"


def test_dropped_printk_messages_make_a_report_corrupted():
    lines = planted_log()
    at = next(i for i, ln in enumerate(lines) if "Call Trace:" in ln)
    lines[at] = "** 2715 printk messages dropped ** " + lines[at]
    rep = report_of(lines)
    assert rep.corrupted and rep.corrupted_reason == "printk messages were dropped inside it"


def test_no_readable_frame_is_corrupted():
    rep = report_of(["general protection fault, probably for non-canonical address 0xdffffc0000000000: "
                     "0000 [#1] PREEMPT SMP KASAN", "Modules linked in:"])
    assert rep.title == "general protection fault in corrupted"
    assert rep.corrupted and rep.corrupted_reason == "no usable stack frame"


def run_with(rep_dict: dict) -> RunResult:
    rr = make_run()
    failing = next(sr for sr in rr.scenarios if sr.verdict == "FAIL")
    failing.kernel_log = {**(failing.kernel_log or {}), "reports": [rep_dict]}
    return rr


NOTE = " (corrupted report: truncated: the log ends inside its call trace)"


def test_results_json_carries_the_flag_and_the_schema_checks_it():
    rep = truncated_report().to_dict()
    assert rep["corrupted"] is True and rep["corrupted_reason"].startswith("truncated")
    data = json.loads(json.dumps(run_with(rep).to_dict()))
    validate(data)
    assert RunResult.from_dict(data) == run_with(rep)
    bad = copy.deepcopy(data)
    next(s for s in bad["scenarios"] if s["verdict"] == "FAIL")["kernel_log"]["reports"][0]["corrupted"] = "yes"
    with pytest.raises(BadInputError):
        validate(bad)


def test_every_output_that_prints_the_title_says_corrupted_and_why(tmp_path):
    rep = truncated_report().to_dict()
    rr = run_with(rep)
    title = "WARNING in tdp_mmu_split_huge_page"

    buf = io.StringIO()
    k = KtapStream(buf)
    k.started(rr, tmp_path)
    for i in range(len(rr.scenarios)):
        k.scenario_done(rr, i, tmp_path)
    assert f"# kernel: {title}{NOTE}" in buf.getvalue().splitlines()

    suite = ET.fromstring(junit_xml(rr, SOURCE))
    messages = [f.get("message") for f in suite.iter("failure")]
    assert f"{title}{NOTE}" in messages

    frag = json.loads(json.dumps(kcidb_fragment(rr, SOURCE)))
    V5_3.validate_exactly(frag)
    assert [i["report_subject"] for i in frag["issues"]] == [title]     # one issue per title, still
    [incident] = frag["incidents"]
    assert incident["comment"] == NOTE.strip(" ()")
    assert incident["misc"] == {"corrupted": True, "corrupted_reason": rep["corrupted_reason"]}

    assert f"kernel: {title}{NOTE}" in html_report(rr, SOURCE)


def test_outputs_of_a_whole_report_add_nothing():
    rr = run_with(report_of(planted_log()).to_dict())
    assert "corrupted" not in junit_xml(rr, SOURCE)
    frag = kcidb_fragment(rr, SOURCE)
    assert "comment" not in frag["incidents"][0]
