"""What split behaviour a scenario should show on this host: one rule table.

The first rule whose condition holds decides. Each rule carries the reason,
which is printed next to the verdict: when a developer disagrees with an
expectation, the reason is what they need to see.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from kvmsplit.host.facts import HostFacts
from kvmsplit.scenario.model import DirtyMode, Scenario
from kvmsplit.vmm.memory import Backing


@dataclass(frozen=True)
class Expectation:
    split: str            # "eager", "lazy", "none" (nothing huge to split) or "kept" (nothing splits)
    when: str | None      # eager only: "enable" or "first-clear"
    reason: str
    overridden: bool = False

    def to_dict(self) -> dict:
        return {"split": self.split, "when": self.when, "reason": self.reason,
                "overridden": self.overridden}


@dataclass(frozen=True)
class Rule:
    applies: Callable[[Scenario, HostFacts], bool]
    split: str
    when: str | None
    reason: str


RULES: list[Rule] = [
    Rule(lambda s, h: s.backing is Backing.ANON, "none", None,
         "4K anonymous backing: the host has no huge pages for KVM to map huge"),
    Rule(lambda s, h: s.is_nested and s.l2_page == "4k", "none", None,
         "L1 maps L2's memory with 4K nested pages: the shadow MMU maps L2 no larger than that"),
    Rule(lambda s, h: s.is_nested and h.param("eager_page_split") is False, "lazy", None,
         "kvm.eager_page_split=N: the shadow MMU splits L2's huge mappings on L2's write faults"),
    Rule(lambda s, h: s.is_nested and h.param("tdp_mmu") is not True, "lazy", None,
         "eager splitting needs the TDP MMU on (kvm_mmu_slot_try_split_huge_pages returns early "
         "without it): the shadow MMU splits L2's huge mappings on write faults"),
    Rule(lambda s, h: s.is_nested and s.dirty_mode is DirtyMode.MANUAL_INIT_SET, "eager", "first-clear",
         "the shadow MMU splits L2's huge mappings (guest_mode shadow pages) eagerly at the first "
         "KVM_CLEAR_DIRTY_LOG with INITIALLY_SET (kvm_shadow_mmu_try_split_huge_pages)"),
    Rule(lambda s, h: s.is_nested, "eager", "enable",
         "TDP MMU with eager_page_split=Y: the shadow MMU splits L2's huge mappings (guest_mode shadow "
         "pages) eagerly when dirty logging is enabled (kvm_shadow_mmu_try_split_huge_pages)"),
    Rule(lambda s, h: h.paging == "shadow" and s.guest_page == "4k", "none", None,
         "shadow paging maps a guest page no larger than the guest's own 4K page"),
    Rule(lambda s, h: s.write_via.emulated and h.pvm and h.param("eager_page_split") is not True, "kept", None,
         "PVM emulates the CPL0 write passes: KVM's emulator writes through the host mapping "
         "(kvm_vcpu_write_guest) and never faults on the write-protected huge mappings, and eager "
         "splitting is off: nothing splits while logging"),
    Rule(lambda s, h: s.write_via.emulated and h.pvm and h.paging != "tdp", "kept", None,
         "PVM emulates the CPL0 write passes: KVM's emulator writes through the host mapping "
         "(kvm_vcpu_write_guest) and never faults on the write-protected huge mappings, and the shadow "
         "MMU does not split eagerly: nothing splits while logging"),
    Rule(lambda s, h: h.param("eager_page_split") is None, "lazy", None,
         "this kernel has no kvm.eager_page_split (before 5.18): huge pages split on write faults"),
    Rule(lambda s, h: h.param("eager_page_split") is False, "lazy", None,
         "kvm.eager_page_split=N: huge pages split on the guest's first write fault"),
    Rule(lambda s, h: h.paging == "shadow" or h.param("tdp_mmu") is False, "lazy", None,
         "eager splitting is done by the TDP MMU only; with tdp_mmu=N / shadow paging the "
         "shadow MMU splits on write faults"),
    Rule(lambda s, h: s.dirty_mode is DirtyMode.MANUAL_INIT_SET, "eager", "first-clear",
         "manual protect with KVM_DIRTY_LOG_INITIALLY_SET write-protects nothing at enable; "
         "KVM splits eagerly at the first KVM_CLEAR_DIRTY_LOG"),
    Rule(lambda s, h: True, "eager", "enable",
         "TDP MMU with eager_page_split=Y: KVM splits huge pages when dirty logging is enabled"),
]


def expect(s: Scenario, facts: HostFacts, override: str | None = None) -> Expectation:
    rule = next(r for r in RULES if r.applies(s, facts))
    forced = override or (s.expect if s.expect != "auto" else None)
    if forced and forced != rule.split:
        when = ("first-clear" if s.dirty_mode is DirtyMode.MANUAL_INIT_SET else "enable") \
            if forced == "eager" else None
        return Expectation(forced, when, f"overridden (--expect/expect={forced}); the host rule "
                           f"says {rule.split}: {rule.reason}", overridden=True)
    return Expectation(rule.split, rule.when, rule.reason)
