"""The split-expectation rule table, as data: host facts x scenario -> split."""
import pytest

from kvmsplit.host.facts import HostFacts
from kvmsplit.scenario.expectation import expect
from kvmsplit.scenario.model import DirtyMode, Scenario
from kvmsplit.vmm.memory import Backing


def host(paging="tdp", tdp_mmu=True, eager=True):
    return HostFacts(paging=paging).with_params(tdp_mmu=tdp_mmu, eager_page_split=eager)


PVM = host("shadow", False, True)          # this development host
TDP = host("tdp", True, True)              # bare-metal EPT/NPT, or the nested TCG VM
OLD = host("tdp", True, None)              # kernel before eager_page_split existed

CASES = [
    # host, backing, guest page, mode, expected split, when
    (PVM, Backing.THP, "2m", DirtyMode.BITMAP, "lazy", None),
    (PVM, Backing.HUGETLB_1G, "2m", DirtyMode.RING, "lazy", None),
    (PVM, Backing.THP, "4k", DirtyMode.BITMAP, "none", None),
    (PVM, Backing.ANON, "2m", DirtyMode.BITMAP, "none", None),
    (TDP, Backing.THP, "4k", DirtyMode.BITMAP, "eager", "enable"),     # TDP ignores guest page size
    (TDP, Backing.HUGETLB_2M, "2m", DirtyMode.MANUAL, "eager", "enable"),
    (TDP, Backing.HUGETLB_2M, "2m", DirtyMode.MANUAL_INIT_SET, "eager", "first-clear"),
    (TDP, Backing.HUGETLB_2M, "2m", DirtyMode.RING_ACQ_REL, "eager", "enable"),
    (host("tdp", True, False), Backing.THP, "2m", DirtyMode.BITMAP, "lazy", None),
    (host("tdp", False, True), Backing.THP, "2m", DirtyMode.BITMAP, "lazy", None),
    (OLD, Backing.THP, "2m", DirtyMode.BITMAP, "lazy", None),
]


@pytest.mark.parametrize("facts,backing,gp,mode,split,when", CASES)
def test_rule_table(facts, backing, gp, mode, split, when):
    e = expect(Scenario("x", backing=backing, guest_page=gp, dirty_mode=mode), facts)
    assert (e.split, e.when) == (split, when)
    assert e.reason and not e.overridden


def test_override_keeps_the_host_rule_in_the_reason():
    e = expect(Scenario("x"), PVM, "eager")
    assert e.split == "eager" and e.overridden and "host rule says lazy" in e.reason
