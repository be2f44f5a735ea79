"""`kvmsplit remote` against real OpenSSH servers (tests/remote/sshboxes.py):
one on loopback, the others in network namespaces of their own, each a
"box" that runs the real kvmsplit (shipped as a wheel into a venv there)
on this machine's /dev/kvm. Boxes are killed, cut off the network,
refused, and "rebooted" (an emulated kexec: a new sshd with a new boot_id
and another `uname -r`, or none)."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from kvmsplit.remote.boot import image_release
from kvmsplit.runs.history import History
from remote.sshboxes import Lab

pytestmark = [pytest.mark.kvm, pytest.mark.timeout(600)]
CACHE = Path(os.environ["KVMSPLIT_CACHE_DIR"])
SUITE = Path(__file__).resolve().parent / "remote" / "scenarios.toml"   # the box is this machine
ONE = ["--scenario", SUITE, "-k", "one"]            # one scenario, about 2 s
FIVE = ["--scenario", SUITE]                       # five


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    lab = Lab(tmp_path_factory.mktemp("lab"))
    try:
        yield lab
    finally:
        lab.close()


@pytest.fixture(scope="module")
def boxes(lab):
    """lo on 127.0.0.1, b1 and b2 each in a netns; their venvs persist in the tests' cache."""
    return {b.name: b for b in (lab.box("lo", netns=False), lab.box("b1"), lab.box("b2"))}


def box_settings(name: str, data: Path, **extra) -> dict:
    """Where the box keeps kvmsplit, and an environment that keeps its runs out of the user's state."""
    return {"workdir": str(CACHE / "remote-boxes" / name), "python": "/usr/bin/python3",
            "env": {"KVMSPLIT_CACHE_DIR": str(CACHE), "KVMSPLIT_DATA_DIR": str(data / f"box-data-{name}")},
            **extra}


def inventory(lab, tmp_path, boxes, labels=None, **overrides):
    per = {b.name: box_settings(b.name, tmp_path, labels=(labels or {}).get(b.name, []),
                                **overrides.get(b.name, {})) for b in boxes}
    return lab.inventory(tmp_path / "boxes.toml", boxes, **per)


def kvmsplit(*args, timeout=300, cwd=None):
    t0 = time.monotonic()
    r = subprocess.run([sys.executable, "-m", "kvmsplit", *map(str, args)], capture_output=True, text=True,
                       timeout=timeout, cwd=cwd)
    return r, time.monotonic() - t0


def remote_run(inv, tmp_path, targets, command, *opts, timeout=300):
    return kvmsplit("remote", "run", "--inventory", inv, "--output", tmp_path / "out", "--db", tmp_path / "h.db",
                    *opts, *targets, "--", "kvmsplit", *map(str, command), timeout=timeout)


def results(tmp_path, box) -> dict:
    return json.loads((tmp_path / "out" / box / "results.json").read_text())


def test_a_run_on_two_boxes_runs_in_parallel_and_comes_back_with_its_files_and_history(lab, boxes, tmp_path):
    inv = inventory(lab, tmp_path, [boxes["lo"], boxes["b1"]], labels={"lo": ["nightly"], "b1": ["nightly"]})
    r, wall = remote_run(inv, tmp_path, ["nightly"], ["run", *ONE, "--ktap"])
    assert r.returncode == 0, r.stderr[-3000:]
    spans = []
    for name in ("lo", "b1"):
        res = results(tmp_path, name)
        assert [(s["name"], s["verdict"]) for s in res["scenarios"]] == [("one", "PASS")]
        assert res["host"]["remote"]["box"] == name and res["host"]["remote"]["exit"] == 0
        out = tmp_path / "out" / name
        assert (out / "junit.xml").is_file() and (out / "kcidb.json").is_file()
        assert "ok 1 one" in (out / "console.log").read_text()        # streamed and kept
        assert f"[{name}] ok 1 one" in r.stderr                      # streamed as it came
        spans.append((res["started"], res["finished"]))
        work = CACHE / "remote-boxes" / name
        assert not (work / res["host"]["remote"]["run_dir"]).exists(), "the run's directory stayed on the box"
        assert (work / "venv" / "bin" / "python").exists()              # the deployed venv stays
    # in parallel: each box's run started before the other's finished
    assert spans[0][0] < spans[1][1] and spans[1][0] < spans[0][1], spans
    rows = History(tmp_path / "h.db").runs()
    assert len(rows) == 2
    stored = [History(tmp_path / "h.db").load(row.id).host["remote"]["box"] for row in rows]
    assert sorted(stored) == ["b1", "lo"]


