"""Report grouping and titling rules, on minimal hand-made logs (real reports: test_kernellog_corpus)."""
from __future__ import annotations

from kvmsplit.kernellog import parse_log_text, parse_reports


def titles(text: str) -> list[str]:
    return [r.title for r in parse_reports(parse_log_text(text))]


WARN_A = ("------------[ cut here ]------------\n"
          "WARNING: CPU: 0 PID: 1 at arch/x86/kvm/mmu/mmu.c:10 kvm_a+0x1/0x2\n"
          "Call Trace:\n kvm_caller+0x1/0x2\n")
WARN_B = ("------------[ cut here ]------------\n"
          "WARNING: CPU: 0 PID: 1 at mm/memory.c:20 mm_b+0x1/0x2\n")


def test_a_report_without_end_marker_ends_where_the_next_cut_here_begins():
    first, second = parse_reports(parse_log_text(WARN_A + WARN_B))
    assert first.raw.splitlines()[-1] == " kvm_caller+0x1/0x2"
    assert second.raw.splitlines()[0] == "------------[ cut here ]------------"
    assert (first.type, second.type) == ("KVM_WARN", "WARNING")


def test_notices_that_say_warning_or_bug_are_not_reports():
    assert titles("Speculative Return Stack Overflow: WARNING: See https://kernel.org/doc/html/"
                  "latest/admin-guide/hw-vuln/srso.html for mitigation options.\n"
                  "Spectre V2 : WARNING: Unprivileged eBPF is enabled with eIBRS on\n"
                  "WARNING: /etc/ssh/moduli does not exist, using fixed modulus\n"
                  "[Firmware Bug]: TSC doesn't count with P0 frequency!\n"
                  "PCI: Using host bridge windows from ACPI; if necessary, use \"pci=nocrs\" "
                  "and report a bug\n"
                  "traps: a.out[77] general protection fault ip:4011d6 sp:7ffc error:0 in a.out[401000+1000]\n"
                  "INFO: lockdep is turned off.\n") == []


def test_lines_that_belong_to_an_open_report_do_not_start_one():
    text = ("kernel BUG at arch/x86/kvm/mmu/mmu.c:896!\n"
            "invalid opcode: 0000 [#1] PREEMPT SMP NOPTI\n"
            "RIP: 0010:pte_list_remove+0x30/0x40\n"
            "Kernel panic - not syncing: Fatal exception\n")
    [rep] = parse_reports(parse_log_text(text))
    assert (rep.title, rep.file, rep.line) == ("kernel BUG in pte_list_remove", "arch/x86/kvm/mmu/mmu.c", 896)
    assert rep.raw.count("\n") == 3


def test_fatal_panic_rejoins_the_closed_report_but_a_lone_panic_stands_alone():
    closed = "BUG: kernel NULL pointer dereference, address: 0000000000000008\n" \
             "RIP: 0010:kvm_x+0x1/0x2\n---[ end trace 0000000000000000 ]---\n" \
             "RIP: 0010:kvm_x+0x1/0x2\nKernel panic - not syncing: Fatal exception\n"
    assert titles(closed) == ["BUG: unable to handle kernel NULL pointer dereference in kvm_x"]
    assert titles("Kernel panic - not syncing: Fatal exception\n") == ["kernel panic: Fatal exception"]
    assert titles("Kernel panic - not syncing: Attempted to kill init! exitcode=0x0000000b\n") == [
        "kernel panic: Attempted to kill init!"]


def test_unknown_bug_keeps_the_kernels_words_without_numbers():
    assert titles("BUG: frobnicator 3 lost track of page ffff88801c3e0000 (order 2)\n") == [
        "BUG: frobnicator NUM lost track of page ADDR (order NUM)"]


def test_known_messages_drop_their_variable_parts():
    """syzbot's titles for these leave out what changes from run to run."""
    assert titles("BUG: Bad rss-counter state mm:ffff88801c3e0000 type:MM_ANONPAGES val:-1\n") == [
        "BUG: Bad rss-counter state"]
    assert titles("BUG: workqueue lockup - pool cpus=0 node=0 flags=0x0 nice=0 stuck for 32s!\n") == [
        "BUG: workqueue lockup"]


def test_frames_drop_unreliable_entries_and_keep_inlined_callers():
    text = ("WARNING: CPU: 0 PID: 1 at virt/kvm/kvm_main.c:5 kvm_w+0x1/0x2 [kvm]\n"
            "Call Trace:\n"
            " <TASK>\n"
            " ? __warn+0x1/0x2\n"
            " kvm_inlined virt/kvm/kvm_main.c:7 [inline]\n"
            " kvm_outer.isra.0+0x1/0x2 [kvm]\n"
            " [<ffffffff81000000>] old_style+0x1/0x2\n"
            " decoded_frame (virt/kvm/kvm_main.c:9) kvm\n"
            " </TASK>\n"
            " not_a_frame+0x1/0x2\n")
    [rep] = parse_reports(parse_log_text(text))
    assert rep.type == "KVM_WARN" and rep.function == "kvm_w"
    # `func file:line [inline]` is a caller inlined into the next frame: syzbot names those too
    assert rep.frames == ["kvm_inlined", "kvm_outer", "old_style", "decoded_frame"]


def test_generic_frames_are_skipped_and_syscall_prefixes_stripped():
    text = ("general protection fault, probably for non-canonical address 0xdffffc0000000000: 0000 [#1]\n"
            "RIP: 0010:__list_del_entry_valid+0x1/0x2\n"
            "Call Trace:\n _raw_spin_lock+0x1/0x2\n __se_sys_mremap+0x1/0x2\n")
    assert titles(text) == ["general protection fault in mremap"]
