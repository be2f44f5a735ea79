"""`kvmsplit` exactly as the CLI runs it, with the dirty-log ioctls timed apart:
KVM_GET_DIRTY_LOG and KVM_CLEAR_DIRTY_LOG, per phase, summed into the scenario
result's `extra.bench_ioctl_s` ({"dirty-1:get": s, ...}). The engine times a
pass's harvest as a whole (ioctls and the bitmap's unpacking together); the C
test times the ioctls alone, so the side by side needs them apart. (An engine
hook would make this wrapper unnecessary: see the bench's report.)

Usage: kvmsplit_timed.py run --scenario FILE.toml --output DIR
"""
import sys
import time

from kvmsplit.cli import main
from kvmsplit.scenario import engine


def timed(name: str, key: str) -> None:
    orig = getattr(engine.ScenarioRun, name)

    def wrapper(self, *a, **kw):
        t = time.monotonic()
        try:
            return orig(self, *a, **kw)
        finally:
            acc = self.res.extra.setdefault("bench_ioctl_s", {})
            k = f"{self.cur_phase}:{key}"
            acc[k] = acc.get(k, 0.0) + time.monotonic() - t

    setattr(engine.ScenarioRun, name, wrapper)


timed("_get_log", "get")
timed("_clear_log", "clear")
sys.exit(main(sys.argv[1:]))
