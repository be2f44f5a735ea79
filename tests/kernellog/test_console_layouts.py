"""Console layouts that used to defeat the parser (issue 15): two CPUs' reports
interleaved, a prompt before the timestamp, old kernels' `Call Trace:` glued to
the line before, 32-bit ARM backtraces. The text is the planted-bug WARN and
real 32-bit ARM lines from syzkaller's corpus, rearranged as consoles print them."""
from __future__ import annotations

from tests.kernellog.test_kernellog_guard import planted_warning

from kvmsplit.kernellog import parse_log_text, parse_reports
from kvmsplit.kernellog.records import parse_kmsg_record

TITLE = "WARNING in tdp_mmu_split_huge_page"


def reports(text: str):
    return parse_reports(parse_log_text(text))


def interleaved(tags: tuple[str, str], fmt: str) -> str:
    a, b = planted_warning("firstcpu"), planted_warning("secondcpu")
    out = []
    for n, (x, y) in enumerate(zip(a, b)):
        out += [fmt.format(n=2 * n, tag=tags[0], line=x), fmt.format(n=2 * n + 1, tag=tags[1], line=y)]
    return "\n".join(out) + "\n"


def test_two_cpus_interleaved_parse_as_two_whole_reports():
    text = interleaved(("C0", "T4242"), "[  100.{n:06d}][{tag:>6}] {line}")
    first, second = reports(text)
    for rep, marker in ((first, "firstcpu"), (second, "secondcpu")):
        assert (rep.title, rep.corrupted) == (TITLE, False)
        assert rep.frames[:2] == ["tdp_mmu_split_huge_pages_root", "kvm_tdp_mmu_try_split_huge_pages"]
        assert marker in rep.raw and ("secondcpu" if marker == "firstcpu" else "firstcpu") not in rep.raw


def test_without_caller_tags_interleaving_is_flagged_corrupted():
    """The same text with the tags taken off: the parser cannot tell the CPUs apart,
    and says so for the report the other one cut into."""
    first, _ = reports(interleaved(("", ""), "[  100.{n:06d}] {line}"))
    assert first.title == TITLE and first.frames == []
    assert first.corrupted and first.corrupted_reason == "interleaved: another report began before its call trace"


def test_kmsg_records_are_separated_by_their_caller_field():
    a, b = planted_warning("firstcpu"), planted_warning("secondcpu")
    recs = []
    for n, (x, y) in enumerate(zip(a, b)):
        recs += [parse_kmsg_record(f"4,{2 * n},{n},-,caller=C1;{x}"),
                 parse_kmsg_record(f"4,{2 * n + 1},{n},-,caller=T99;{y}")]
    found = parse_reports(recs)
    assert [(r.title, r.corrupted) for r in found] == [(TITLE, False), (TITLE, False)]
    assert all(r.frames[:2] == ["tdp_mmu_split_huge_pages_root", "kvm_tdp_mmu_try_split_huge_pages"]
               for r in found)


def test_a_prompt_before_the_timestamp():
    lines = [f"[   50.{n:06d}] {ln}" for n, ln in enumerate(planted_warning("prompt"))]
    lines[2] = "syzkaller login: " + lines[2]           # the WARNING: line itself
    [rep] = reports("\n".join(lines))
    assert (rep.type, rep.title) == ("KVM_WARN", TITLE)


def test_old_kernels_call_trace_glued_to_the_line_before():
    lines = planted_warning("glued")
    at = lines.index("Call Trace:")
    lines[at - 1:at + 1] = [lines[at - 1] + " ffff88801c3e0000Call Trace:"]
    [rep] = reports("\n".join(lines))
    assert rep.frames[:2] == ["tdp_mmu_split_huge_pages_root", "kvm_tdp_mmu_try_split_huge_pages"]


def test_32bit_arm_backtrace():
    text = """\
8<--- cut here ---
Unhandled fault: page domain fault (0x01b) at 0x00000e30
Internal error: : 1b [#1] PREEMPT SMP ARM
PC is at __sanitizer_cov_trace_pc+0x4c/0x78
LR is at trace_hardirqs_off+0x6c/0x120
Backtrace:
[<802b3ffc>] (__sanitizer_cov_trace_pc) from [<802e1324>] (trace_hardirqs_off+0x6c/0x120)
[<802e12b8>] (trace_hardirqs_off) from [<80100a74>] (__dabt_svc+0x54/0xa0)
[<80100a74>] (__dabt_svc) from [<8016fb5c>] (prepare_to_wait_event+0x68/0x104)
[<8016fb5c>] (prepare_to_wait_event) from [<803b18e8>] (nfs_wait_client_init_complete.part.3+0x4c/0x84)
"""
    [rep] = reports(text)
    assert rep.title == "Unhandled fault in __dabt_svc"
    assert rep.frames == ["__sanitizer_cov_trace_pc", "trace_hardirqs_off", "__dabt_svc", "prepare_to_wait_event",
                          "nfs_wait_client_init_complete"]
