"""`kvmsplit trace`: KVM ioctls followed with ptrace, on real runs.

The decoding and the summary are checked on made-up calls first; then real
`kvmsplit run`s are traced (bitmap and ring), a forking, threaded ioctl
script, an attached running process, and the usage errors.
"""
from __future__ import annotations

import ctypes as C
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from kvmsplit.errors import EXIT_INTERRUPTED, EXIT_UNAVAILABLE, EXIT_USAGE
from kvmsplit.syscalls import Call, Recorder, decode_args, describe, fd_kind, ioctl_name, is_kvm_request
from kvmsplit.vmm.kvm import uapi

TEST_GPA = 0x100000000


def trace(*args, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "kvmsplit", "trace", *args], capture_output=True, text=True,
                          timeout=kw.pop("timeout", 60), **kw)


def traced_json(tmp_path: Path, *command: str, name: str = "t.json") -> tuple[subprocess.CompletedProcess, dict]:
    out = tmp_path / name
    r = trace("-o", str(out), "--", *command)
    assert out.exists(), r.stderr
    return r, json.loads(out.read_text())


def scenario_file(tmp_path: Path, **extra: str) -> Path:
    body = '[[scenario]]\nname = "t"\nsize = "16M"\nbacking = "anon"\nguest_page = "4k"\npasses = 1\n'
    body += "".join(f'{k} = "{v}"\n' for k, v in extra.items())
    p = tmp_path / f"s-{'-'.join(extra.values()) or 'bitmap'}.toml"
    p.write_text(body)
    return p


def run_cmd(tmp_path: Path, toml: Path, *more: str) -> list[str]:
    tag = toml.stem
    return [sys.executable, "-m", "kvmsplit", "run", "--scenario", str(toml), "-o", str(tmp_path / f"out-{tag}"),
            "--db", str(tmp_path / f"{tag}.sqlite"), *more]


# -- decoding and the summary, without a tracee ------------------------------------
def _call(name, t, dur, ret=0, fd=5, kind="vm", tid=10, **args):
    c = Call(10, tid, fd, kind, "anon_inode:kvm-vm", name, uapi.IOCTLS[name].number, 0, t, args)
    c.t_exit, c.ret = t + dur, ret
    return c


def _region(slot, flags, gpa=TEST_GPA, size=16 << 20):
    return {"slot": slot, "flags": flags, "guest_phys_addr": gpa, "memory_size": size}


def test_fds_requests_and_structs_decode():
    assert [fd_kind(s) for s in ("/dev/kvm", "anon_inode:kvm-vm", "anon_inode:kvm-vcpu:3",
                                 "anon_inode:kvm-vcpu-stats:0", "/dev/null")] == ["system", "vm", "vcpu", None, None]
    assert is_kvm_request(uapi.KVM_RUN.number) and not is_kvm_request(0x5401)    # TCGETS
    assert ioctl_name(uapi.KVM_SET_USER_MEMORY_REGION2.number) == "KVM_SET_USER_MEMORY_REGION2"
    assert ioctl_name(0xAEFF) == "KVM_IOC_0xaeff"
    r = uapi.kvm_userspace_memory_region2(slot=1, flags=1, guest_phys_addr=TEST_GPA, memory_size=16 << 20)
    assert decode_args("KVM_SET_USER_MEMORY_REGION2", 0, bytes(r)[:32]) == _region(1, 1)
    c = uapi.kvm_clear_dirty_log(slot=2, num_pages=64, first_page=128)
    assert decode_args("KVM_CLEAR_DIRTY_LOG", 0, bytes(c)) == {"slot": 2, "first_page": 128, "num_pages": 64}
    e = uapi.kvm_enable_cap(cap=uapi.CAP_DIRTY_LOG_RING)
    e.args[0] = 65536
    assert decode_args("KVM_ENABLE_CAP", 0, bytes(e))["cap"] == "DIRTY_LOG_RING"
    assert decode_args("KVM_CHECK_EXTENSION", uapi.CAP_USER_MEMORY2, None) == {"cap": "USER_MEMORY2"}
    assert decode_args("KVM_GET_DIRTY_LOG", 0, b"\0" * 3) == {}          # short read: nothing guessed
    assert C.sizeof(uapi.kvm_userspace_memory_region) == 32