def test_a_box_killed_mid_run_is_a_miss_within_its_deadline_and_the_other_box_finishes(lab, boxes, tmp_path):
    inv = inventory(lab, tmp_path, [boxes["lo"], boxes["b2"]])
    args = [sys.executable, "-m", "kvmsplit", "remote", "run", "--inventory", inv, "--output", tmp_path / "out",
            "--db", tmp_path / "h.db", "--alive-interval", "1", "--alive-count", "3", "--connect-timeout", "3",
            "lo", "b2", "--", "kvmsplit", "run", *FIVE, "--ktap"]
    p = subprocess.Popen(list(map(str, args)), stderr=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        seen = []
        for line in p.stderr:
            seen.append(line)
            if line.startswith("[b2] ok 1 "):          # b2 is mid-run: one scenario done
                break
        t_kill = time.monotonic()
        boxes["b2"].kill()
        rest = p.stderr.read()
        rc = p.wait(timeout=120)
        t_done = time.monotonic()
    finally:
        p.kill()
        p.wait()
        boxes["b2"].start()
    assert rc == 1, "".join(seen) + rest
    assert t_done - t_kill < 60, "a killed box must not hold up the run past the other box's work"
    dead = results(tmp_path, "b2")
    verdicts = [s["verdict"] for s in dead["scenarios"]]
    assert verdicts[0] == "PASS" or "ok 1" in (tmp_path / "out" / "b2" / "console.log").read_text()
    assert "MISS" in verdicts and dead["interrupted"]
    assert any("connection lost" in why or "exit status" in why or "no answer" in why
               for s in dead["scenarios"] if s["verdict"] == "MISS" for why in s["reasons"]), dead["scenarios"]
    alive = results(tmp_path, "lo")
    assert [s["verdict"] for s in alive["scenarios"]] == ["PASS"] * 5


def test_a_box_that_drops_off_the_network_is_a_miss_within_the_liveness_deadline(lab, boxes, tmp_path):
    b1 = boxes["b1"]
    inv = inventory(lab, tmp_path, [b1])
    args = [sys.executable, "-m", "kvmsplit", "remote", "run", "--inventory", inv, "--output", tmp_path / "out",
            "--db", tmp_path / "h.db", "--alive-interval", "1", "--alive-count", "3", "--connect-timeout", "3",
            "b1", "--", "kvmsplit", "run", *FIVE, "--ktap"]
    p = subprocess.Popen(list(map(str, args)), stderr=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        for line in p.stderr:
            if line.startswith("[b1] kvmsplit "):       # the command is running on the box
                break
        b1.unplug()
        t_cut = time.monotonic()
        rest = p.stderr.read()
        rc = p.wait(timeout=60)
        elapsed = time.monotonic() - t_cut
    finally:
        p.kill()
        p.wait()
        b1.plug()
    assert rc == 1, rest
    print(rest)
    # silence for alive_interval, then alive_count intervals unanswered, then one failed reconnect
    assert elapsed < 1 + 3 + 3 + 5, (elapsed, rest)
    res = results(tmp_path, "b1")
    why = res["host"]["remote"]["problem"]
    assert "no answer for 3s" in why, why
    assert all(s["verdict"] == "MISS" for s in res["scenarios"]), res["scenarios"]


def test_an_unknown_host_key_is_refused_and_accepting_one_is_explicit_and_said(lab, tmp_path):
    new = lab.box("newkey", known=False)
    inv = inventory(lab, tmp_path, [new])
    runs = Path(box_settings("newkey", tmp_path)["workdir"]) / "runs"
    before = set(runs.iterdir()) if runs.exists() else set()
    r, _ = remote_run(inv, tmp_path, ["newkey"], ["run", *ONE])
    assert r.returncode == 1
    res = results(tmp_path, "newkey")
    assert res["scenarios"][0]["verdict"] == "MISS"
    assert "REFUSED: its host key is not in" in res["host"]["remote"]["problem"]
    assert (set(runs.iterdir()) if runs.exists() else set()) == before, "nothing may run on the box"

    r, _ = remote_run(inv, tmp_path, ["newkey"], ["list", *ONE], "--accept-new-host-key")
    assert "accepted a NEW host key" in r.stderr and "SHA256:" in r.stderr, r.stderr[-2000:]
    assert new.known_hosts_line().split()[2] in lab.known_hosts.read_text()


def test_a_changed_host_key_is_refused_even_with_accept_new(lab, tmp_path):
    liar = lab.box("liar")
    impostor_key = liar.dir / "other_key"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(impostor_key)], check=True)
    liar.kill()
    liar.host_key = impostor_key            # same address, another key: a man in the middle
    liar.start()
    inv = inventory(lab, tmp_path, [liar])
    r, _ = remote_run(inv, tmp_path, ["liar"], ["run", *ONE], "--accept-new-host-key")
    assert r.returncode == 1
    why = results(tmp_path, "liar")["host"]["remote"]["problem"]
    assert "REFUSED" in why and "differs from the one in" in why, why
    liar.close()


