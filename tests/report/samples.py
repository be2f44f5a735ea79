"""Results to report on without a VM: a run built here with one scenario of
every verdict (the FAIL one carrying a kernel report). data/results.json
is one captured from a real `kvmsplit run -k hugetlb-2m/2m -k thp/4k/bitmap`.

Not a conftest.py: a second module of that name would shadow
tests/conftest.py for the tests that do `from conftest import need`."""
from __future__ import annotations

from pathlib import Path

from kvmsplit.runs.results import Check, Phase, RunResult, ScenarioResult

DATA = Path(__file__).parent / "data"

WARNING = [
    "------------[ cut here ]------------",
    "WARNING: CPU: 1 PID: 4242 at arch/x86/kvm/mmu/mmu.c:6950 kvm_mmu_split_huge_pages+0x1a0/0x2c0 [kvm]",
    "Modules linked in: kvm_intel kvm",
    "CPU: 1 PID: 4242 Comm: kvmsplit Not tainted 6.18.0 #1",
    "RIP: 0010:kvm_mmu_split_huge_pages+0x1a0/0x2c0 [kvm]",
    "Call Trace:",
    " <TASK>",
    " kvm_mmu_slot_try_split_huge_pages+0x52/0x90 [kvm]",
    " kvm_vm_ioctl_clear_dirty_log+0x1c3/0x2a0 [kvm]",
    " __x64_sys_ioctl+0x8e/0xd0",
    " </TASK>",
    "---[ end trace 0000000000000000 ]---",
]


def stats(k4: int, m2: int, g1: int = 0) -> dict:
    return {"pages_4k": k4, "pages_2m": m2, "pages_1g": g1, "remote_tlb_flush": 0}


def phases(scale: float = 1.0, split: bool = True) -> list[Phase]:
    """A thp/2m run's phases: 128 2M mappings, split at enable, recovered."""
    huge, small = stats(8, 128), stats(65544, 0)
    seq = [("boot", 0.01, stats(8, 0)), ("populate", 0.30, huge),
           ("enable", 0.02, small if split else huge), ("dirty-1", 0.15, small),
           ("dirty-2", 0.14, small), ("disable", 0.01, stats(8, 0)), ("recovery", 0.05, huge),
           ("verify", 0.03, huge)]
    return [Phase(n, d * scale, d * scale * 0.8, dict(s), {"pf_taken": 10}) for n, d, s in seq]


def scenario(name: str, **params) -> dict:
    d = {"name": name, "backing": "thp", "guest_page": "2m", "size": 256 << 20, "vcpus": 1,
         "memslots": 1, "dirty_mode": "bitmap", "pattern": "seq", "percent": 100, "seed": 1,
         "passes": 2, "expect": "auto", "ring_size": 65536, "clear_chunk": 64 << 20,
         "phase_timeout": None}
    d.update(params)
    return d


def make_run(run_id: str = "20260101-000000-1", started: float = 1_767_225_600.0,
             host: str = "ci-box.example.org") -> RunResult:
    eager = {"split": "eager", "when": "enable", "reason": "TDP MMU with eager_page_split=Y",
             "overridden": False}
    ok_log = {"reports": [], "checked": True, "taint_before": 0, "taint_after": 0}
    passed = ScenarioResult(
        name="thp/2m/bitmap", scenario=scenario("thp/2m/bitmap"), verdict="PASS",
        checks=[Check("split", "pass", "eager at enable")], phases=phases(), expectation=eager,
        observed_split="eager", kernel_log=ok_log, started=started + 1, duration_s=0.71,
        dirty={"passes": [{"pass": 1, "written": 65536, "harvested": 65536, "missing": 0, "extra": 0}]})
    failing = ScenarioResult(
        name="thp/2m/manual", scenario=scenario("thp/2m/manual", dirty_mode="manual"), verdict="FAIL",
        reasons=["kernel report: WARNING in kvm_mmu_split_huge_pages"],
        checks=[Check("kernel-log", "fail", "kernel report: WARNING in kvm_mmu_split_huge_pages")],
        phases=phases(), expectation=eager, observed_split="eager", started=started + 2,
        duration_s=0.72, console_tail=["@0 READY", "@0 DONE W 0 10000"],
        kernel_log={"reports": [{"title": "WARNING in kvm_mmu_split_huge_pages",
                                 "frames": ["kvm_mmu_split_huge_pages", "kvm_mmu_slot_try_split_huge_pages",
                                            "kvm_vm_ioctl_clear_dirty_log"],
                                 "type": "WARNING", "raw": "\n".join(WARNING)}],
                    "checked": True, "taint_before": 0, "taint_after": 512})
    erred = ScenarioResult(
        name="thp/2m/ring", scenario=scenario("thp/2m/ring", dirty_mode="ring"), verdict="ERROR",
        reasons=["guest hung in phase dirty-2: guest cpu 0 did not answer within 60s"],
        phases=phases()[:5], expectation=eager, observed_split="eager", error_phase="dirty-2",
        kernel_log=ok_log, started=started + 3, duration_s=60.5, console_tail=["@0 READY"])
    one_gig = scenario("hugetlb-1g/1g/bitmap", backing="hugetlb-1g", guest_page="1g", size=1 << 30)
    skipped = ScenarioResult(name="hugetlb-1g/1g/bitmap", scenario=one_gig, verdict="SKIP",
                             reasons=["KVM does not offer 1G guest pages here"], duration_s=0.0)
    never = scenario("anon/4k/bitmap", backing="anon", guest_page="4k")
    missed = ScenarioResult(name="anon/4k/bitmap", scenario=never)
    return RunResult(
        host={"hostname": host, "kernel": {"release": "6.18.0-test", "version": "#1 SMP", "machine": "x86_64"},
              "cpu": {"vendor": "GenuineIntel", "model": "Xeon", "count": 8},
              "virtualization": {"kind": "hardware (VMX)", "paging": "tdp"},
              "kvm": {"params": {"tdp_mmu": {"value": True, "raw": "Y"},
                                 "eager_page_split": {"value": True, "raw": "Y"}}}},
        argv=["kvmsplit", "run", "-k", "thp/2m"], kvmsplit_version="0.1.0", run_id=run_id,
        started=started, finished=started + 70, interrupted=True,
        scenarios=[passed, failing, erred, skipped, missed],
        series={"name": "KVM: x86/mmu: split faster", "version": 3,
                "message_id": "<20260101.1-1-dev@example.org>", "base_commit": "a" * 40})
