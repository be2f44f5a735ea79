"""Real OpenSSH servers as the boxes of `kvmsplit remote`'s tests.

Each box is /usr/sbin/sshd (Debian's openssh-server) with a config, host
key and authorized key of its own, run as root in the foreground: one on
127.0.0.1, the others each in a network namespace of their own (a veth
pair, an address per box), so that a box can be killed, cut off the
network or "rebooted" without touching the others.

A reboot cannot happen here; a box emulates it: sshd runs in a private
mount namespace where /proc/sys/kernel/random/boot_id and /usr/bin/uname
are bind mounts of files the test writes, and its sessions' PATH starts
with a directory of shims (`kexec`, `systemctl`, `grub-reboot`, ...) that
record how they were called. `kexec -e` asks the lab to reboot the box:
its whole sshd (sessions included) is killed, and a new one starts with a
new boot_id and the release the test chose, or none at all (a box that
never comes back). A box may see more of the test's files in place of its
own (`binds`): e.g. a module's parameters directory with a writable file, which
no real module parameter here is.

Everything is torn down by close(): processes (by netns, or by walking
the process tree), namespaces, veths, the privsep directory if we made it,
temporary files.
"""
from __future__ import annotations

import os
import shlex
import shutil
import signal
import socket
import subprocess
import threading
import time
import uuid
from pathlib import Path

import paramiko

SSHD = "/usr/sbin/sshd"
PRIVSEP = Path("/run/sshd")

SHIMS = {
    # records its arguments; `kexec -e` is the moment the box "reboots"
    "kexec": '#!/bin/sh\necho "kexec $*" >> "$KVS_SHIM_LOG"\n'
             'case "$1" in -e) : > "$KVS_SHIM_DIR/reboot-requested"; sleep 30;; esac\nexit 0\n',
    # never the real one: this machine must not reboot
    "systemctl": '#!/bin/sh\necho "systemctl $*" >> "$KVS_SHIM_LOG"\nexit 1\n',
    "reboot": '#!/bin/sh\necho "reboot $*" >> "$KVS_SHIM_LOG"\n: > "$KVS_SHIM_DIR/reboot-requested"\nsleep 30\n',
    "update-grub": '#!/bin/sh\necho "update-grub $*" >> "$KVS_SHIM_LOG"\nexit 0\n',
    "grub-probe": '#!/bin/sh\necho "grub-probe $*" >> "$KVS_SHIM_LOG"\necho 1234-abcd\n',
    "grub-reboot": '#!/bin/sh\necho "grub-reboot $*" >> "$KVS_SHIM_LOG"\nexit 0\n',
    "grub-set-default": '#!/bin/sh\necho "grub-set-default $*" >> "$KVS_SHIM_LOG"\nexit 0\n',
}


