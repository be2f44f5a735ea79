"""One SSH connection to a box (paramiko), with the liveness paramiko lacks.

Host keys are checked against known_hosts with paramiko's RejectPolicy; an
explicit HostKeyTrust.ACCEPT_NEW adds a key seen for the first time, says
so with its fingerprint, and saves it. A key that differs from the known one
is refused either way.

paramiko has no dead-peer detection: its transport keepalive sends a
request that wants no reply, so a box that vanished from the network looks
exactly like one that is quiet. Every read here has its own deadline, and
when a box has been silent for `alive_interval` seconds a keepalive that
wants a reply is sent; no answer within `alive_interval * alive_count`
seconds and the box is dead (ssh's ServerAliveInterval/CountMax). On the
box, commands run under `timeout -k`, so they end even if we are gone, and
under a watchdog that ends them as soon as we are: the channel is the
command's stdin, and EOF on it (kvmsplit here killed, its connection
dropped, the channel closed) sends the command's `timeout` a SIGTERM, which
it passes on to its whole process group, with a SIGKILL after the grace.

Commands are argv lists, joined with shlex.join: no value reaches the box's
shell unquoted. Nothing secret is logged: the key is a path, never read
into a message, and paramiko's own logging goes nowhere.
"""
from __future__ import annotations

import base64
import hashlib
import logging
import os
import shlex
import socket
import stat
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING

from kvmsplit.lazy import lazy
from kvmsplit.remote.inventory import Box

if TYPE_CHECKING:
    import paramiko
else:
    paramiko = lazy("paramiko")     # it pulls in invoke and asyncio: 0.1-0.4 s of every command's start-up

# paramiko logs a box that accepts the connection but sends no banner (a box half up, QEMU's
# port forward during a reboot) as an ERROR with a traceback; with no handler, Python's
# last-resort handler printed it on stderr. What went wrong is said by kvmsplit, in one line.
logging.getLogger("paramiko").addHandler(logging.NullHandler())

Say = Callable[[str], None]
CONNECT_TIMEOUT = 15.0
KILL_GRACE = 10          # seconds `timeout -k` gives a command after TERM
PID_MARK = "@@kvmsplit-remote-pid "
# "$@" (`timeout ...`: its own process group) in the background, its pid said;
# a watchdog reads the channel (our stdin, fd 3 in it: an asynchronous list's
# stdin is /dev/null) until EOF, then stops the command; the command's end
# stops the watchdog; the shell exits with the command's status. The shell's
# own stderr is /dev/null (fd 4 keeps the channel's for the command): dash
# says "Terminated" when the command is killed, and that write into a closed
# channel killed the shell by SIGPIPE before it could clean up. The command
# gets a TMPDIR of its own, removed when it ends however it ends: what a killed
# `python -m venv` (ensurepip's wheels) or any other killed tool leaves in it
# goes with it. --one-file-system: a tracefs a killed kvmsplit left mounted
# there is skipped, never walked (its rmdir would remove trace instances).
WATCHED = ('exec 3<&0 4>&2 2>/dev/null; '
           't=$(mktemp -d "${TMPDIR:-/tmp}/kvmsplit-box.XXXXXX") && export TMPDIR="$t"; '
           '"$@" </dev/null 2>&4 3<&- 4>&- & pid=$!; echo "' + PID_MARK + '$pid"; '
           '( while read -r _; do :; done; kill -TERM "$pid" ) <&3 4>&- & watch=$!; '
           'exec 3<&- 4>&-; wait "$pid"; rc=$?; kill "$watch"; '
           '[ -n "$t" ] && rm -rf --one-file-system "$t"; exit "$rc"')
CHUNK = 1 << 16


class RemoteError(Exception):
    """A box that cannot be reached or stopped answering: one line, no secrets."""


class HostKeyRefused(RemoteError):
    pass


def fingerprint(key: paramiko.PKey) -> str:
    digest = hashlib.sha256(key.asbytes()).digest()
    return "SHA256:" + base64.b64encode(digest).decode().rstrip("=")


class HostKeyTrust(StrEnum):
    """What to do with a host key known_hosts does not have."""
    KNOWN = "known"             # refuse (paramiko RejectPolicy)
    ACCEPT_NEW = "accept-new"   # add it, say so, save it (a changed key is still refused)

    def policy(self, box: Box, say: Say) -> paramiko.MissingHostKeyPolicy | _AcceptNew:
        if self is HostKeyTrust.KNOWN:
            return paramiko.RejectPolicy()
        return _AcceptNew(box, say)


class _AcceptNew:
    """paramiko's MissingHostKeyPolicy interface (missing_host_key), without subclassing it at
    import time."""

    def __init__(self, box: Box, say: Say):
        self.box, self.say = box, say

    def missing_host_key(self, client, hostname, key):
        client.get_host_keys().add(hostname, key.get_name(), key)
        path = known_hosts_path(self.box)
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "a") as f:
            f.write(f"{hostname} {key.get_name()} {key.get_base64()}\n")
        self.say(f"{self.box.name}: accepted a NEW host key for {hostname}: {key.get_name()} "
                 f"{fingerprint(key)} (saved to {path})")


