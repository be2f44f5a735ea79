"""The boxes kvmsplit may reach, from a TOML inventory:

    [defaults]
    user = "root"
    key = "~/.ssh/id_ed25519"

    [box.epyc-1]
    host = "10.0.0.5"
    port = 22
    labels = ["amd", "nightly"]
    switch = "kexec"            # kexec | grub-reboot | none: how the box boots a kernel under test
    env = { KVMSPLIT_CACHE_DIR = "/var/cache/kvmsplit" }

Every value is data: it reaches the box's shell only through shlex.quote
(remote/ssh.py) and never through a local shell. A key is a path; the
inventory holds no passwords.
"""
from __future__ import annotations

import difflib
import os
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path

from kvmsplit.errors import BadInputError, UsageError, read_toml

DEFAULT_INVENTORY = "~/.config/kvmsplit/boxes.toml"


class SwitchMethod(StrEnum):
    """How a box is switched to a kernel under test. The default GRUB entry
    is never changed: grub-reboot picks the entry for the next boot only."""
    KEXEC = "kexec"
    GRUB_REBOOT = "grub-reboot"
    NONE = "none"

    def commands(self, image: str, initrd: str | None, append: str | None, release: str) -> list[list[str]]:
        """What the box runs (each an argv, quoted on the way) to boot `image`
        once; the last one starts the reboot in the background."""
        if self is SwitchMethod.KEXEC:
            load = ["kexec", "-l", image]
            load += [f"--initrd={initrd}"] if initrd else []
            load += [f"--append={append}"] if append else ["--reuse-cmdline"]
            return [load, ["sh", "-c", "sleep 1; systemctl kexec 2>/dev/null || kexec -e"]]
        if self is SwitchMethod.GRUB_REBOOT:
            boot_image = f"/boot/vmlinuz-{release}"
            cmds = [["cp", image, boot_image]]
            if initrd:
                cmds.append(["cp", initrd, f"/boot/initrd.img-{release}"])
            # Debian's menu ids: gnulinux-advanced-UUID>gnulinux-RELEASE-advanced-UUID
            entry = ('uuid=$(grub-probe --target=fs_uuid /) && '
                     'grub-reboot "gnulinux-advanced-$uuid>gnulinux-$1-advanced-$uuid"')
            cmds += [["update-grub"], ["sh", "-c", entry, "grub-reboot", release],
                     ["sh", "-c", "sleep 1; systemctl reboot || reboot"]]
            return cmds
        raise UsageError("this box's switch method is 'none': it cannot boot another kernel")


@dataclass(frozen=True)
class Box:
    name: str
    host: str
    user: str = "root"
    port: int = 22
    key: str | None = None
    labels: tuple[str, ...] = ()
    switch: SwitchMethod = SwitchMethod.KEXEC
    python: str = "python3"             # the interpreter the box's venv is made from
    workdir: str = ".kvmsplit"          # relative to the login directory
    known_hosts: str | None = None      # default: ~/.ssh/known_hosts
    env: tuple[tuple[str, str], ...] = ()
    pip_args: tuple[str, ...] = ()      # e.g. ["--index-url", "https://mirror/simple"]
    wheelhouse: bool = True             # ship the dependencies (False: the box's index has them)

    def describe(self) -> str:
        return f"{self.name} ({self.user}@{self.host}:{self.port})"

    def to_dict(self) -> dict:
        """What the results record about the box (no key material)."""
        return {"box": self.name, "host": self.host, "port": self.port, "user": self.user,
                "labels": list(self.labels), "switch": str(self.switch)}


KEYS = {"host": str, "user": str, "port": int, "key": str, "labels": list, "switch": str, "python": str,
        "workdir": str, "known_hosts": str, "env": dict, "pip_args": list, "wheelhouse": bool}


def _box(name: str, raw: dict, defaults: dict, where: str) -> Box:
    if not isinstance(raw, dict):
        raise BadInputError(f"{where}: box '{name}' is not a table")
    merged = {**defaults, **raw}
    for k, v in merged.items():
        if k not in KEYS:
            close = difflib.get_close_matches(k, list(KEYS), n=1)
            raise BadInputError(f"{where}: box '{name}': unknown key '{k}'"
                                + (f" (did you mean '{close[0]}'?)" if close else ""))
        if not isinstance(v, KEYS[k]) or (isinstance(v, bool) and KEYS[k] is not bool):
            raise BadInputError(f"{where}: box '{name}': {k} must be {KEYS[k].__name__}, not {type(v).__name__}")
    if "host" not in merged:
        raise BadInputError(f"{where}: box '{name}' has no host")
    if not 0 < merged.get("port", 22) < 65536:
        raise BadInputError(f"{where}: box '{name}': port {merged['port']} out of range")
    try:
        switch = SwitchMethod(merged.get("switch", "kexec"))
    except ValueError:
        raise BadInputError(f"{where}: box '{name}': switch must be one of "
                            f"{', '.join(m.value for m in SwitchMethod)}") from None
    for k in ("labels", "pip_args"):
        if not all(isinstance(x, str) for x in merged.get(k, [])):
            raise BadInputError(f"{where}: box '{name}': {k} must be a list of strings")
    env = merged.get("env", {})
    if not all(isinstance(v, str) for v in env.values()):
        raise BadInputError(f"{where}: box '{name}': env values must be strings")
    key = merged.get("key")
    return Box(name=name, host=merged["host"], user=merged.get("user", "root"), port=merged.get("port", 22),
               key=os.path.expanduser(key) if key else None, labels=tuple(merged.get("labels", [])),
               switch=switch, python=merged.get("python", "python3"), workdir=merged.get("workdir", ".kvmsplit"),
               known_hosts=os.path.expanduser(merged["known_hosts"]) if "known_hosts" in merged else None,
               env=tuple(sorted(env.items())), pip_args=tuple(merged.get("pip_args", [])),
               wheelhouse=merged.get("wheelhouse", True))


@dataclass
class Inventory:
    path: Path
    boxes: dict[str, Box] = field(default_factory=dict)

    @classmethod
    def load(cls, path: str | Path | None = None) -> Inventory:
        p = Path(os.path.expanduser(str(path or os.environ.get("KVMSPLIT_INVENTORY") or DEFAULT_INVENTORY)))
        data = read_toml(p, "inventory")
        defaults = data.get("defaults", {})
        if not isinstance(defaults, dict):
            raise BadInputError(f"{p}: [defaults] is not a table")
        unknown = set(data) - {"defaults", "box"}
        if unknown:
            raise BadInputError(f"{p}: unknown table '{sorted(unknown)[0]}' (expected [defaults] and [box.NAME])")
        boxes = data.get("box", {})
        if not isinstance(boxes, dict) or not boxes:
            raise BadInputError(f"{p}: no boxes (add a [box.NAME] table with a host)")
        return cls(p, {n: _box(n, b, defaults, str(p)) for n, b in boxes.items()})

    def select(self, names: list[str]) -> list[Box]:
        """Boxes by name or label, in inventory order, each once."""
        if not names:
            raise UsageError("name at least one box or label")
        chosen: list[Box] = []
        for n in names:
            hits = [b for b in self.boxes.values() if b.name == n or n in b.labels]
            if not hits:
                known = list(self.boxes) + sorted({lb for b in self.boxes.values() for lb in b.labels})
                close = difflib.get_close_matches(n, known, n=1)
                raise UsageError(f"no box or label '{n}' in {self.path}"
                                 + (f" (did you mean '{close[0]}'?)" if close else ""))
            chosen += [b for b in hits if b not in chosen]
        return chosen
