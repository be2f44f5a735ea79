"""A --matrix combination's module parameters, written on a box instead of
booting it: when every parameter of the combination is writable there
(/sys/module/MOD/parameters/NAME exists, so the module is loaded, and has a
write bit), the values are written over SSH before the run and the ones
found are put back afterwards, whatever happens to the run (a failure,
Ctrl-C). A parameter that is missing or read-only needs a boot with it on
the kernel command line.

Every value and path reaches the box's shell as a quoted word.
"""
from __future__ import annotations

import stat
from collections.abc import Callable
from dataclasses import dataclass

from kvmsplit.errors import UsageError
from kvmsplit.remote.ssh import RemoteError, Session

Say = Callable[[str], None]
WRITE = 'printf "%s\\n" "$1" > "$2"'


@dataclass(frozen=True)
class Param:
    module: str
    name: str
    value: str

    @property
    def path(self) -> str:
        return f"/sys/module/{self.module}/parameters/{self.name}"

    def __str__(self) -> str:
        return f"{self.module}.{self.name}={self.value}"


def params_of(append: str | None) -> list[Param]:
    """A combination's kernel command line ("kvm.eager_page_split=0 kvm.tdp_mmu=1") as parameters."""
    out = []
    for word in (append or "").split():
        name, sep, value = word.partition("=")
        module, dot, param = name.partition(".")
        if not sep or not dot or not module or not param or "/" in name:
            raise UsageError(f"--matrix: '{word}' is not module.param=VALUE")
        out.append(Param(module.replace("-", "_"), param, value))
    return out


def not_writable(session: Session, params: list[Param]) -> str | None:
    """Why the parameters cannot all be written on the box (None: they can)."""
    for p in params:
        try:
            mode = session.sftp.stat(p.path).st_mode or 0
        except FileNotFoundError:
            return f"{p.module}.{p.name} is not there ({p.path}: module not loaded or no such parameter)"
        if not stat.S_IMODE(mode) & 0o222:
            return f"{p.module}.{p.name} is read-only ({p.path})"
    return None


class Written:
    """Parameters written on a box for the length of a `with`, then put back
    (each over a connection of its own: the run in between may be long)."""

    def __init__(self, open_session: Callable[[], Session], params: list[Param], say: Say):
        self.open_session, self.params, self.say = open_session, params, say
        self.found: list[Param] = []

    def __enter__(self) -> Written:
        with self.open_session() as session:
            try:
                for p in self.params:
                    self.found.append(Param(p.module, p.name, _read(session, p)))
                    _write(session, p)
            except BaseException:
                self._put_back(session)
                raise
            self.say(f"{session.box.name}: wrote " + " ".join(map(str, self.params))
                     + " (was " + " ".join(f.value for f in self.found) + ") instead of booting")
        return self

    def __exit__(self, *exc) -> None:
        try:
            with self.open_session() as session:
                self._put_back(session)
        except RemoteError as e:
            self.say(f"warning: could not put back {' '.join(map(str, self.found))}: {e}")

    def _put_back(self, session: Session) -> None:
        """Each parameter back to the value found, the last written first; a failure is said, not raised."""
        found, self.found = self.found, []
        failed = []
        for p in reversed(found):
            try:
                _write(session, p)
            except RemoteError as e:
                failed.append(str(e))
        if failed:
            self.say("warning: could not put back " + "; ".join(failed))
        elif found:
            self.say(f"{session.box.name}: put back " + " ".join(map(str, found)))


def _read(session: Session, p: Param) -> str:
    status, text = session.output(["cat", "--", p.path])
    if status != 0:
        raise RemoteError(f"cannot read {p.path} on {session.box.name}: {text.strip()}")
    return text.strip()


def _write(session: Session, p: Param) -> None:
    status, text = session.output(["sh", "-c", WRITE, "sh", p.value, p.path])
    if status != 0:
        raise RemoteError(f"cannot write {p} on {session.box.name}: {text.strip()}")
