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


def test_a_pool_bigger_than_the_host_can_spare_is_refused_untouched(writable_pool, tmp_path):
    with HostChanges(journal=tmp_path / "j.json") as hc:
        why = hc.ensure_hugepages(2048, 1 << 30)   # 2 PiB of huge pages
        assert "MiB available; not growing it" in why
        assert pool() == writable_pool and not hc.added


def test_two_in_one_process_do_not_undo_each_other(writable_pool, tmp_path):
    a = HostChanges(journal=tmp_path / "a.json").__enter__()
    assert a.ensure_hugepages(2048, free() + 4) is None
    b = HostChanges(journal=tmp_path / "b.json").__enter__()      # must not take a's journal for stale
    assert (tmp_path / "a.json").exists() and pool() == writable_pool + 4
    assert b.ensure_hugepages(2048, free() + 2) is None
    assert pool() == writable_pool + 6
    a.restore()
    assert pool() == writable_pool + 2          # a gave back its 4, not b's 2
    b.restore()
    assert pool() == writable_pool


def test_a_concurrent_run_never_records_anothers_pool_as_the_original(writable_pool, tmp_path):
    """The old bug: run B saw run A's grown pool, took it for the original and
    restored it after A had finished, leaving A's pages in the pool for good."""
    code = textwrap.dedent(f"""
        import sys, time
        from pathlib import Path
        from kvmsplit.host.changes import HostChanges
        with HostChanges(journal=Path({str(tmp_path / "a.json")!r})) as hc:
            assert hc.ensure_hugepages(2048, int(open({POOL!r} + "free_hugepages").read()) + 6) is None
            print("grown", flush=True)
            sys.stdin.readline()
    """)
    a = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert a.stdout.readline().strip() == "grown"
    with HostChanges(journal=tmp_path / "b.json") as b:
        assert b.ensure_hugepages(2048, free() + 2) is None     # B grows the pool A has grown
        assert pool() == writable_pool + 8
        a.communicate("\n", timeout=30)                        # A finishes first: its 6 go back
        assert pool() == writable_pool + 2                      # B's 2 stay while B runs
    assert pool() == writable_pool


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


def test_a_second_run_waits_for_the_pool_lock_or_with_no_wait_refuses(writable_pool, tmp_path, capfd):
    import threading
    import time

    from kvmsplit.host.changes import pool_lock
    nr = POOL + "nr_hugepages"
    with pool_lock(nr):
        why = HostChanges(journal=tmp_path / "a.json", wait=False).ensure_hugepages(2048, free() + 2)
        assert why == "another kvmsplit run is changing the hugepages-2048kB pool (--no-wait)"
        hc = HostChanges(journal=tmp_path / "b.json")
        got = []
        t = threading.Thread(target=lambda: got.append(hc.ensure_hugepages(2048, free() + 2)))
        t.start()
        time.sleep(0.3)
        assert t.is_alive() and not got            # it waits while the lock is held
    t.join(10)
    assert got == [None] and "waiting for another kvmsplit run" in capfd.readouterr().err
    hc.restore()