def test_recorder_windows_counts_and_cap():
    rec = Recorder(0, events_cap=4)
    rec.finish(_call("KVM_CREATE_VM", 0, 10, ret=5, fd=3, kind="system"))
    rec.finish(_call("KVM_SET_USER_MEMORY_REGION2", 100, 5, **_region(1, 0)))
    on = rec.finish(_call("KVM_SET_USER_MEMORY_REGION2", 1_000_000, 2_000, **_region(1, 1)))
    rec.finish(_call("KVM_GET_DIRTY_LOG", 2_000_000, 50, slot=1))
    rec.finish(_call("KVM_CLEAR_DIRTY_LOG", 2_100_000, 50, slot=1, first_page=0, num_pages=64))
    off = rec.finish(_call("KVM_SET_USER_MEMORY_REGION2", 5_000_000, 3_000, **_region(1, 0)))
    for i in range(3):
        assert rec.finish(_call("KVM_RUN", 6_000_000 + i, 1, fd=6, kind="vcpu", tid=11)) is None
    rec.finish(_call("KVM_SET_USER_MEMORY_REGION2", 7_000_000, 1, **_region(1, 1)))     # on again, then deleted
    rec.finish(_call("KVM_SET_USER_MEMORY_REGION2", 8_000_000, 1, **_region(1, 1, size=0)))
    assert on and on["dirty_log"] == "on" and off and off["dirty_log"] == "off"
    assert "dirty logging OFF" in describe(off) and "slot=1" in describe(off)
    s = rec.summary()
    (slot,) = s["memslots"]
    w1, w2 = slot["dirty_log_windows"]
    assert (w1["enabled_ms"], w1["disabled_ms"], w1["duration_ms"]) == (1.002, 5.003, 4.001)
    assert (w1["enable_ioctl_us"], w1["disable_ioctl_us"], w1["ended_by"]) == (2.0, 3.0, "flags")
    assert w2["ended_by"] == "slot deleted"
    assert (slot["get_dirty_log"], slot["clear_dirty_log"], slot["cleared_pages"]) == (1, 1, 64)
    assert slot["memory_size"] == 16 << 20 and slot["guest_phys_addr"] == TEST_GPA
    assert s["counts"]["KVM_RUN"] == 3 and s["counts"]["KVM_RESET_DIRTY_RINGS"] == 0
    assert s["vcpu_threads"][0]["tid"] == 11 and s["vcpu_threads"][0]["exits"] == {"unread": 3}
    d = rec.to_dict()
    assert len(d["events"]) == 4 and d["events_dropped"] == 4


def test_a_new_vm_on_a_reused_fd_is_a_new_memslot_and_ends_the_old_window():
    rec = Recorder(0)
    rec.finish(_call("KVM_CREATE_VM", 0, 1, ret=5, fd=3, kind="system"))
    rec.finish(_call("KVM_SET_USER_MEMORY_REGION", 10, 1, **_region(1, 1)))
    rec.finish(_call("KVM_CREATE_VM", 20, 1, ret=5, fd=3, kind="system"))
    rec.finish(_call("KVM_SET_USER_MEMORY_REGION", 30, 1, **_region(1, 1)))
    rec.process_gone(10, 40)
    a, b = rec.summary()["memslots"]
    assert (a["vm"], b["vm"]) == (1, 2)
    assert a["dirty_log_windows"][0]["ended_by"] == "vm fd reused"
    assert b["dirty_log_windows"][0]["ended_by"] == "process exit"


