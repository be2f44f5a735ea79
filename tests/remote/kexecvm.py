"""A real Linux VM as a box of `kvmsplit remote boot`, one that a real
kexec reboots.

virtme-ng boots a kernel image in QEMU with this machine's root filesystem
shared read-only (the guest writes to overlays of its own), and runs a
script as its init's command: an empty tmpfs as root's home, the network
(QEMU user networking: the guest's port 22 is forwarded to a free port on
127.0.0.1), then this machine's /usr/sbin/sshd in the foreground, with a
host key and an authorized key made here, in a directory the VM mounts
read-write.

The script reaches the guest on the kernel command line (virtme.exec=...),
so `kexec -l IMAGE --reuse-cmdline` then `kexec -e` start the same init
with the same script: sshd comes back on the new kernel with a new
boot_id, as on a real box. `kexec` in the guest is this machine's
/usr/sbin/kexec (kexec-tools) acting on the guest's kernel: this machine
is never kexec'd.

Root's .bashrc in the guest talks, on stdout and stderr, as many real
boxes' do: what kvmsplit reads from a box must survive that.

close() kills vng's whole process group (vng, virtme-run, QEMU) and
anything else below vng. The console (every boot's kernel log and the
script's output) is console.log in the VM's directory; vng's temporary
files go to its tmp/.
"""
from __future__ import annotations

import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import paramiko

from kvmsplit.kernel.vm import choose_accel
from remote.sshboxes import descendants

SSHD = "/usr/sbin/sshd"
KEXEC = "/usr/sbin/kexec"
MARK = "KVMSPLIT-KEXECVM-SSHD"      # on the console each time the script starts sshd
KEXEC_LINE = "kexec_core: Starting new kernel"
GUEST_ADDR = "10.0.2.15"           # QEMU user networking's first guest address
GATEWAY = "10.0.2.2"
TCG_CPU = "qemu64"
NOISY_BASHRC = "echo 'echo login noise; echo more login noise >&2' > /root/.bashrc"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def keygen(path: Path) -> None:
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(path)], check=True)


def vng_path() -> str | None:
    return shutil.which("vng") or shutil.which("vng", path=str(Path(sys.executable).parent))