def test_shell_metacharacters_in_the_inventory_are_inert(lab, boxes, tmp_path):
    canary = tmp_path / "pwned"
    nasty = f"$(touch {canary}1);touch {canary}2 `touch {canary}3` |touch {canary}4 ' \" &"
    workdir = str(tmp_path / f"work {nasty}")
    data = str(tmp_path / f"data {nasty}")
    inv = inventory(lab, tmp_path, [boxes["lo"]], labels={"lo": [nasty]},
                    lo={"workdir": workdir, "env": {"KVMSPLIT_CACHE_DIR": str(CACHE), "KVMSPLIT_DATA_DIR": data}})
    r, _ = remote_run(inv, tmp_path, [nasty], ["run", *ONE])
    assert r.returncode == 0, r.stderr[-3000:]
    assert not list(tmp_path.glob("pwned*")), "a metacharacter reached a shell"
    assert (Path(workdir) / "venv" / "bin" / "kvmsplit").exists()       # the literal directory
    assert (Path(data) / "history.sqlite").exists()                      # the literal value, in the box's env


def test_a_command_that_outlives_its_time_on_the_box_is_stopped_there(lab, boxes, tmp_path):
    inv = inventory(lab, tmp_path, [boxes["b1"]])
    # the guest spins in populate (for up to a minute): the command certainly outlives its 4 s
    r, wall = remote_run(inv, tmp_path, ["b1"], ["run", *FIVE, "--ktap", "--inject-hang", "populate",
                                                 "--phase-timeout", "60"], "--timeout", "4")
    assert r.returncode == 1
    res = results(tmp_path, "b1")
    assert res["host"]["remote"]["exit"] in (124, 137)
    verdicts = [s["verdict"] for s in res["scenarios"]]
    assert "ERROR" in verdicts, res["scenarios"]
    err = next(s for s in res["scenarios"] if s["verdict"] == "ERROR")
    assert "timed out on the box" in err["reasons"][0]
    assert wall < 4 + 10 + 60        # timeout, the kill grace, deploying and fetching
    time.sleep(1)
    left = [p for p in boxes["b1"].pids() if "kvmsplit" in Path(f"/proc/{p}/cmdline").read_text(errors="replace")]
    assert not left, "the command is still running on the box"


