"""`kvmsplit kernellog --follow`: reports printed as they complete, from a real
FIFO fed in pieces, a growing file stopped with Ctrl-C, and the real /dev/kmsg.
The follower is the batch parser's, so over real logs fed in random pieces it
must find exactly what the batch parser finds."""
from __future__ import annotations

import json
import os
import random
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from tests.kernellog.syzcorpus import load_corpus
from tests.kernellog.test_kernellog_guard import planted_warning

from kvmsplit.kernellog import parse_log_text, parse_reports
from kvmsplit.kernellog.follow import SETTLE_LINES, ReportFollower

CORPUS = Path(__file__).parent / "corpus"
PLANTED = CORPUS / "planted-tdp-mmu-split-huge-page-6.12.log"
TITLE = "WARNING in tdp_mmu_split_huge_page"


def log_of(path: Path) -> str:
    return path.read_text().partition("\n\n")[2]


def followed(text: str, rng: random.Random) -> list[str]:
    f = ReportFollower()
    at = 0
    while at < len(text):
        n = rng.randint(1, 300)
        f.feed_text(text[at:at + n])
        at += n
    f.finish()
    return [r.title for r in f.reports]


def test_following_in_pieces_finds_what_the_batch_parser_finds():
    rng = random.Random(15)
    logs = [log_of(p) for p in sorted(CORPUS.glob("*.log"))]
    logs += [cf.log for cf in load_corpus()[1][::8]]        # every 8th: keeps the test fast
    differ = []
    for text in logs:
        want = [r.title for r in parse_reports(parse_log_text(text))]
        got = followed(text, rng)
        if got != want:
            differ.append((want, got))
    assert len(logs) > 120 and differ == []


def test_a_report_is_handed_on_once_complete_not_at_the_end():
    lines = log_of(PLANTED).splitlines()
    end = next(i for i, ln in enumerate(lines) if "---[ end trace" in ln)
    shown = []
    f = ReportFollower(shown.append)
    for ln in lines[:end + 1]:
        f.feed_line(ln)
    assert shown == [], "a fatal panic may still rejoin it: not yet"
    for n in range(SETTLE_LINES):
        f.feed_line(f"[  100.{n:06d}] unrelated chatter {n}")
    assert [r.title for r in shown] == [TITLE]
    f.feed_line("[  101.000000] Kernel panic - not syncing: Fatal exception")
    f.finish()
    assert [r.title for r in f.reports] == [TITLE], "handed on once; the panic rejoined it"


def test_quiet_log_hands_on_a_report_without_an_end_marker():
    shown = []
    f = ReportFollower(shown.append)
    f.feed_text("[ 5.1] INFO: task kworker/0:1:12 blocked for more than 143 seconds.\n"
                "[ 5.2] Call Trace:\n[ 5.3]  __schedule+0x1/0x2\n[ 5.4]  rtnl_lock+0x1/0x2\n"
                "[ 5.5]  addrconf_dad_work+0x1/0x2\n")
    assert shown == []
    f.idle()
    assert [r.title for r in shown] == ["INFO: task hung in rtnl_lock"]


def kvmsplit(*args: str, **kw) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "kvmsplit", "kernellog", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, **kw)


def read_until(proc: subprocess.Popen, want: str, timeout: float = 20) -> str:
    """stdout so far, once it holds `want` (or the timeout passed)."""
    out = ""
    deadline = time.monotonic() + timeout
    while want not in out and time.monotonic() < deadline:
        ready, _, _ = select.select([proc.stdout], [], [], 0.2)
        if ready:
            line = proc.stdout.readline()
            if not line:
                break
            out += line
    return out


def wait_open(proc: subprocess.Popen, path: str, timeout: float = 20) -> None:
    """Until the follower has `path` open (it has started reading)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        fds = os.listdir(f"/proc/{proc.pid}/fd")
        if any(os.path.realpath(f"/proc/{proc.pid}/fd/{fd}") == path for fd in fds):
            return
        time.sleep(0.05)
    raise AssertionError(f"the follower never opened {path}")


def nothing_printed(proc: subprocess.Popen, wait: float) -> bool:
    ready, _, _ = select.select([proc.stdout], [], [], wait)
    return not ready


def test_follow_a_fifo_fed_in_pieces(tmp_path):
    fifo = tmp_path / "console"
    os.mkfifo(fifo)
    proc = kvmsplit("--follow", "--quiet", "30", str(fifo))
    try:
        with open(fifo, "w") as console:
            lines = log_of(PLANTED).splitlines(keepends=True)
            half = len(lines) // 2
            console.write("".join(lines[:half]))
            console.flush()
            assert nothing_printed(proc, 1.0), "half a report is not a report"
            console.write("".join(lines[half:]) + "".join(f"[ 9.{n}] more\n" for n in range(SETTLE_LINES)))
            console.flush()
            # printed while the console is still open: as it completes, not at the end
            assert TITLE in read_until(proc, TITLE)
        out, err = proc.communicate(timeout=20)
    finally:
        proc.kill()
    assert proc.returncode == 1 and err == ""
    assert out.splitlines()[-1] == f"1 report(s) in {fifo} (end of input)"


def test_ctrl_c_ends_following_cleanly_with_the_pending_report(tmp_path):
    console = tmp_path / "console.log"
    lines = log_of(PLANTED).splitlines()
    end = next(i for i, ln in enumerate(lines) if "---[ end trace" in ln)
    console.write_text("\n".join(lines[:end + 1]) + "\n")     # a growing file, cut at the end marker
    proc = kvmsplit("--follow", "--quiet", "30", str(console))
    try:
        wait_open(proc, str(console))
        assert nothing_printed(proc, 1.0)
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=20)
    finally:
        proc.kill()
    assert "Traceback" not in err and err == ""
    assert out.splitlines()[0] == TITLE
    assert out.splitlines()[-1] == f"1 report(s) in {console} (interrupted)"
    assert proc.returncode == 1


def test_follow_dev_kmsg_for_real(kmsg, marker):
    proc = kvmsplit("--follow", "--json", "--quiet", "1")     # /dev/kmsg by default
    try:
        wait_open(proc, "/dev/kmsg")      # it reads new records only
        kmsg.write(planted_warning(marker))
        out = read_until(proc, marker)
        proc.send_signal(signal.SIGINT)
        rest, err = proc.communicate(timeout=20)
    finally:
        proc.kill()
    ours = [json.loads(ln) for ln in (out + rest).splitlines() if marker in ln]
    assert [(r["type"], r["title"], r["corrupted"]) for r in ours] == [("KVM_WARN", TITLE, False)]
    assert err == ""


@pytest.mark.parametrize("args, message", [
    ((), "name a FILE"),
    (("--follow", "--quiet", "0", "-"), "--quiet must be more than 0"),
    (("--follow", "/nonexistent/console"), "/nonexistent/console: no such file"),
    (("--follow", "{tmp}"), "{tmp}: is a directory, not a kernel log"),
])
def test_follow_usage_errors_are_one_line(args, message, tmp_path):
    args, message = tuple(a.format(tmp=tmp_path) for a in args), message.format(tmp=tmp_path)
    proc = kvmsplit(*args, stdin=subprocess.DEVNULL)
    out, err = proc.communicate(timeout=20)
    assert message in err and len(err.strip().splitlines()) == 1 and proc.returncode in (64, 66)