# -- real runs -------------------------------------------------------------------------
@pytest.mark.kvm
def test_bitmap_run_shows_one_logging_window_on_the_test_slot(tmp_path):
    cmd = run_cmd(tmp_path, scenario_file(tmp_path))
    r, d = traced_json(tmp_path, *cmd)
    assert r.returncode == 0 == d["exit_code"], r.stderr
    s = d["summary"]
    (slot,) = [m for m in s["memslots"] if m["slot"] == 1]
    assert slot["guest_phys_addr"] == TEST_GPA and slot["memory_size"] == 16 << 20
    (w,) = slot["dirty_log_windows"]
    assert w["ended_by"] == "flags" and 0 < w["enabled_ms"] < w["disabled_ms"]
    assert w["duration_ms"] > 0 and w["enable_ioctl_us"] > 0 and w["disable_ioctl_us"] > 0
    assert slot["get_dirty_log"] == 1                   # passes = 1
    assert s["counts"]["KVM_GET_DIRTY_LOG"] == 1
    assert all(not m["dirty_log_windows"] for m in s["memslots"] if m["slot"] != 1)
    (vcpu,) = s["vcpu_threads"]
    assert vcpu["runs"] == s["counts"]["KVM_RUN"] > 0 and vcpu["tid"] != vcpu["pid"] == d["pid"]
    assert vcpu["exits"].get("IO", 0) > 0               # kvm_run.exit_reason read from the mmap'd page
    ons = [e for e in d["events"] if e.get("dirty_log") == "on"]
    assert len(ons) == 1 and ons[0]["ioctl"].startswith("KVM_SET_USER_MEMORY_REGION") and ons[0]["flags"] & 1
    assert "dirty logging on at" in r.stderr            # the text summary is there too


@pytest.mark.kvm
def test_ring_run_shows_the_ring_cap_and_resets(tmp_path):
    cmd = run_cmd(tmp_path, scenario_file(tmp_path, dirty_mode="ring"))
    r, d = traced_json(tmp_path, *cmd)
    assert r.returncode == 0 == d["exit_code"], r.stderr
    s = d["summary"]
    assert any(c["cap"] == "DIRTY_LOG_RING" and c["on"] == "vm" and c["ret"] == 0 and c["args"][0] > 0
               for c in s["caps_enabled"])
    assert s["counts"]["KVM_RESET_DIRTY_RINGS"] >= 1 and s["counts"]["KVM_GET_DIRTY_LOG"] == 0
    (slot,) = [m for m in s["memslots"] if m["slot"] == 1]
    assert len(slot["dirty_log_windows"]) == 1


FORK_AND_THREAD = """
import fcntl, os, sys, threading
pid = os.fork()
if pid == 0:
    kvm = os.open("/dev/kvm", os.O_RDWR)
    def vm():
        fd = fcntl.ioctl(kvm, 0xAE01, 0)                 # KVM_CREATE_VM
        fcntl.ioctl(fd, 0xAE03, 192)                     # KVM_CHECK_EXTENSION(DIRTY_LOG_RING) on the VM
    t = threading.Thread(target=vm); t.start(); t.join()
    os._exit(0)
os.waitpid(pid, 0)
sys.exit(3)
"""


@pytest.mark.kvm
def test_children_and_their_threads_are_followed_and_the_exit_code_passes_through():
    r = trace("--json", "--", sys.executable, "-c", FORK_AND_THREAD)
    assert r.returncode == 3, r.stderr
    d = json.loads(r.stdout)
    assert d["exit_code"] == 3 and d["summary"]["counts"]["KVM_CREATE_VM"] == 1
    (create,) = [e for e in d["events"] if e["ioctl"] == "KVM_CREATE_VM"]
    assert create["pid"] != d["pid"] and create["tid"] != create["pid"]        # a thread of the child
    (check,) = [e for e in d["events"] if e["ioctl"] == "KVM_CHECK_EXTENSION"]
    assert check["on"] == "vm" and check["cap"] == "DIRTY_LOG_RING" and check["ret"] > 0


def test_death_by_signal_is_128_plus_the_signal(tmp_path):
    r, d = traced_json(tmp_path, sys.executable, "-c", "import os, signal; os.kill(os.getpid(), signal.SIGKILL)")
    assert r.returncode == 128 + signal.SIGKILL == d["exit_code"] and d["signal"] == "SIGKILL"


