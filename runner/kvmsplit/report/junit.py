"""Results as JUnit XML, in the dialect Jenkins and GitLab read (junit-10.xsd).

The classname carries the host (kvmsplit.<host>.<backing>), so the same
scenario failing on two CI machines shows as two tests, not one flaky one.
A failure's message is the kernel report title when there is one: that is
the line a KVM developer searches the lists for.
"""
from __future__ import annotations

import re
import time
import xml.etree.ElementTree as ET

from kvmsplit.kernellog import corrupted_note
from kvmsplit.runs.digest import failure_text, headline, host_name, kernel_release, kind, reports, series_label
from kvmsplit.runs.results import ERROR, FAIL, MISS, SKIP, UNCONFIRMED, RunResult, ScenarioResult

# XML 1.0 cannot carry most control characters, and kernel logs and guest
# consoles do contain them.
_NOT_XML = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\ufffe\uffff]")


def _x(text: str) -> str:
    return _NOT_XML.sub("?", text)


def _classname(rr: RunResult, sr: ScenarioResult) -> str:
    # dots separate package levels in JUnit viewers: keep the host one level
    host = host_name(rr).replace(".", "_")
    group = sr.name.split("/", 1)[0].replace(".", "_")
    prefix = "kvmsplit" if kind(sr) == "scenario" else kind(sr)
    return f"{prefix}.{host}.{group}"


def _testcase(rr: RunResult, sr: ScenarioResult, source: str) -> ET.Element:
    tc = ET.Element("testcase", name=_x(sr.name), classname=_x(_classname(rr, sr)),
                    time=f"{sr.duration_s or 0.0:.3f}")
    if sr.verdict in (FAIL, ERROR):
        el = ET.SubElement(tc, "failure" if sr.verdict == FAIL else "error",
                           message=_x(headline(sr) + corrupted_note(next(iter(reports(sr)), {}))),
                           type=sr.verdict)
        el.text = _x(failure_text(sr, source))
        if sr.console_tail:
            ET.SubElement(tc, "system-out").text = _x("\n".join(sr.console_tail))
    elif sr.verdict == UNCONFIRMED:
        # not a pass: a witness was missing (JUnit has no better word than failure)
        el = ET.SubElement(tc, "failure", message=_x("unconfirmed: " + "; ".join(sr.reasons)), type=UNCONFIRMED)
        el.text = _x(failure_text(sr, source))
    elif sr.verdict == MISS:
        ET.SubElement(tc, "error", message="never ran: the run was interrupted first", type=MISS)
    elif sr.verdict == SKIP:
        ET.SubElement(tc, "skipped", message=_x("; ".join(sr.reasons) or "skipped"))
    return tc


def junit_xml(rr: RunResult, source: str) -> str:
    c = rr.counts()
    total_s = sum(sr.duration_s or 0.0 for sr in rr.scenarios)
    attrs = {"tests": str(len(rr.scenarios)), "failures": str(c[FAIL] + c[UNCONFIRMED]),
             "errors": str(c[ERROR] + c[MISS]), "time": f"{total_s:.3f}"}
    root = ET.Element("testsuites", name="kvmsplit", **attrs)
    suite = ET.SubElement(root, "testsuite", name=f"kvmsplit on {_x(host_name(rr))}",
                          skipped=str(c[SKIP]), hostname=_x(host_name(rr)), id=rr.run_id,
                          timestamp=time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(rr.started)),
                          **attrs)
    props = ET.SubElement(suite, "properties")
    facts = {"kernel": kernel_release(rr), "kvmsplit_version": rr.kvmsplit_version,
             "run_id": rr.run_id, "interrupted": str(rr.interrupted).lower(),
             "paging": rr.host.get("virtualization", {}).get("paging", ""),
             "series": series_label(rr.series)}
    facts.update({f"series.{k}": str(v) for k, v in (rr.series or {}).items()})
    for k, v in facts.items():
        if v:
            ET.SubElement(props, "property", name=k, value=_x(v))
    for sr in rr.scenarios:
        suite.append(_testcase(rr, sr, source))
    ET.indent(root)
    return '<?xml version="1.0" encoding="UTF-8"?>\n' + ET.tostring(root, encoding="unicode") + "\n"
