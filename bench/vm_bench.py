"""Boot the 6.12 build under `kvmsplit vm` and run the bench's inside part there.

kvmsplit vm runs only kvmsplit commands; the bench needs to run its own
script (inside_vm.py: dirty_log_perf_test and kvmsplit side by side, the
nested scenario, optionally the default suite), so it uses kvmsplit.kernel.vm's
boot machinery with its inner command swapped for that script. Everything
else (virtme-ng, TCG with SVM+NPT, the read-only root, the writable output
directory, the private kvmsplit cache inside, the timeout, the boot retry)
is kvmsplit vm's own.
"""
from __future__ import annotations

import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

from kvmsplit.kernel import vm as virtme
from lib import HERE, kvmsplit_env


def find_kernel(cache: Path) -> Path | None:
    """The unpatched 6.12 image `kvmsplit kernel build` cached (no patches, newest)."""
    best = None
    for info in sorted((cache / "kernel" / "images").glob("*/info.json"), key=lambda p: p.stat().st_mtime):
        try:
            d = json.loads(info.read_text())
        except (OSError, ValueError):
            continue
        if not d.get("patches") and str(d.get("release", "")).startswith("6.12"):
            best = info.parent / "bzImage"
    return best


def boot_and_measure(kernel: Path, perf_test: Path, append: str | None, inner_args: list[str],
                     timeout: float = 1800, memory: str = "4G") -> dict:
    """One boot: the VM's wall time, its boot time (vng start -> command started), and
    what inside_vm.py wrote."""
    out = Path(tempfile.mkdtemp(prefix="kvmsplit-bench-vm-"))
    script = [sys.executable, str(HERE / "inside_vm.py"), "--out", str(out), "--perf-test", str(perf_test),
              *inner_args]
    # the one change to kvmsplit vm's machinery: run the bench script, not `python -m kvmsplit ...`
    real = virtme._inner_command
    virtme._inner_command = lambda argv, outdir: script
    try:
        k = virtme.KernelUnderTest.resolve(str(kernel), None)
        t = time.monotonic()
        o = virtme.boot_and_run(k, ["kvmsplit"], out, accel=virtme.choose_accel(None), cpus=1, memory=memory,
                                timeout=timeout, append=append, boot_attempts=2,
                                echo=lambda line: print(f"  vm: {line}", file=sys.stderr, flush=True))
        wall = time.monotonic() - t
    finally:
        virtme._inner_command = real
    inside_path = out / "inside.json"
    inside = json.loads(inside_path.read_text()) if inside_path.exists() else None
    shutil.rmtree(out, ignore_errors=True)
    return {"append": append, "kernel": str(kernel), "state": str(o.state), "rc": o.rc, "release": o.release,
            "attempts": o.attempts, "boot_s": o.boot_s, "wall_s": wall, "vm_wall_s": o.wall_s,
            "detail": o.detail, "console_tail": o.console[-15:] if o.state is not virtme.VmState.DONE else [],
            "inside": inside}


def cache_root() -> Path:
    return Path(kvmsplit_env("/nonexistent")["KVMSPLIT_CACHE_DIR"])
