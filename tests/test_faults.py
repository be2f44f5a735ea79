"""Real signals on real runs, landing in each phase of a scenario (the guest
is made to spin in that phase so the signal finds it there). After each:
finished scenarios are in results.json and in the history, the hugetlb pool
is back (after SIGKILL: given back by the next run, from the journal), no
trace instance or private tracefs is left, and the next run works."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from kvmsplit.runs.history import History
from kvmsplit.tracing.tracefs import leftover_instances, tracefs_mounts

pytestmark = pytest.mark.kvm
POOL = Path("/sys/kernel/mm/hugepages/hugepages-2048kB/nr_hugepages")
PHASES = ("populate", "dirty-1", "recovery", "verify")
SCENARIOS = ('[defaults]\nbacking = "hugetlb-2m"\nguest_page = "2m"\nsize = "16M"\npasses = 1\n\n'
             '[[scenario]]\nname = "first"\n\n[[scenario]]\nname = "second"\n')


def kvmsplit(*args, **kw):
    return [sys.executable, "-m", "kvmsplit", *map(str, args)]


def leftovers(pid):
    mounts = tracefs_mounts(Path("/proc/mounts").read_text())
    return [i for m in mounts for i in leftover_instances(m) if i.startswith(f"kvmsplit-{pid}-")] + \
        [m for m in mounts if f"kvmsplit-tracefs-{pid}-" in m]


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM, signal.SIGKILL], ids=lambda s: s.name)
@pytest.mark.parametrize("phase", PHASES)
def test_a_signal_in_any_phase_keeps_results_and_leaves_the_host_as_it_was(tmp_path, sig, phase):
    f = tmp_path / "s.toml"
    f.write_text(SCENARIOS)
    db, out = tmp_path / "h.sqlite", tmp_path / "out"
    before = POOL.read_text()
    # every guest spins in `phase`: "first" times out there (an ERROR that finished), and the
    # signal lands while "second" spins in the same phase
    p = subprocess.Popen(kvmsplit("run", "-v", "--scenario", f, "-o", out, "--db", db, "--inject-hang", phase,
                                  "--phase-timeout", "3"), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                         text=True)
    try:
        for line in p.stderr:
            if line.rstrip().endswith(f"second: {phase}"):
                break
        time.sleep(0.3)
        p.send_signal(sig)
        rest = p.communicate(timeout=60)[1]
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    assert p.returncode == (-signal.SIGKILL if sig == signal.SIGKILL else 130), rest
    first, second = json.loads((out / "results.json").read_text())["scenarios"]
    assert first["verdict"] == "ERROR" and first["reasons"][0].startswith(f"guest hung in phase {phase}")
    [row] = History(db).runs()
    assert History(db).load(row.id).scenarios[0].verdict == "ERROR"       # the finished one is in the history
    if sig == signal.SIGKILL:
        assert second["verdict"] == "MISS"          # nothing could write more
        # the next run gives back what the killed one added, and removes its trace instance
        again = subprocess.run(kvmsplit("run", "--scenario", f, "-o", tmp_path / "again", "--db", db),
                               capture_output=True, text=True, timeout=120)
        assert again.returncode == 0, again.stderr
        assert "gave back what an interrupted run left" in again.stderr
    else:
        assert second["verdict"] == "ERROR" and second["reasons"] == [f"interrupted in phase {phase}"]
        assert "host restored: hugetlb hugepages-2048kB pool" in rest
        assert "host settings restored" not in rest
    assert POOL.read_text() == before
    assert not leftovers(p.pid)
    assert not [pid for pid in os.listdir("/proc") if pid.isdigit() and _parent(pid) == p.pid]


def _parent(pid):
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
        return None


def test_two_runs_started_in_the_same_second_never_share_an_output_directory(tmp_path, monkeypatch):
    from argparse import Namespace

    from kvmsplit.cli.options import output_dir
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(time, "strftime", lambda fmt, *a: "20261202-120000")
    dirs = [output_dir(Namespace(output=None)) for _ in range(3)]
    assert [d.name for d in dirs] == ["20261202-120000", "20261202-120000-1", "20261202-120000-2"]
    assert all(d.is_dir() for d in dirs)
