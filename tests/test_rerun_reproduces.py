"""`kvmsplit rerun` replays what the original run's command line changed:
here, a phase timeout so short that the guest "hangs" in its boot phase.
A rerun that dropped it would pass; the replayed one errors the same way,
and says what it replayed. (Reruns that go back to the kernel under test or
to the box are proven in tests/test_series.py and tests/test_remote.py.)"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

SUITE = Path(__file__).resolve().parent / "remote" / "scenarios.toml"
pytestmark = pytest.mark.kvm


def kvmsplit(*args):
    return subprocess.run([sys.executable, "-m", "kvmsplit", *map(str, args)], capture_output=True, text=True,
                          timeout=300)


def verdicts(out: Path) -> list[tuple[str, str]]:
    res = json.loads((out / "results.json").read_text())
    return [(s["verdict"], s["reasons"][0] if s["reasons"] else "") for s in res["scenarios"]]


def test_a_rerun_replays_the_original_phase_timeout_and_says_so(tmp_path):
    r = kvmsplit("run", "--scenario", SUITE, "-k", "one", "--phase-timeout", "0.01", "--output", tmp_path / "a",
                 "--db", tmp_path / "h.db")
    assert r.returncode == 1
    [(verdict, why)] = verdicts(tmp_path / "a")
    assert verdict == "ERROR" and "hung in phase boot" in why
    again = kvmsplit("rerun", tmp_path / "a", "--output", tmp_path / "b", "--db", tmp_path / "h.db")
    assert "replaying the original run's options: --phase-timeout 0.01" in again.stderr, again.stderr
    assert again.returncode == 1
    [(verdict_b, why_b)] = verdicts(tmp_path / "b")
    assert verdict_b == "ERROR" and "hung in phase boot" in why_b
    # and a rerun told otherwise does what it is told
    fine = kvmsplit("rerun", tmp_path / "a", "--phase-timeout", "60", "--output", tmp_path / "c",
                    "--db", tmp_path / "h.db")
    assert fine.returncode == 0, fine.stderr
    assert "replaying" not in fine.stderr
    assert verdicts(tmp_path / "c")[0][0] == "PASS"


def test_a_rerun_of_a_vm_run_whose_kernel_is_gone_says_so_plainly(tmp_path):
    """No image at its path, none in the cache with its sha256, nothing to rebuild it from."""
    r = kvmsplit("run", "--scenario", SUITE, "-k", "one", "--output", tmp_path / "a", "--db", tmp_path / "h.db")
    assert r.returncode == 0, r.stderr
    res = json.loads((tmp_path / "a" / "results.json").read_text())
    res["host"]["vm"] = {"image": str(tmp_path / "gone" / "bzImage"), "sha256": "0" * 64, "append": None}
    (tmp_path / "a" / "results.json").write_text(json.dumps(res))
    again = kvmsplit("rerun", tmp_path / "a", "--output", tmp_path / "b")
    assert again.returncode == 69, again.stderr
    assert "the kernel under test (sha256 0000" in again.stderr and "is gone" in again.stderr
    assert "--here" in again.stderr and "Traceback" not in again.stderr
