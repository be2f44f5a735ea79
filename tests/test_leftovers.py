"""What a kvmsplit killed outright (SIGKILL: no finally block runs) leaves
behind is put back by the next run: its trace instance and private tracefs
mount, like its hugetlb pool changes (test_hostchanges)."""
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from kvmsplit.tracing.tracefs import PRIVATE_MOUNT, leftover_instances, tracefs_mounts

pytestmark = pytest.mark.kvm


def kvmsplit_mounts():
    return [p for p in tracefs_mounts(Path("/proc/mounts").read_text()) if PRIVATE_MOUNT.match(Path(p).name)]


def test_a_killed_run_leaves_tracefs_that_the_next_run_puts_back(tmp_path):
    before = tracefs_mounts(Path("/proc/mounts").read_text())
    f = tmp_path / "s.toml"
    f.write_text('[[scenario]]\nname = "hang"\nsize = "16M"\nbacking = "anon"\nguest_page = "4k"\n')
    p = subprocess.Popen([sys.executable, "-m", "kvmsplit", "run", "-v", "--scenario", f, "-o", tmp_path / "a",
                          "--inject-hang", "dirty-1", "--phase-timeout", "60"],
                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        for line in p.stderr:
            if line.rstrip().endswith(": dirty-1"):
                break
        time.sleep(0.3)
        p.send_signal(signal.SIGKILL)
        p.wait(timeout=30)
    finally:
        if p.poll() is None:
            p.kill()
    mine = [m for m in tracefs_mounts(Path("/proc/mounts").read_text()) if m not in before]
    stale = [(m, i) for m in tracefs_mounts(Path("/proc/mounts").read_text())
             for i in leftover_instances(m) if i.startswith(f"kvmsplit-{p.pid}-")]
    assert stale, "the killed run should have left its trace instance (else this test shows nothing)"
    subprocess.run([sys.executable, "-m", "kvmsplit", "run", "--scenario", f, "-o", tmp_path / "b"],
                   capture_output=True, text=True, check=False)
    after = tracefs_mounts(Path("/proc/mounts").read_text())
    assert not [m for m in mine if m in after], "the dead run's private tracefs is still mounted"
    assert not [i for m in after for i in leftover_instances(m) if i.startswith(f"kvmsplit-{p.pid}-")]
    assert not [m for m in kvmsplit_mounts() if m not in before]