def known_hosts_path(box: Box) -> Path:
    return Path(box.known_hosts or os.path.expanduser("~/.ssh/known_hosts"))


@dataclass
class Liveness:
    alive_interval: float = 10.0     # silence before a keepalive that wants a reply
    alive_count: int = 3             # unanswered intervals before the box is dead

    @property
    def dead_after(self) -> float:
        return self.alive_interval * self.alive_count


@dataclass
class Exit:
    """How a remote command ended: its status, or why there is none."""
    status: int | None
    lost: str | None = None          # the connection died: why
    timed_out: bool = False          # our own deadline passed (the box's `timeout` should have fired first)


class Session:
    def __init__(self, box: Box, client: paramiko.SSHClient, live: Liveness):
        self.box, self.client, self.live = box, client, live
        transport = client.get_transport()
        assert transport is not None
        self.transport: paramiko.Transport = transport
        self._sftp: paramiko.SFTPClient | None = None

    @classmethod
    def open(cls, box: Box, trust: HostKeyTrust = HostKeyTrust.KNOWN, live: Liveness | None = None,
             say: Say = lambda m: None, timeout: float = CONNECT_TIMEOUT) -> Session:
        live = live or Liveness()
        client = paramiko.SSHClient()
        kh = known_hosts_path(box)
        if kh.is_file():
            client.load_host_keys(str(kh))
        client.set_missing_host_key_policy(trust.policy(box, say))
        try:
            client.connect(box.host, port=box.port, username=box.user, key_filename=box.key, timeout=timeout,
                           banner_timeout=timeout, auth_timeout=timeout, channel_timeout=timeout,
                           allow_agent=box.key is None, look_for_keys=box.key is None)
        except paramiko.BadHostKeyException as e:
            client.close()
            raise HostKeyRefused(f"{box.describe()}: REFUSED: its host key ({e.key.get_name()} "
                                 f"{fingerprint(e.key)}) differs from the one in {kh}; if the box was "
                                 "reinstalled, remove the old key with ssh-keygen -R") from None
        except paramiko.SSHException as e:
            client.close()
            if "not found in known_hosts" in str(e):
                raise HostKeyRefused(f"{box.describe()}: REFUSED: its host key is not in {kh}; "
                                     "check it and add it, or pass --accept-new-host-key") from None
            raise RemoteError(f"{box.describe()}: ssh failed: {e}") from None
        except (OSError, EOFError) as e:
            client.close()
            why = "timed out" if isinstance(e, socket.timeout) else (getattr(e, "strerror", None) or str(e))
            raise RemoteError(f"{box.describe()}: cannot connect: {why}") from None
        session = cls(box, client, live)
        session.transport.set_keepalive(max(1, int(live.alive_interval)))
        return session

    def close(self) -> None:
        if self._sftp is not None:
            try:
                self._sftp.close()
            except (OSError, EOFError, paramiko.SSHException):
                pass
        self.client.close()

    def __enter__(self) -> Session:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- liveness ------------------------------------------------------------------------
    def alive(self) -> bool:
        """A keepalive that wants a reply (OpenSSH answers unknown requests
        with a failure, which is an answer), waited for at most dead_after."""
        if not self.transport.is_active():
            return False
        answered = threading.Event()

        def ask() -> None:
            try:
                self.transport.global_request("keepalive@openssh.com", wait=True)
                answered.set()
            except (OSError, EOFError, paramiko.SSHException):
                pass
        t = threading.Thread(target=ask, daemon=True, name=f"keepalive-{self.box.name}")
        t.start()
        ok = answered.wait(self.live.dead_after) and self.transport.is_active()
        if not ok:
            self.transport.close()      # ends the waiting thread too
        return ok

    # -- commands ------------------------------------------------------------------------
    def run(self, argv: list[str], *, timeout: float, cwd: str | None = None, env: dict[str, str] | None = None,
            on_output: Callable[[str], None] | None = None, stop: threading.Event | None = None) -> Exit:
        """argv on the box under `timeout -k`, its output (stdout and stderr
        together) passed on line by line as it comes; never waits past
        timeout + the kill grace + the liveness deadline. When `stop` is
        set (Ctrl-C here), the command gets a SIGTERM on the box (`timeout`
        passes it on) and the grace to finish, so its results are kept; so
        it does when this process or its connection goes away (WATCHED)."""
        words = ["sh", "-c", WATCHED, "sh", "timeout", "-k", str(KILL_GRACE), f"{timeout:g}"]
        if env:
            words += ["env", *[f"{k}={v}" for k, v in env.items()]]
        command = shlex.join(words + argv)
        if cwd:
            command = f"cd {shlex.quote(cwd)} && {command}"
        return self.shell(command, deadline=time.monotonic() + timeout + KILL_GRACE + self.live.dead_after,
                          on_output=on_output, stop=stop)

    def _terminate(self, pid: str) -> None:
        """SIGTERM to a command of ours on the box, by the pid it told us."""
        try:
            chan = self.transport.open_session(timeout=self.live.dead_after)
            chan.exec_command(shlex.join(["kill", "-TERM", pid]))
            chan.status_event.wait(self.live.dead_after)
            chan.close()
        except (OSError, EOFError, paramiko.SSHException):
            pass

    def shell(self, command: str, *, deadline: float, on_output: Callable[[str], None] | None = None,
              stop: threading.Event | None = None) -> Exit:
        """A command line made only of quoted words (see run), read with our own deadlines."""
        pid: list[str] = []
        stopping = False

        def output(line: str) -> None:
            if line.startswith(PID_MARK) and not pid:
                pid.append(line[len(PID_MARK):].strip())
            elif on_output:
                on_output(line)
        try:
            chan = self.transport.open_session(timeout=self.live.dead_after)
            chan.set_combine_stderr(True)
            chan.exec_command(command)
        except (OSError, EOFError, paramiko.SSHException) as e:
            return Exit(None, lost=f"cannot start a command: {e or type(e).__name__}")
        chan.settimeout(min(1.0, self.live.alive_interval))
        pending = b""
        heard = time.monotonic()
        try:
            while True:
                now = time.monotonic()
                if now > deadline:
                    return Exit(None, timed_out=True)
                if stop is not None and stop.is_set() and not stopping:
                    stopping = True
                    if pid:
                        self._terminate(pid[0])
                    deadline = min(deadline, now + KILL_GRACE + 5)
                try:
                    data = chan.recv(CHUNK)
                except TimeoutError:
                    if now - heard >= self.live.alive_interval:
                        if not self.alive():
                            return Exit(None, lost=f"no answer for {self.live.dead_after:g}s (box dead or "
                                                   "off the network)")
                        heard = time.monotonic()
                    continue
                except (OSError, EOFError, paramiko.SSHException) as e:
                    return Exit(None, lost=f"connection lost: {e or type(e).__name__}")
                heard = time.monotonic()
                if not data:
                    break
                pending = _emit(pending + data, output)
            _emit(pending + b"\n", output) if pending else None
            if not self.transport.is_active():
                return Exit(None, lost="connection lost")
            # EOF: the exit status follows at once unless the connection died
            if chan.status_event.wait(timeout=min(self.live.dead_after, max(0.0, deadline - time.monotonic()))):
                status = chan.recv_exit_status()
                if status == -1:
                    return Exit(None, lost="the command ended without an exit status (connection lost?)")
                return Exit(status)
            return Exit(None, lost="connection lost before the command's exit status")
        finally:
            chan.close()

    def output(self, argv: list[str], timeout: float = 30.0) -> tuple[int | None, str]:
        """A short command's status and output."""
        lines: list[str] = []
        r = self.run(argv, timeout=timeout, on_output=lines.append)
        if r.status is None:
            raise RemoteError(f"{self.box.describe()}: {shlex.join(argv)}: {r.lost or 'timed out'}")
        return r.status, "\n".join(lines)

    # -- files ----------------------------------------------------------------------------
    @property
    def sftp(self) -> paramiko.SFTPClient:
        if self._sftp is None:
            self._sftp = self.client.open_sftp()
            self._sftp.get_channel().settimeout(self.live.dead_after)
        return self._sftp

    def put(self, local: Path, remote: str) -> None:
        self.sftp.put(str(local), remote)

    def mkdirs(self, remote: str) -> None:
        path = ""
        for part in remote.split("/"):
            path = f"{path}/{part}" if path else (part or "/")
            if part in ("", "."):
                continue
            try:
                self.sftp.stat(path)
            except FileNotFoundError:
                self.sftp.mkdir(path)

    def get_tree(self, remote: str, local: Path) -> int:
        """A remote directory, recursively, into `local`; the number of files."""
        local.mkdir(parents=True, exist_ok=True)
        n = 0
        for entry in self.sftp.listdir_attr(remote):
            src, dst = f"{remote}/{entry.filename}", local / entry.filename
            mode = entry.st_mode or 0
            if stat.S_ISDIR(mode):
                n += self.get_tree(src, dst)
            elif stat.S_ISREG(mode):
                self.sftp.get(src, str(dst))
                n += 1
        return n


def _emit(buf: bytes, on_output: Callable[[str], None] | None) -> bytes:
    """Whole lines (\\n or a progress line's \\r) to on_output; the rest back."""
    *lines, rest = buf.replace(b"\r\n", b"\n").replace(b"\r", b"\n").split(b"\n")
    if on_output:
        for ln in lines:
            text = ln.decode("utf-8", "replace").rstrip()
            if text:
                on_output(text)
    return rest
