"""KernelLogGuard end to end: real lines written into the real /dev/kmsg.

Root's lines get the user facility, so these guards use accept_user=True;
each test's lines carry a unique marker so that other kernel chatter (or a
concurrent test) cannot be taken for them.
"""
from __future__ import annotations

import os

import pytest

from kvmsplit.kernellog import GuardResult, KernelLogGuard
from kvmsplit.kernellog.guard import KMSG_PATH


def planted_warning(marker: str) -> list[str]:
    """The planted-bug WARN (tests/kernellog/corpus/planted-*.log), one line per record."""
    return [
        "------------[ cut here ]------------",
        f"kvmsplit test {marker}: huge SPTE split while the memslot was not dirty-logged",
        "WARNING: CPU: 1 PID: 103 at arch/x86/kvm/mmu/tdp_mmu.c:1366 tdp_mmu_split_huge_page+0x12c/0x150",
        "Modules linked in:",
        f"CPU: 1 UID: 0 PID: 103 Comm: {marker[:15]} Not tainted 6.12.57 #1",
        "RIP: 0010:tdp_mmu_split_huge_page+0x12c/0x150",
        "Call Trace:",
        " <TASK>",
        " ? __warn+0x89/0x130",
        " ? report_bug+0x16f/0x1a0",
        " tdp_mmu_split_huge_pages_root+0x2c1/0x3a0",
        " kvm_tdp_mmu_try_split_huge_pages+0x4d/0x80",
        " kvm_mmu_slot_try_split_huge_pages+0x3b/0x70",
        " kvm_arch_commit_memory_region+0x1a5/0x2a0",
        " kvm_vm_ioctl+0x64d/0x14d0",
        " </TASK>",
        "---[ end trace 0000000000000000 ]---",
    ]


def ours(res: GuardResult, marker: str):
    return [r for r in res.reports if marker in r.raw]


def kmsg_fds() -> int:
    """How many of this process's fds are open on /dev/kmsg."""
    return sum(os.path.realpath(f"/proc/self/fd/{fd}") == KMSG_PATH for fd in os.listdir("/proc/self/fd"))


def test_warning_inside_the_bracket_is_reported(kmsg, marker):
    kmsg.write([f"kvmsplit test {marker}: before start"])
    with KernelLogGuard(accept_user=True) as g:
        kmsg.write(planted_warning(marker))
    res = g.result
    assert res.checked and res.source == KMSG_PATH
    [rep] = ours(res, marker)
    assert (rep.type, rep.title) == ("KVM_WARN", "WARNING in tdp_mmu_split_huge_page")
    assert (rep.file, rep.line) == ("arch/x86/kvm/mmu/tdp_mmu.c", 1366)
    assert rep.frames == ["tdp_mmu_split_huge_pages_root", "kvm_tdp_mmu_try_split_huge_pages",
                          "kvm_mmu_slot_try_split_huge_pages", "kvm_arch_commit_memory_region",
                          "kvm_vm_ioctl"]
    assert rep.raw.splitlines()[0] == "------------[ cut here ]------------"
    assert rep.raw.splitlines()[-1] == "---[ end trace 0000000000000000 ]---"
    assert len(rep.seqs) == len(planted_warning(marker)) and rep.seqs == sorted(rep.seqs)
    # the line written before start() is not the unit's
    assert not any(f"{marker}: before start" in r.message for r in res.records)
    assert res.status == "reports" and not res.ok
    assert res.to_dict()["reports"][0]["title"] == "WARNING in tdp_mmu_split_huge_page"


def test_user_facility_lines_are_ignored_by_default(kmsg, marker):
    with KernelLogGuard() as g:
        kmsg.write(planted_warning(marker))
    res = g.result
    assert res.checked
    assert not any(marker in r.message for r in res.records)
    assert not ours(res, marker)
    assert all(r.facility == 0 for r in res.records)


def test_start_is_one_fd_and_stop_closes_it(kmsg, marker):
    before = kmsg_fds()
    g = KernelLogGuard(accept_user=True)
    g.start()
    assert kmsg_fds() == before + 1
    with pytest.raises(RuntimeError):
        g.start()
    kmsg.write([f"kvmsplit test {marker}: inside"])
    res = g.stop()
    assert kmsg_fds() == before
    assert g.stop() is res                          # a second stop() returns the same result
    assert any(f"{marker}: inside" in r.message for r in res.records)


def test_context_manager_closes_on_exception(kmsg, marker):
    before = kmsg_fds()
    g = KernelLogGuard(accept_user=True)
    with pytest.raises(ZeroDivisionError):
        with g:
            kmsg.write([f"kvmsplit test {marker}: before the error"])
            raise ZeroDivisionError
    assert kmsg_fds() == before
    assert any(marker in r.message for r in g.result.records)


def test_stop_before_start_is_an_error():
    with pytest.raises(RuntimeError):
        KernelLogGuard().stop()


def test_unreadable_kmsg_falls_back_to_dmesg(kmsg, marker, dmesg, tmp_path):
    with KernelLogGuard(accept_user=True, kmsg_path=str(tmp_path / "no-kmsg"), dmesg=dmesg) as g:
        kmsg.write(planted_warning(marker))
    res = g.result
    assert res.checked and res.source == "dmesg"
    assert "cannot read" in res.note and "read with dmesg instead" in res.note
    [rep] = ours(res, marker)
    assert rep.title == "WARNING in tdp_mmu_split_huge_page"


def test_unreadable_log_is_never_clean(tmp_path):
    g = KernelLogGuard(kmsg_path=str(tmp_path / "no-kmsg"), dmesg=str(tmp_path / "no-dmesg"))
    with g:
        pass
    res = g.result
    assert (res.checked, res.status, res.ok) == (False, "unchecked", False)
    assert "kernel log unchecked" in res.note and "cannot read" in res.note
    d = res.to_dict()
    assert (d["status"], d["checked"], d["ok"]) == ("unchecked", False, False)


def test_taint_change_is_reported(tmp_path):
    tainted = tmp_path / "tainted"
    tainted.write_text("4096\n")                   # O: an out-of-tree module
    with KernelLogGuard(taint_path=str(tainted)) as g:
        tainted.write_text(str(4096 | 512 | 128) + "\n")    # W and D appear
    res = g.result
    assert (res.taint_before, res.taint_after) == (4096, 4096 | 512 | 128)
    assert (res.taint_before_letters, res.taint_after_letters, res.new_taint) == ("O", "DWO", "DW")
    assert not res.ok
    assert res.to_dict()["new_taint"] == "DW"


def test_unreadable_taint_is_not_ok(tmp_path):
    with KernelLogGuard(taint_path=str(tmp_path / "missing")) as g:
        pass
    res = g.result
    assert res.taint_before is None and not res.ok
    assert "cannot read" in res.note