def _run(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(list(args), check=check, capture_output=True, text=True)


def descendants(pid: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                ppid = int(Path(f"/proc/{d}/stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(d))
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo += children.get(p, [])
    return out


class Box:
    def __init__(self, lab: Lab, name: str, index: int, netns: bool, binds: dict[str, Path] | None = None):
        self.lab, self.name, self.index = lab, name, index
        self.binds = binds or {}            # a path on the box -> the test's file or directory seen there
        self.dir = lab.tmp / name
        self.dir.mkdir()
        self.tmp = self.dir / "tmp"        # the box's /tmp (sshd's TMPDIR), to see what a run leaves there
        self.tmp.mkdir()
        self.ns = f"kvs{os.getpid() % 100000}b{index}" if netns else None
        self.veth = f"kvs{os.getpid() % 100000}h{index}"
        self.port = 2222
        self.proc: subprocess.Popen | None = None
        self.boot_id = str(uuid.uuid4())
        self.release = os.uname().release
        self.comes_back_as: str | None = None       # release after a reboot; None: never comes back
        self.reboots = 0
        if netns:
            net = f"10.{200 + os.getpid() % 50}.{index}"
            self.addr = f"{net}.2"
            _run("ip", "netns", "add", self.ns)
            _run("ip", "link", "add", self.veth, "type", "veth", "peer", "name", "eth0", "netns", self.ns)
            _run("ip", "addr", "add", f"{net}.1/30", "dev", self.veth)
            _run("ip", "link", "set", self.veth, "up")
            _run("ip", "-n", self.ns, "addr", "add", f"{self.addr}/30", "dev", "eth0")
            _run("ip", "-n", self.ns, "link", "set", "eth0", "up")
            _run("ip", "-n", self.ns, "link", "set", "lo", "up")
        else:
            self.addr = "127.0.0.1"
            with socket.socket() as s:
                s.bind(("127.0.0.1", 0))
                self.port = s.getsockname()[1]
        self.host_key = self.dir / "ssh_host_ed25519_key"
        _run("ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(self.host_key))
        self.shims = self.dir / "shims"
        self.shims.mkdir()
        for name_, text in SHIMS.items():
            (self.shims / name_).write_text(text)
            (self.shims / name_).chmod(0o755)
        self.shim_log = self.dir / "shim.log"
        self.shim_log.touch()

    # -- what the controller needs ------------------------------------------------------
    def known_hosts_line(self) -> str:
        pub = (self.dir / "ssh_host_ed25519_key.pub").read_text().split()
        host = self.addr if self.port == 22 else f"[{self.addr}]:{self.port}"
        return f"{host} {pub[0]} {pub[1]}\n"

    def inventory(self, **extra) -> str:
        lines = [f"[box.{self.name}]", f'host = "{self.addr}"', f"port = {self.port}"]
        for k, v in extra.items():
            lines.append(f"{k} = {_toml(v)}")
        return "\n".join(lines) + "\n"

    # -- life ------------------------------------------------------------------------------
    def _config(self) -> Path:
        cfg = self.dir / "sshd_config"
        cfg.write_text("\n".join([
            f"Port {self.port}", f"ListenAddress {self.addr}", f"HostKey {self.host_key}",
            f"AuthorizedKeysFile {self.lab.authorized_keys}", f"PidFile {self.dir}/sshd.pid",
            "PermitRootLogin prohibit-password", "PasswordAuthentication no", "KbdInteractiveAuthentication no",
            "UsePAM no", "StrictModes no", "LogLevel ERROR", "PrintMotd no",
            f"SetEnv PATH={self.shims}:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin "
            f"KVS_SHIM_LOG={self.shim_log} KVS_SHIM_DIR={self.dir} TMPDIR={self.tmp}",
            "Subsystem sftp internal-sftp", ""]))
        return cfg

    def start(self) -> None:
        (self.dir / "boot_id").write_text(self.boot_id + "\n")
        (self.dir / "uname").write_text(
            f'#!/bin/sh\ncase "$1" in -r) echo {self.release};; *) exec {self.dir}/uname.real "$@";; esac\n')
        (self.dir / "uname").chmod(0o755)
        if not (self.dir / "uname.real").exists():
            shutil.copy("/usr/bin/uname", self.dir / "uname.real")
        (self.dir / "boot").mkdir(exist_ok=True)
        # the box's /boot is its own: a grub-reboot switch copies the kernel there (never into the host's)
        inner = (f"mount --bind {self.dir}/boot_id /proc/sys/kernel/random/boot_id && "
                 f"mount --bind {self.dir}/uname /usr/bin/uname && mount --bind {self.dir}/boot /boot && "
                 + "".join(f"mount --bind {shlex.quote(str(src))} {shlex.quote(dst)} && "
                           for dst, src in self.binds.items())
                 + f"exec {SSHD} -D -e -f {self._config()}")
        cmd = ["unshare", "-m", "--propagation", "private", "sh", "-c", inner]
        if self.ns:
            cmd = ["ip", "netns", "exec", self.ns, *cmd]
        log = open(self.dir / "sshd.log", "ab")
        self.proc = subprocess.Popen(cmd, stdout=log, stderr=log, stdin=subprocess.DEVNULL, start_new_session=True)
        log.close()
        self._wait_listening()

    def _wait_listening(self, timeout: float = 10.0) -> None:
        t0 = time.monotonic()
        while time.monotonic() - t0 < timeout:
            if self.proc and self.proc.poll() is not None:
                raise RuntimeError(f"sshd for {self.name} exited: {(self.dir / 'sshd.log').read_text()[-500:]}")
            try:
                with socket.create_connection((self.addr, self.port), timeout=1) as s:
                    if s.recv(4).startswith(b"SSH"):
                        return
            except OSError:
                time.sleep(0.1)
        raise RuntimeError(f"sshd for {self.name} not listening after {timeout}s")

    def pids(self) -> list[int]:
        if self.ns:
            r = _run("ip", "netns", "pids", self.ns, check=False)
            return [int(p) for p in r.stdout.split()]
        return descendants(self.proc.pid) if self.proc and self.proc.poll() is None else []

    def kill(self) -> None:
        """The box dies: its sshd, every session and everything they run."""
        for _ in range(3):
            pids = self.pids()
            if not pids:
                break
            for p in pids:
                try:
                    os.kill(p, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            time.sleep(0.1)
        if self.proc:
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                pass
            self.proc = None

    def unplug(self) -> None:
        """Off the network, silently: no FIN, no RST, nothing."""
        _run("ip", "link", "set", self.veth, "down")

    def plug(self) -> None:
        _run("ip", "link", "set", self.veth, "up")

    def reboot(self) -> None:
        self.kill()
        self.reboots += 1
        if self.comes_back_as is None:
            return
        time.sleep(1)
        self.boot_id, self.release = str(uuid.uuid4()), self.comes_back_as
        self.start()

    def close(self) -> None:
        self.kill()
        if self.ns:
            _run("ip", "link", "del", self.veth, check=False)
            _run("ip", "netns", "del", self.ns, check=False)


class Lab:
    """The boxes of one test module, and the client side: key, known_hosts, inventory."""

    def __init__(self, tmp: Path):
        if not Path(SSHD).exists():
            raise RuntimeError("openssh-server is not installed (scripts/bootstrap.sh test installs it)")
        self.tmp = tmp
        self.made_privsep = not PRIVSEP.exists()
        if self.made_privsep:
            PRIVSEP.mkdir(mode=0o755)
        self.client_key = tmp / "id_ed25519"
        _run("ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(self.client_key))
        self.authorized_keys = tmp / "authorized_keys"
        shutil.copy(f"{self.client_key}.pub", self.authorized_keys)
        self.known_hosts = tmp / "known_hosts"
        self.boxes: list[Box] = []
        self._stop = threading.Event()
        self._watcher = threading.Thread(target=self._watch_reboots, daemon=True)
        self._watcher.start()

    def box(self, name: str, netns: bool = True, known: bool = True, binds: dict[str, Path] | None = None) -> Box:
        b = Box(self, name, len(self.boxes) + 1, netns, binds)
        self.boxes.append(b)
        b.start()
        if known:
            with open(self.known_hosts, "a") as f:
                f.write(b.known_hosts_line())
        return b

    def inventory(self, path: Path, boxes: list[Box], defaults: dict | None = None, **per_box) -> Path:
        d = {"user": "root", "key": str(self.client_key), "known_hosts": str(self.known_hosts),
             **(defaults or {})}
        text = "[defaults]\n" + "".join(f"{k} = {_toml(v)}\n" for k, v in d.items()) + "\n"
        text += "\n".join(b.inventory(**per_box.get(b.name, {})) for b in boxes)
        path.write_text(text)
        return path

    def client(self, box: Box) -> paramiko.SSHClient:
        """A plain paramiko client to a box, for the tests' own look at it."""
        c = paramiko.SSHClient()
        c.load_host_keys(str(self.known_hosts))
        c.connect(box.addr, port=box.port, username="root", key_filename=str(self.client_key),
                  allow_agent=False, look_for_keys=False, timeout=10)
        return c

    def _watch_reboots(self) -> None:
        while not self._stop.wait(0.2):
            for b in self.boxes:
                flag = b.dir / "reboot-requested"
                if flag.exists():
                    flag.unlink()
                    b.reboot()

    def close(self) -> None:
        self._stop.set()
        self._watcher.join(timeout=5)
        for b in self.boxes:
            b.close()
        if self.made_privsep:
            shutil.rmtree(PRIVSEP, ignore_errors=True)


def _toml(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_toml(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{ " + ", ".join(f"{k} = {_toml(x)}" for k, x in v.items()) + " }"
    return '"' + str(v).replace("\\", "\\\\").replace('"', '\\"') + '"'