@pytest.mark.kvm
def test_attach_to_a_running_run_and_detach_at_its_end(tmp_path):
    # the hang comes late (recovery), so a tracer that is slow to start on a busy box still
    # joins before the passes' KVM_RUNs: a KVM_RUN entered before the attach is not counted
    cmd = run_cmd(tmp_path, scenario_file(tmp_path), "--inject-hang", "recovery", "--phase-timeout", "3")
    bg = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:          # attach once its VM exists
            try:
                if any(os.readlink(f"/proc/{bg.pid}/fd/{f}") == "anon_inode:kvm-vm"
                       for f in os.listdir(f"/proc/{bg.pid}/fd")):
                    break
            except OSError:
                pass
            time.sleep(0.02)
        out = tmp_path / "attach.json"
        r = trace("-o", str(out), "--pid", str(bg.pid))
        own = bg.wait(timeout=30)
    finally:
        if bg.poll() is None:
            bg.kill()
            bg.wait()
    d = json.loads(out.read_text())
    assert own == 1 and r.returncode == own == d["exit_code"], (r.stderr, bg.stderr and bg.stderr.read())
    assert d["attached"] and d["pid"] == bg.pid and not d["interrupted"]
    (vcpu,) = d["summary"]["vcpu_threads"]
    assert vcpu["runs"] >= 1 and vcpu["tid"] != bg.pid
    results = json.loads(next((tmp_path / "out-s-bitmap").rglob("results.json")).read_text())
    assert "guest hung in phase recovery" in json.dumps(results)    # the run went on as it would untraced


HOLD = "import sys, threading, time; threading.Thread(target=time.sleep, args=(60,), daemon=True).start(); " \
       "print('ready', flush=True); time.sleep(60)"


def test_sigterm_detaches_and_leaves_the_process_running():
    held = subprocess.Popen([sys.executable, "-c", HOLD], stdout=subprocess.PIPE, text=True)
    try:
        assert held.stdout and held.stdout.readline() == "ready\n"
        tr = subprocess.Popen([sys.executable, "-m", "kvmsplit", "trace", "-q", "--pid", str(held.pid)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + 10           # wait until every thread is traced
        while time.monotonic() < deadline:
            tracers = {Path(f"/proc/{held.pid}/task/{t}/status").read_text().split("TracerPid:")[1].split()[0]
                       for t in os.listdir(f"/proc/{held.pid}/task")}
            if tracers == {str(tr.pid)}:
                break
            time.sleep(0.02)
        tr.send_signal(signal.SIGTERM)
        _, err = tr.communicate(timeout=10)
        assert tr.returncode == EXIT_INTERRUPTED, err
        assert "detached" in err
        for t in os.listdir(f"/proc/{held.pid}/task"):
            status = Path(f"/proc/{held.pid}/task/{t}/status").read_text()
            assert "TracerPid:\t0" in status and "State:\tS" in status
        assert held.poll() is None
    finally:
        held.kill()
        held.wait()


@pytest.mark.parametrize("args,code,words", [
    ((), EXIT_USAGE, "either a command"),
    (("--pid", "1", "--", "true"), EXIT_USAGE, "either a command"),
    (("--pid", "0"), EXIT_USAGE, "not a process id"),
    (("--", "/nonexistent/cmd"), EXIT_USAGE, "cannot run"),
    (("--pid", "2"), EXIT_UNAVAILABLE, "cannot attach to pid 2"),           # kthreadd: a kernel thread
    (("--pid", "4194304"), EXIT_UNAVAILABLE, "no such process"),            # past pid_max's ceiling
])
def test_usage_and_attach_errors_are_one_line(args, code, words):
    r = trace(*args)
    assert r.returncode == code, r.stderr
    assert r.stderr.count("\n") == 1 and words in r.stderr and "Traceback" not in r.stderr
