"""What the engine saw while running one scenario, as one immutable record.

The engine produces it; verdict.judge() turns it into checks and a verdict
without touching the VM, so the verdict can be tested (and re-judged) from
recorded observations alone.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from kvmsplit.runs.results import Phase


@dataclass(frozen=True)
class Observations:
    size: int                                   # bytes in the test region
    backing: str                                # the Backing's value: anon, thp, hugetlb-2m, hugetlb-1g
    phases: tuple[Phase, ...] = ()              # each with the VM's page-size stats at its end
    last_phase: str = "setup"                   # where the run stopped (or finished)
    dirty_passes: tuple[dict, ...] = ()         # per dirty pass: written, harvested, missing, extra, ...
    initially_set: dict | None = None           # manual protect: what the first KVM_GET_DIRTY_LOG held
    memory_mismatch: tuple[dict, ...] = ()      # guest writes not found in host memory
    verify: dict | None = None                  # the final read pass: vcpus, mismatch
    vm_bugged: str | None = None                # which ioctl found the VM dead, in which phase
    error: str | None = None                    # why the run could not go on (hang, guest error, ...)
    host_huge_bytes: int | None = None          # how much of the backing the host made huge
    # huge regions (2M and 1G) that dirty pass 1 wrote: what a lazy split must split
    pass1_regions: dict[str, int] = field(default_factory=dict)
    kernel_log: dict = field(default_factory=dict)
    trace_unavailable: str | None = None        # why the tracepoint witness is missing, if it is
    memory_bytes: int = 0                       # all the VM's memslots: no page count may map more
    nested: bool = False                        # the writes came from an L2: the shadow MMU maps them

    def trace(self, phase: str) -> dict | None:
        return next((p.trace for p in self.phases if p.name == phase), None)

    def stats(self, phase: str) -> dict | None:
        """The VM stats snapshot at the end of `phase`, if it completed."""
        return next((p.vm_stats for p in self.phases if p.name == phase), None)

    def vcpu_delta(self, phase: str, name: str) -> int | None:
        return next((p.vcpu_delta.get(name) for p in self.phases if p.name == phase), None)
