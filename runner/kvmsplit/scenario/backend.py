"""kvmsplit's own scenarios as a run-loop backend (runs.loop.Backend): each on
the VMM it names, kvmsplit's own on /dev/kvm or QEMU (scenario/qemu.py)."""
from __future__ import annotations

from pathlib import Path

from kvmsplit.host.changes import HostChanges
from kvmsplit.host.facts import HostFacts
from kvmsplit.runs.results import RunResult, ScenarioResult
from kvmsplit.scenario.engine import RunOptions, ScenarioRun
from kvmsplit.scenario.model import Scenario
from kvmsplit.scenario.qemu import QemuHooks, QemuScenarioRun
from kvmsplit.scenario.witness import Witness
from kvmsplit.vmm.guest.build import guest_image
from kvmsplit.vmm.kvm import Kvm


class ScenarioBackend:
    kind = "scenario"

    def __init__(self, scenarios: list[Scenario], facts: HostFacts, options: RunOptions | None = None,
                 image: Path | None = None, qemu_hooks: QemuHooks | None = None, vmm_trace: bool = False):
        self.scenarios, self.facts = scenarios, facts
        self.qemu_hooks = qemu_hooks
        self.vmm_trace = vmm_trace      # QEMU scenarios: `kvmsplit trace` attached to each QEMU
        self.options = options or RunOptions()
        self.image = image or guest_image()
        self.kvm = Kvm()
        self.witness = Witness.open(self.options.trace)

    def plan(self) -> list[tuple[str, dict]]:
        return [(s.name, s.to_dict()) for s in self.scenarios]

    def run_one(self, index: int, host: HostChanges, rr: RunResult) -> ScenarioResult:
        if self.scenarios[index].backend == "qemu":
            q = QemuScenarioRun(self.scenarios[index], self.facts, self.image, host, self.options,
                                self.witness, self.qemu_hooks, self.vmm_trace)
            rr.scenarios[index] = q.res
            return q.run()
        run = ScenarioRun(self.scenarios[index], self.facts, self.image, host, self.kvm, self.options,
                          self.witness)
        rr.scenarios[index] = run.res      # so an interrupt records the phase
        return run.run()

    def close(self) -> None:
        self.witness.close()
        self.kvm.close()