def test_boot_waits_for_a_new_boot_id_and_the_expected_kernel(lab, tmp_path):
    box = lab.box("kx")
    box.comes_back_as = "6.12.99-kvmsplit-under-test"
    image = tmp_path / "bzImage"
    image.write_bytes(b"\0" * 4096)
    inv = inventory(lab, tmp_path, [box])
    r, wall = kvmsplit("remote", "boot", "--inventory", inv, "kx", "--kernel", image,
                       "--release", "6.12.99-kvmsplit-under-test", "--append", "kvm.eager_page_split=0",
                       "--deadline", "30")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "kx: booted 6.12.99-kvmsplit-under-test" in r.stdout
    log = box.shim_log.read_text()
    assert "kexec -l boot/bzImage --append=kvm.eager_page_split=0" in log and "kexec -e" in log, log
    assert box.reboots == 1
    box.close()


def test_boot_onto_the_wrong_kernel_is_said_plainly(lab, tmp_path):
    box = lab.box("wrong")
    box.comes_back_as = os.uname().release          # GRUB fell back to the old kernel
    image = tmp_path / "bzImage"
    image.write_bytes(b"\0" * 4096)
    inv = inventory(lab, tmp_path, [box], wrong={"switch": "grub-reboot"})
    host_boot = set(os.listdir("/boot"))
    r, _ = kvmsplit("remote", "boot", "--inventory", inv, "wrong", "--kernel", image,
                    "--release", "6.12.99-kvmsplit-under-test", "--deadline", "30")
    assert r.returncode == 1
    # the kernel went into the box's /boot, never into this host's
    assert (box.dir / "boot" / "vmlinuz-6.12.99-kvmsplit-under-test").exists()
    assert set(os.listdir("/boot")) == host_boot
    assert "WRONG KERNEL: came back on " + os.uname().release in r.stdout, r.stdout + r.stderr
    log = box.shim_log.read_text()
    assert "grub-reboot gnulinux-advanced-1234-abcd>gnulinux-6.12.99-kvmsplit-under-test-advanced-1234-abcd" in log
    assert "grub-set-default" not in log, "the default entry must never change"
    box.close()


def test_a_box_that_never_comes_back_is_a_result_at_the_deadline(lab, tmp_path):
    box = lab.box("gone")
    box.comes_back_as = None
    image = tmp_path / "bzImage"
    image.write_bytes(b"\0" * 4096)
    inv = inventory(lab, tmp_path, [box])
    r, wall = kvmsplit("remote", "boot", "--inventory", inv, "gone", "--kernel", image,
                       "--release", "6.12.99-x", "--deadline", "8", "--connect-timeout", "2")
    assert r.returncode == 1
    assert "gone: did NOT come back within" in r.stdout, r.stdout + r.stderr
    assert wall < 8 + 2 + 15
    box.close()


def test_a_box_that_cannot_be_reached_is_a_switch_that_did_not_start(lab, tmp_path):
    box = lab.box("down")
    image = tmp_path / "bzImage"
    image.write_bytes(b"\0" * 4096)
    inv = inventory(lab, tmp_path, [box])
    box.close()                         # nothing listens on its address any more
    r, wall = kvmsplit("remote", "boot", "--inventory", inv, "down", "--kernel", image,
                       "--release", "6.12.99-x", "--deadline", "8", "--connect-timeout", "2")
    assert r.returncode == 1, r.stdout + r.stderr
    assert "down: the switch to 6.12.99-x did not start:" in r.stdout, r.stdout + r.stderr
    assert "Traceback" not in r.stderr and wall < 30


def test_the_release_comes_from_the_images_boot_header():
    image = next(Path("/boot").glob("vmlinuz-*"))
    assert image_release(image) == image.name.removeprefix("vmlinuz-")


