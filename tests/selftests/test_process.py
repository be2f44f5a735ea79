"""One test process: its streams, its timeout, and nothing of it left behind."""
import os

from kvmsplit.selftests.process import group_members, run


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def test_streams_are_kept_apart_and_logged_together(tmp_path):
    log = tmp_path / "t.log"
    c = run(["sh", "-c", "echo out; echo err >&2; exit 3"], 10, log=log)
    assert (c.returncode, c.stdout, c.stderr, c.timed_out) == (3, "out\n", "err\n", False)
    assert sorted(log.read_text().splitlines()) == ["err", "out"]


def test_a_signal_is_named():
    assert run(["sh", "-c", "kill -SEGV $$"], 10).signal == "SIGSEGV"


def test_a_child_left_running_is_killed(tmp_path):
    pidfile = tmp_path / "pid"
    c = run(["sh", "-c", f"sleep 600 & echo $! > {pidfile}"], 10)
    child = int(pidfile.read_text())
    assert c.returncode == 0 and not c.timed_out
    assert c.leftover == [child]
    assert not alive(child)


def test_timeout_kills_the_group_even_with_its_output_closed(tmp_path):
    pidfile = tmp_path / "pid"
    c = run(["sh", "-c", f"exec >&- 2>&-; sleep 600 & echo $! > {pidfile}; sleep 600"], 0.5)
    assert c.timed_out and c.returncode is None and c.unkillable == []
    assert not alive(int(pidfile.read_text()))
    assert group_members(os.getpgid(0)) != []      # ours is untouched
