"""The report parser against real kernel reports (tests/kernellog/corpus/).

Each corpus file starts with `# KEY: value` lines, then a blank line, then the
log as it was printed:
  TITLE   expected title, one line per report in log order ("none": no report)
  TYPE    expected Report.type, in the same order
  SOURCE  where the text comes from (a URL, or what constructed it)
  ORIGIN, NOTE   free text
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from tests.kernellog.syzcorpus import load_corpus

from kvmsplit.kernellog import REPORT_TYPES, parse_log_text, parse_reports

CORPUS = Path(__file__).parent / "corpus"
FILES = sorted(CORPUS.glob("*.log"))


def load(path: Path) -> tuple[dict[str, list[str]], str]:
    head, sep, body = path.read_text().partition("\n\n")
    assert sep, f"{path.name}: no blank line after the header"
    meta: dict[str, list[str]] = {}
    for line in head.splitlines():
        assert line.startswith("# ") and ": " in line, f"{path.name}: bad header line {line!r}"
        key, value = line[2:].split(": ", 1)
        meta.setdefault(key, []).append(value)
    return meta, body


def reports_of(name: str):
    return parse_reports(parse_log_text(load(CORPUS / name)[1]))


@pytest.mark.parametrize("path", FILES, ids=[p.name for p in FILES])
def test_corpus_titles_and_types(path):
    meta, body = load(path)
    assert meta.get("SOURCE"), f"{path.name} names no SOURCE"
    want = [] if meta["TITLE"] == ["none"] else meta["TITLE"]
    reports = parse_reports(parse_log_text(body))
    assert [r.title for r in reports] == want
    if "TYPE" in meta:
        assert [r.type for r in reports] == meta["TYPE"]


def test_corpus_covers_every_report_type():
    """Every type is checked against real text: here, or where syzkaller's corpus
    (test_syzkaller_corpus.py) has a report of it that gets syzkaller's exact title."""
    seen = {t for path in FILES for t in load(path)[0].get("TYPE", [])}
    for cf in load_corpus()[1]:
        reports = parse_reports(parse_log_text(cf.log)) if cf.title else []
        if reports and reports[0].title == cf.title:
            seen.add(reports[0].type)
    assert {rtype.name for rtype in REPORT_TYPES} - seen == set()


def test_corpus_has_negative_samples():
    assert sum(load(path)[0]["TITLE"] == ["none"] for path in FILES) >= 5


def test_planted_bug_fields():
    [rep] = reports_of("planted-tdp-mmu-split-huge-page-6.12.log")
    assert (rep.type, rep.file, rep.line, rep.function) == (
        "KVM_WARN", "arch/x86/kvm/mmu/tdp_mmu.c", 1366, "tdp_mmu_split_huge_page")
    # `? ` frames of the trap path are unreliable and dropped
    assert rep.frames[:7] == ["tdp_mmu_split_huge_pages_root", "kvm_tdp_mmu_try_split_huge_pages",
                              "kvm_mmu_slot_try_split_huge_pages", "kvm_arch_commit_memory_region",
                              "kvm_set_memslot", "kvm_set_memory_region", "kvm_vm_ioctl"]
    assert rep.raw.splitlines()[0].endswith("------------[ cut here ]------------")
    assert rep.raw.splitlines()[-1].endswith("---[ end trace 0000000000000000 ]---")


def test_consecutive_reports_split_at_cut_here():
    first, second = reports_of("warning-kvm-shadow-mmu-two-reports.log")
    assert "gfn mismatch under direct page" in first.raw
    assert first.raw.splitlines()[-1].endswith("---[ end trace 0000000000000000 ]---")
    assert second.raw.splitlines()[0].endswith("------------[ cut here ]------------")
    assert "no rmap for" in second.raw
    assert max(first.seqs) < min(second.seqs)
    assert (second.file, second.line) == ("arch/x86/kvm/mmu/mmu.c", 983)


def test_generic_warn_site_is_skipped_but_located():
    """The WARN fired in kernel/rcu; the title names KVM's caller, file/line the WARN site."""
    [rep] = reports_of("warning-cleanup-srcu-struct-in-kvm-put-kvm.log")
    assert rep.type == "WARNING"
    assert (rep.file, rep.line, rep.function) == ("kernel/rcu/srcutree.c", 653, "kvm_put_kvm")


def test_fatal_panic_after_end_marker_joins_the_oops():
    [rep] = reports_of("bug-paging-request-vmx-vcpu-run.log")
    lines = rep.raw.splitlines()
    assert "BUG: unable to handle page fault for address" in lines[0]
    assert any("Kernel panic - not syncing: Fatal exception" in ln for ln in lines)
    # the unrelated MSR trace logged before the oops is not part of it
    assert "unchecked MSR access error" not in rep.raw


def test_kasan_report_ends_at_its_closing_ruler():
    [rep] = reports_of("kasan-slab-use-after-free-chrdev-open.log")
    lines = rep.raw.splitlines()
    assert lines[0] == lines[-1] == "=" * 66
    assert "Freed by task 15:" in rep.raw
    # frames come from the first call trace only, not the alloc/free stacks
    assert "ntfs_alloc_inode" not in rep.frames and "chrdev_open" in rep.frames


def test_suspicious_rcu_location_comes_from_the_body():
    [rep] = reports_of("rcu-usage-gc-worker-arm64.log")
    assert (rep.file, rep.line) == ("kernel/sched/core.c", 7264)


def test_ubsan_location_and_decoded_frames():
    [rep] = reports_of("ubsan-shift-kvm-emulate-hypercall-0day.log")
    assert (rep.file, rep.line) == ("arch/x86/kvm/x86.h", 552)
    assert rep.frames[:4] == ["dump_stack_lvl", "__ubsan_handle_shift_out_of_bounds",
                              "kvm_emulate_hypercall", "vmx_handle_exit"]
    assert rep.raw.splitlines()[-1].endswith("---[ end trace ]---")


def test_report_to_dict_is_plain_data():
    [rep] = reports_of("warning-kvm-tdp-mmu-map-indented.log")
    d = json.loads(json.dumps(rep.to_dict()))
    assert d["title"] == "WARNING in kvm_tdp_mmu_map" and d["type"] == "KVM_WARN"
    assert d["seqs"] == sorted(d["seqs"])