def test_a_rerun_of_a_remote_run_goes_back_to_its_box_or_says_it_cannot(lab, boxes, tmp_path):
    inv = inventory(lab, tmp_path, [boxes["b2"]])
    r, _ = remote_run(inv, tmp_path, ["b2"], ["run", *FIVE])
    assert r.returncode == 0, r.stderr[-3000:]
    original = tmp_path / "out" / "b2" / "results.json"
    again, _ = kvmsplit("rerun", original, "--only", "three", "--inventory", inv, "--output", tmp_path / "again",
                        "--db", tmp_path / "h.db")
    assert again.returncode == 0, again.stderr[-3000:]
    assert "ran on box b2: rerunning there" in again.stderr and "[b2] " in again.stderr
    res = json.loads((tmp_path / "again" / "b2" / "results.json").read_text())
    assert res["host"]["remote"]["box"] == "b2"
    assert [(s["name"], s["verdict"]) for s in res["scenarios"]] == [("three", "PASS")]
    # the same seed and parameters as the original's scenario
    first = json.loads(original.read_text())
    assert res["scenarios"][0]["scenario"] == next(s for s in first["scenarios"] if s["name"] == "three")["scenario"]

    other = lab.inventory(tmp_path / "other.toml", [boxes["lo"]], lo=box_settings("lo", tmp_path))
    lost, _ = kvmsplit("rerun", original, "--inventory", other, "--output", tmp_path / "lost")
    assert lost.returncode == 64, lost.stderr
    assert "ran on box b2" in lost.stderr and "cannot be reached from here" in lost.stderr
    assert "--here" in lost.stderr and "Traceback" not in lost.stderr


@pytest.mark.parametrize("inventory_text, args, code, words", [
    (None, ["b", "--", "kvmsplit", "run"], 66, "no such inventory"),
    ("[box.a]\nhost = 'x'\nprot = 22\n", ["a", "--", "kvmsplit", "run"], 65,
     "unknown key 'prot' (did you mean 'port'?)"),
    ("[box.a]\nport = 22\n", ["a", "--", "kvmsplit", "run"], 65, "box 'a' has no host"),
    ("[box.a]\nhost = 'x'\nswitch = 'pxe'\n", ["a", "--", "kvmsplit", "run"], 65, "switch must be one of"),
    ("[box.a]\nhost = 'x'\n", ["b", "--", "kvmsplit", "run"], 64, "no box or label 'b'"),
    ("[box.a]\nhost = 'x'\n", ["a", "--", "ls"], 64, "runs kvmsplit commands"),
    ("[box.a]\nhost = 'x'\n", ["a"], 64, "usage: kvmsplit remote run"),
    ("[box.a]\nhost = 'x'\n", ["a", "--timeout", "3", "--", "kvmsplit", "run"], 64, "put options before"),
])
def test_bad_input_is_one_line_and_its_exit_code(tmp_path, inventory_text, args, code, words):
    inv = tmp_path / "boxes.toml"
    if inventory_text is not None:
        inv.write_text(inventory_text)
    r, _ = kvmsplit("remote", "run", "--inventory", inv, *args, cwd=tmp_path)
    assert r.returncode == code, r.stderr
    assert not (tmp_path / "out").exists(), "bad input must not leave an output directory"
    assert words in r.stderr and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