class KexecVM:
    """A VM running sshd, reachable at 127.0.0.1:port as root with client_key."""

    def __init__(self, image: Path, workdir: Path, memory: str = "1G"):
        self.image, self.dir, self.memory = image, workdir, memory
        self.dir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.host_key = self.dir / "ssh_host_ed25519_key"
        self.client_key = self.dir / "id_ed25519"
        keygen(self.host_key)
        keygen(self.client_key)
        self.console = self.dir / "console.log"
        self.tmp = self.dir / "tmp"
        self.tmp.mkdir(exist_ok=True)
        self.proc: subprocess.Popen | None = None
        # KVM where the host has vmx/svm; a PVM host's KVM runs a guest kernel in its
        # instruction emulator (it did not finish decompressing one in minutes); TCG boots it in seconds
        self.accel = choose_accel().name

    # -- what the controller needs ------------------------------------------------------
    def known_hosts(self, path: Path) -> Path:
        kind, key = (self.dir / "ssh_host_ed25519_key.pub").read_text().split()[:2]
        path.write_text(f"[127.0.0.1]:{self.port} {kind} {key}\n")
        return path

    def inventory(self, path: Path, name: str, known_hosts: Path) -> Path:
        """A box that boots kernels by kexec (its workdir the default, in the guest's /root)."""
        path.write_text("\n".join([
            f"[box.{name}]", 'host = "127.0.0.1"', f"port = {self.port}", 'user = "root"',
            f'key = "{self.client_key}"', f'known_hosts = "{known_hosts}"', 'switch = "kexec"', ""]))
        return path

    # -- what the tests look at, independently of kvmsplit ---------------------------------
    def boot(self) -> tuple[str, str]:
        """(boot_id, release), read over a plain paramiko connection (stdout only; the
        login noise comes first)."""
        c = paramiko.SSHClient()
        c.set_missing_host_key_policy(paramiko.RejectPolicy())
        c.get_host_keys().add(f"[127.0.0.1]:{self.port}", "ssh-ed25519",
                              paramiko.Ed25519Key(filename=str(self.host_key)))
        c.connect("127.0.0.1", port=self.port, username="root", key_filename=str(self.client_key),
                  allow_agent=False, look_for_keys=False, timeout=30, banner_timeout=30)
        try:
            _, out, _ = c.exec_command("cat /proc/sys/kernel/random/boot_id; uname -r", timeout=60)
            boot_id, release = out.read().decode().split()[-2:]
        finally:
            c.close()
        return boot_id, release

    def console_text(self) -> str:
        return self.console.read_text(errors="replace") if self.console.exists() else ""

    def sshd_starts(self) -> int:
        """How many times the script has started sshd: the first boot, then once per kexec."""
        return self.console_text().count(f"{MARK} up")

    def kexecs(self) -> int:
        """How many times the guest's kernel has handed over to a kexec'd one."""
        return self.console_text().count(KEXEC_LINE)

    def tail(self, n: int = 40) -> str:
        return "\n".join(self.console_text().splitlines()[-n:])

    # -- the guest's side ------------------------------------------------------------------
    def _sshd_config(self) -> Path:
        authorized = self.dir / "authorized_keys"
        shutil.copy(f"{self.client_key}.pub", authorized)
        cfg = self.dir / "sshd_config"
        cfg.write_text("\n".join([
            "Port 22", f"HostKey {self.host_key}", f"AuthorizedKeysFile {authorized}",
            "PermitRootLogin prohibit-password", "PasswordAuthentication no", "KbdInteractiveAuthentication no",
            "UsePAM no", "StrictModes no", "LogLevel ERROR", "PrintMotd no", "UseDNS no",
            "Subsystem sftp internal-sftp", ""]))
        return cfg

    def _script(self) -> str:
        """What the guest runs after each boot."""
        return "; ".join([
            # root's home, in the guest only: writable (the box's workdir), and without this
            # machine's /root/.bashrc, whose pyenv init costs each ssh command ~10 s under TCG
            "mount -t tmpfs -o mode=700 kvmsplit-root /root",
            NOISY_BASHRC,
            "ip link set lo up",
            "nic=$(ls /sys/class/net | grep -vx lo | head -n1)",
            f"ip link set $nic up && ip addr add {GUEST_ADDR}/24 dev $nic && ip route add default via {GATEWAY}",
            "mkdir -p /run/sshd",
            f"echo {MARK} up $(uname -r) $(cat /proc/sys/kernel/random/boot_id)",
            f"exec {SSHD} -D -e -f {shlex.quote(str(self._sshd_config()))}",
        ])

    def _vng_args(self) -> list[str]:
        qemu = f"-netdev user,id=kx,hostfwd=tcp:127.0.0.1:{self.port}-:22 -device virtio-net-pci,netdev=kx"
        # --empty-passwords: virtme-ng's /etc/shadow locks every account ("!"), and sshd refuses
        # a locked root even a key login; this sshd takes keys only
        args = ["-r", str(self.image), "--verbose", "--cpus", "1", "--memory", self.memory,
                "--rwdir", str(self.dir), "--empty-passwords"]
        if self.accel == "tcg":
            args.insert(0, "--disable-kvm")
            qemu = f"-cpu {TCG_CPU} {qemu}"      # the last -cpu wins over vng's `-cpu host`
        return [*args, f"--qemu-opts={qemu}", "--", self._script()]

    # -- life ------------------------------------------------------------------------------
    def start(self, timeout: float = 180.0) -> None:
        vng = vng_path()
        if not vng:
            raise RuntimeError("vng (virtme-ng) not found")
        # vng runs its siblings (virtme-run) through PATH; its temporary files go to TMPDIR
        env = {**os.environ, "TMPDIR": str(self.tmp), "TERM": "dumb",
               "PATH": os.pathsep.join([str(Path(vng).parent), os.environ.get("PATH", "")])}
        with open(self.console, "ab") as log:
            self.proc = subprocess.Popen([vng, *self._vng_args()], stdin=subprocess.DEVNULL, stdout=log,
                                         stderr=log, env=env, cwd=self.dir, start_new_session=True)
        self.wait_ssh(timeout)

    def wait_ssh(self, timeout: float) -> None:
        """Until sshd answers with its banner through the forwarded port."""
        t0 = time.monotonic()
        while time.monotonic() - t0 < timeout:
            if self.proc is None or self.proc.poll() is not None:
                raise RuntimeError(f"the VM exited:\n{self.tail()}")
            if self._banner():
                return
            time.sleep(0.5)
        raise RuntimeError(f"the VM's sshd did not answer in {timeout:.0f}s:\n{self.tail()}")

    def _banner(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=2) as s:
                return s.recv(4).startswith(b"SSH")
        except OSError:
            return False

    def pids(self) -> list[int]:
        return descendants(self.proc.pid) if self.proc and self.proc.poll() is None else []

    def close(self, wait_s: float = 10.0) -> list[int]:
        """Everything vng started is killed; what is still running after wait_s (none, or a bug)."""
        if self.proc is None:
            return []
        below = self.pids()
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)     # the session leader's group: vng and QEMU
        except ProcessLookupError:
            pass
        for p in below:                                  # anything that left the group
            try:
                os.kill(p, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.proc.wait(timeout=30)
        self.proc = None
        t0 = time.monotonic()
        while running(below) and time.monotonic() - t0 < wait_s:
            time.sleep(0.1)
        return running(below)


def running(pids: list[int]) -> list[int]:
    """Those of pids that still run (a zombie does not: it is dead, waiting for its reaper)."""
    alive = []
    for p in pids:
        try:
            state = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except (OSError, IndexError):
            continue
        if state not in ("Z", "X"):
            alive.append(p)
    return alive
