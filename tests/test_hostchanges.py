"""Hugetlb pools are grown for real and put back, also after a run that was
killed before it could clean up."""
import os
import signal
import subprocess
import sys
import textwrap

import pytest

from kvmsplit.host.changes import HostChanges, recover_stale

POOL = "/sys/kernel/mm/hugepages/hugepages-2048kB/"


def pool():
    return int(open(POOL + "nr_hugepages").read())


def free():
    return int(open(POOL + "free_hugepages").read())


@pytest.fixture
def writable_pool():
    from conftest import need
    need(os.access(POOL + "nr_hugepages", os.W_OK), "hugetlb 2M pool not writable (need root)")
    before = pool()
    yield before
    assert pool() == before, "test left the hugetlb pool changed"


def test_grow_and_restore(writable_pool, tmp_path):
    want = free() + 8        # more than is free now, whatever the pool held before
    with HostChanges(journal=tmp_path / "j.json") as hc:
        assert hc.ensure_hugepages(2048, want) is None
        assert free() >= want and pool() == writable_pool + 8
        assert (tmp_path / "j.json").exists()
    assert pool() == writable_pool and not (tmp_path / "j.json").exists()


def test_not_allowed_is_a_reason_not_a_change(writable_pool, tmp_path):
    hc = HostChanges(allowed=False, journal=tmp_path / "j.json")
    why = hc.ensure_hugepages(2048, 100000)
    assert "not allowed" in why and pool() == writable_pool


def test_impossible_pool_is_a_reason(writable_pool, tmp_path):
    with HostChanges(journal=tmp_path / "j.json") as hc:
        why = hc.ensure_hugepages(2048, 1 << 30)   # 2 PiB of huge pages
        assert "could only grow" in why


def test_killed_run_is_restored_by_the_next(writable_pool, tmp_path):
    journal = tmp_path / "j.json"
    code = textwrap.dedent(f"""
        import os, signal
        from kvmsplit.host.changes import HostChanges
        hc = HostChanges(journal=__import__('pathlib').Path({str(journal)!r}))
        assert hc.ensure_hugepages(2048, int(open({POOL!r} + "free_hugepages").read()) + 4) is None
        os.kill(os.getpid(), signal.SIGKILL)
    """)
    p = subprocess.run([sys.executable, "-c", code])
    assert p.returncode == -signal.SIGKILL
    assert journal.exists()
    restored = recover_stale(journal)
    assert restored and pool() == writable_pool and not journal.exists()
