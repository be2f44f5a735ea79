"""KTAP, JUnit and KCIDB as their consumers read them: the JUnit against the
Jenkins schema, KCIDB against kcidb-io's, and the files a run leaves."""
import io
import json
import xml.etree.ElementTree as ET

import xmlschema
from kcidb_io.schema import V5_3
from samples import DATA, make_run

from kvmsplit.report.junit import junit_xml
from kvmsplit.report.kcidb import kcidb_fragment, kcidb_path
from kvmsplit.report.ktap import KtapStream, ktap_text
from kvmsplit.report.outputs import FileSink
from kvmsplit.selftests.ktap import parse as parse_ktap

SOURCE = "/srv/ci/run-7/results.json"
RERUN = "kvmsplit rerun /srv/ci/run-7/results.json --only thp/2m/manual"


def test_junit_validates_and_carries_host_title_excerpt_and_rerun():
    xml = junit_xml(make_run(), SOURCE)
    xmlschema.XMLSchema(DATA / "junit-10.xsd").validate(xml)
    suite = ET.fromstring(xml).find("testsuite")
    assert (suite.get("tests"), suite.get("failures"), suite.get("errors"), suite.get("skipped")) == \
        ("5", "1", "2", "1")
    cases = {c.get("name"): c for c in suite.iter("testcase")}
    assert cases["thp/2m/bitmap"].get("classname") == "kvmsplit.ci-box_example_org.thp"
    fail = cases["thp/2m/manual"].find("failure")
    assert fail.get("message") == "WARNING in kvm_mmu_split_huge_pages"
    assert "kvm_mmu_slot_try_split_huge_pages" in fail.text and RERUN in fail.text
    assert cases["thp/2m/ring"].find("error").get("type") == "ERROR"
    assert cases["anon/4k/bitmap"].find("error").get("type") == "MISS"
    assert cases["hugetlb-1g/1g/bitmap"].find("skipped") is not None


def test_kcidb_fragment_validates_with_kcidb_io():
    frag = json.loads(json.dumps(kcidb_fragment(make_run(), SOURCE)))
    V5_3.validate_exactly(frag)
    tests = {t["path"]: t for t in frag["tests"]}
    assert set(tests) == {"kvmsplit.thp.2m.bitmap", "kvmsplit.thp.2m.manual", "kvmsplit.thp.2m.ring",
                          "kvmsplit.hugetlb-1g.1g.bitmap", "kvmsplit.anon.4k.bitmap"}
    t = tests["kvmsplit.thp.2m.manual"]
    assert t["status"] == "FAIL" and "WARNING: CPU: 1" in t["log_excerpt"] and t["misc"]["rerun"] == RERUN
    assert frag["checkouts"][0]["git_commit_hash"] == "a" * 40
    assert frag["checkouts"][0]["message_id"] == "20260101.1-1-dev@example.org"
    assert [i["report_subject"] for i in frag["issues"]] == ["WARNING in kvm_mmu_split_huge_pages"]
    assert frag["incidents"][0]["test_id"] == t["id"]


def test_kcidb_paths_of_selftests_name_their_kind():
    sr = make_run().scenarios[0]
    sr.scenario = {"kind": "kselftest", "test": "x86_64/dirty_log_perf_test"}
    sr.name = "dirty_log_perf_test/-s anonymous_thp"
    assert kcidb_path(sr) == "kselftest.dirty_log_perf_test.-s_anonymous_thp"


def test_ktap():
    text = ktap_text(make_run(), SOURCE)
    # read back by the strict KTAP parser the selftests backend uses
    doc = parse_ktap(text)
    assert doc.version == "KTAP version 1" and doc.plan == 5
    assert [(r.number, r.ok, r.directive) for r in doc.results] == \
        [(1, True, None), (2, False, None), (3, False, "ERROR"), (4, True, "SKIP"), (5, False, "ERROR")]
    lines = text.splitlines()
    assert lines[0] == "KTAP version 1" and lines[2] == "1..5"
    assert "ok 1 thp/2m/bitmap" in lines
    at = lines.index("not ok 2 thp/2m/manual")
    assert lines[at - 2:at] == ["# kernel report: WARNING in kvm_mmu_split_huge_pages", f"# rerun: {RERUN}"]
    assert any(x.startswith("not ok 3 thp/2m/ring # ERROR guest hung in phase dirty-2") for x in lines)
    assert "ok 4 hugetlb-1g/1g/bitmap # SKIP KVM does not offer 1G guest pages here" in lines
    assert lines[-1].startswith("not ok 5 anon/4k/bitmap # ERROR never ran")


def test_ktap_stream_reports_every_scenario_once_even_when_interrupted(tmp_path):
    rr, buf = make_run(), io.StringIO()
    k = KtapStream(buf)
    k.started(rr, tmp_path)
    k.scenario_done(rr, 0, tmp_path)
    k.scenario_done(rr, 1, tmp_path)
    k.finished(rr, tmp_path)      # 2 was in flight, 3 and 4 never ran
    results = [x.split()[:3] for x in buf.getvalue().splitlines() if x.startswith(("ok", "not ok"))]
    assert [r[2] if r[0] == "not" else r[1] for r in results] == ["1", "2", "3", "4", "5"]


def test_file_sink_leaves_every_output(tmp_path):
    rr = make_run()
    FileSink().finished(rr, tmp_path)
    assert {p.name for p in tmp_path.iterdir()} >= {"results.ktap", "junit.xml", "kcidb.json", "kernel-log"}
    logs = sorted(p.name for p in (tmp_path / "kernel-log").iterdir())
    assert logs == ["thp_2m_manual.txt", "thp_2m_ring.txt"]
    warn = (tmp_path / "kernel-log" / "thp_2m_manual.txt").read_text()
    assert "---[ end trace 0000000000000000 ]---" in warn and "kvmsplit rerun" in warn
    hang = (tmp_path / "kernel-log" / "thp_2m_ring.txt").read_text()
    assert "no kernel report during this scenario" in hang and "@0 READY" in hang
