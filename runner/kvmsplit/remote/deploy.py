"""This kvmsplit, on a box: a wheel built from this checkout (cached by a
hash of its sources), installed into a venv in the box's work directory,
with the guests' sources next to it (the guest image is built on the box,
by its compiler). A box that has this exact wheel already is left alone.

The box needs Python with venv, of this Python's version; it needs no
network: the dependencies go with the wheel, as a wheelhouse built here
(`pip wheel`, once per set of requirements) and uploaded once per box. A
box with `wheelhouse = false` installs them from its own package index
instead (`pip_args` may name a mirror).
"""
from __future__ import annotations

import hashlib
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from kvmsplit.errors import UnavailableError
from kvmsplit.locks import locked
from kvmsplit.paths import REPO_ROOT, cache_dir, guests_dir
from kvmsplit.remote.ssh import RemoteError, Session

INSTALL_TIMEOUT = 900.0
PACKAGE_FILES = ("pyproject.toml", "README.md")


def _sources() -> list[Path]:
    pkg = REPO_ROOT / "runner" / "kvmsplit"
    files = [p for p in sorted(pkg.rglob("*")) if p.is_file() and "__pycache__" not in p.parts]
    return [REPO_ROOT / f for f in PACKAGE_FILES] + files


def source_hash(files: list[Path], root: Path) -> str:
    h = hashlib.sha256()
    for f in files:
        h.update(str(f.relative_to(root)).encode() + b"\0" + f.read_bytes() + b"\0")
    return h.hexdigest()[:16]


def _pip(*args: str, what: str) -> None:
    r = subprocess.run([sys.executable, "-m", "pip", *args, "-q", "--disable-pip-version-check"],
                       capture_output=True, text=True)
    if r.returncode:
        raise UnavailableError(f"{what} failed: {(r.stderr or r.stdout).strip()[-300:]}")


def wheel() -> Path:
    """This checkout as a wheel, built once per source state (in a copy: the
    checkout gets no build/ or egg-info from it)."""
    if not (REPO_ROOT / "pyproject.toml").is_file():
        raise UnavailableError(f"{REPO_ROOT}: not a kvmsplit checkout (no pyproject.toml): cannot build the wheel "
                               "to ship to a box")
    files = _sources()
    out = cache_dir() / "remote" / "wheels" / source_hash(files, REPO_ROOT)
    with locked(cache_dir() / "remote" / "build.lock"):
        found = sorted(out.glob("kvmsplit-*.whl"))
        if found:
            return found[0]
        with tempfile.TemporaryDirectory(prefix="kvmsplit-wheel-") as tmp:
            for f in files:
                dst = Path(tmp) / f.relative_to(REPO_ROOT)
                dst.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(f, dst)
            _pip("wheel", "--no-deps", "-w", str(Path(tmp) / "dist"), tmp, what="building kvmsplit's wheel")
            built = next((Path(tmp) / "dist").glob("kvmsplit-*.whl"))
            out.mkdir(parents=True, exist_ok=True)
            shutil.copy2(built, out / (built.name + ".tmp"))
            (out / (built.name + ".tmp")).rename(out / built.name)
        return out / built.name


def requirements(whl: Path) -> list[str]:
    with zipfile.ZipFile(whl) as z:
        meta = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
        text = z.read(meta).decode()
    return sorted(ln.split(":", 1)[1].strip() for ln in text.splitlines()
                  if ln.startswith("Requires-Dist:") and "extra ==" not in ln)


def wheelhouse(whl: Path) -> Path:
    """A wheel of each of kvmsplit's dependencies, for this Python (the
    boxes' must be the same version), built once per set of requirements."""
    reqs = requirements(whl)
    tag = hashlib.sha256(("\n".join(reqs) + f"\n{sys.version_info[:2]}").encode()).hexdigest()[:16]
    house = cache_dir() / "remote" / "wheelhouse" / tag
    with locked(cache_dir() / "remote" / "build.lock"):
        if (house / ".complete").is_file():
            return house
        shutil.rmtree(house, ignore_errors=True)
        _pip("wheel", "-w", str(house), *reqs, what="building the wheelhouse for the boxes")
        (house / ".complete").touch()
    return house


@dataclass
class Deployed:
    kvmsplit: list[str]     # the kvmsplit command on the box, relative to the work directory
    guests: str             # KVMSPLIT_GUESTS_DIR on the box, relative to the work directory
    installed: bool         # False: the box had this wheel already


def deploy(session: Session, say=lambda m: None) -> Deployed:
    box = session.box
    whl = wheel()
    tag = whl.parent.name
    work = box.workdir
    marker = f"venv/.installed-{tag}"
    deployed = Deployed(kvmsplit=["venv/bin/python", "-m", "kvmsplit"], guests=f"guests/{tag}", installed=False)
    if _exists(session, f"{work}/{marker}"):
        return deployed
    say(f"{box.name}: installing kvmsplit ({whl.name}, {tag}) into {work}/venv")
    session.mkdirs(f"{work}/wheels/{tag}")
    session.put(whl, f"{work}/wheels/{tag}/{whl.name}")
    _put_guests(session, f"{work}/guests/{tag}")
    find: list[str] = []
    if box.wheelhouse:
        house = wheelhouse(whl)
        remote_house = f"wheels/deps-{house.name}"
        if not _exists(session, f"{work}/{remote_house}/.complete"):
            session.mkdirs(f"{work}/{remote_house}")
            for dep in sorted(house.glob("*.whl")):
                session.put(dep, f"{work}/{remote_house}/{dep.name}")
            session.put(house / ".complete", f"{work}/{remote_house}/.complete")
        find = ["--no-index", "--find-links", remote_house, "--find-links", f"wheels/{tag}"]
    pip = ["venv/bin/python", "-m", "pip", "install", "-q", "--disable-pip-version-check", *find, *box.pip_args]
    whl_rel = f"wheels/{tag}/{whl.name}"
    for step in ([box.python, "-m", "venv", "venv"], [*pip, whl_rel],
                 [*pip, "--force-reinstall", "--no-deps", whl_rel], ["touch", marker]):
        lines: list[str] = []
        r = session.run(step, timeout=INSTALL_TIMEOUT, cwd=work, on_output=lines.append)
        if r.status != 0:
            tail = "; ".join(lines[-3:])
            raise RemoteError(f"installing kvmsplit failed at `{step[0]} {step[1]}`: "
                              f"{r.lost or ('timed out' if r.timed_out else f'exit {r.status}')}"
                              + (f": {tail}" if tail else ""))
    deployed.installed = True
    return deployed


def _put_guests(session: Session, remote: str) -> None:
    src = guests_dir()
    for f in sorted(src.rglob("*")):
        if f.is_file():
            rel = f.relative_to(src).as_posix()
            session.mkdirs(f"{remote}/{Path(rel).parent.as_posix()}")
            session.put(f, f"{remote}/{rel}")


def _exists(session: Session, path: str) -> bool:
    try:
        session.sftp.stat(path)
        return True
    except FileNotFoundError:
        return False