def test_ctrl_c_stops_the_command_on_every_box_and_keeps_what_it_finished(lab, boxes, tmp_path):
    inv = inventory(lab, tmp_path, [boxes["lo"], boxes["b1"]])
    args = [sys.executable, "-m", "kvmsplit", "remote", "run", "--inventory", inv, "--output", tmp_path / "out",
            "--db", tmp_path / "h.db", "lo", "b1", "--", "kvmsplit", "run", *FIVE, "--ktap"]
    p = subprocess.Popen(list(map(str, args)), stderr=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        started = set()
        for line in p.stderr:
            for b in ("lo", "b1"):
                if line.startswith(f"[{b}] ok 1 "):
                    started.add(b)
            if started == {"lo", "b1"}:
                break
        p.send_signal(signal.SIGINT)
        t0 = time.monotonic()
        rest = p.stderr.read()
        rc = p.wait(timeout=60)
        took = time.monotonic() - t0
    finally:
        p.kill()
        p.wait()
    assert rc == 130, rest
    assert took < 10 + 5 + 10, took          # the kill grace, and the fetch
    assert "stopping the command on every box" in rest
    for name in ("lo", "b1"):
        res = results(tmp_path, name)
        verdicts = [s["verdict"] for s in res["scenarios"]]
        assert verdicts[0] == "PASS" and res["interrupted"], (name, verdicts)
        assert len(verdicts) == 5 and verdicts != ["PASS"] * 5, (name, verdicts)
        left = [pid for pid in boxes[name].pids()
                if "kvmsplit" in Path(f"/proc/{pid}/cmdline").read_text(errors="replace")]
        assert not left, f"kvmsplit still running on {name}"
    assert len(History(tmp_path / "h.db").runs()) == 2


def on_box(box, *words: str) -> list[str]:
    """The box's processes whose command line has any of `words`."""
    found = []
    for pid in box.pids():
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_text(errors="replace").replace("\0", " ")
        except OSError:
            continue
        if any(w in cmd for w in words):
            found.append(f"{pid} {cmd}")
    return found


def test_a_killed_local_remote_run_leaves_nothing_running_on_the_box(lab, boxes, tmp_path):
    """SIGKILL, no chance to say goodbye: the box's command and its children end with the
    connection (its watchdog sees EOF on the channel), not at the --timeout an hour later."""
    b1 = boxes["b1"]
    inv = inventory(lab, tmp_path, [b1])
    quiet = tmp_path / "quiet.toml"         # after "one", 30 s without a line: no broken pipe to end it early
    quiet.write_text(SUITE.read_text().split("[[scenario]]")[0]
                     + '[[scenario]]\nname = "one"\n\n[[scenario]]\nname = "long"\npasses = 100\n')
    args = [sys.executable, "-m", "kvmsplit", "remote", "run", "--inventory", inv, "--output", tmp_path / "out",
            "--db", tmp_path / "h.db", "b1", "--", "kvmsplit", "run", "--scenario", quiet, "--ktap"]
    p = subprocess.Popen(list(map(str, args)), stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True)
    try:
        for line in p.stderr:
            if line.startswith("[b1] ok 1 "):          # mid-run: one scenario done, four to go
                break
        assert on_box(b1, "kvmsplit", "timeout"), "nothing running on the box to begin with"
        p.kill()
        p.wait()
        t0 = time.monotonic()
        while on_box(b1, "kvmsplit", "timeout") and time.monotonic() - t0 < 30:
            time.sleep(0.1)
        took = time.monotonic() - t0
    finally:
        p.kill()
        p.wait()
    assert not on_box(b1, "kvmsplit", "timeout"), "the command outlived its connection on the box"
    assert took < 5, f"the box's command took {took:.1f}s to end after its connection did"
    assert box_tmp_empties(b1) == []


def box_tmp_empties(box, within: float = 10) -> list[str]:
    """What is left in the box's /tmp once its commands' wrappers have had time to clean up."""
    t0 = time.monotonic()
    while (left := sorted(p.name for p in box.tmp.iterdir())) and time.monotonic() - t0 < within:
        time.sleep(0.1)
    return left


def test_a_deploy_killed_midway_leaves_nothing_in_the_boxs_tmp(lab, boxes, tmp_path):
    """SIGKILL while the box makes its venv: ensurepip's wheels were left in the box's /tmp
    for good (seen for real); now each command has a TMPDIR of its own, gone with it."""
    b1 = boxes["b1"]
    inv = inventory(lab, tmp_path, [b1], b1={"workdir": str(tmp_path / "fresh")})
    args = [sys.executable, "-m", "kvmsplit", "remote", "run", "--inventory", inv, "--output", tmp_path / "out",
            "--db", tmp_path / "h.db", "b1", "--", "kvmsplit", "run", *ONE]
    p = subprocess.Popen(list(map(str, args)), stderr=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while not list(b1.tmp.rglob("pip-*.whl")):        # ensurepip at work, in the box's /tmp
            assert p.poll() is None and time.monotonic() < deadline, "never saw the venv being made"
            time.sleep(0.02)
    finally:
        p.kill()            # SIGKILL: no goodbye to the box
        p.wait()
    assert box_tmp_empties(b1) == []
    assert not on_box(b1, "venv", "timeout"), "the venv's making outlived its connection"
