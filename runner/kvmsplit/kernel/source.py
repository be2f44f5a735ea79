"""Kernel source trees and the cache: finding Debian's kernel source,
extracting a source tarball into the cache once (safe against a concurrent
kvmsplit), and the line of a failed build's output that explains it.

Both builders use these: `kvmsplit kernel build` (kernel/build.py) and the
KVM selftests (selftests/build.py).
"""
from __future__ import annotations

import re
import shutil
import subprocess
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path

from kvmsplit.errors import BadInputError, NoInputError, UnavailableError
from kvmsplit.locks import locked

DEBIAN_SOURCES = Path("/usr/src")
COMPLETE = ".complete"       # in an extraction: it finished
TARBALL_RE = re.compile(r"\.(tar(\.\w+)?|tgz)$")
_COMPILER_ERROR_RE = re.compile(r":\d+(:\d+)?: (fatal )?error: ")
_OTHER_ERROR_RE = re.compile(r"error|not found|No such file|\*\*\*", re.IGNORECASE)


# -- finding the source ---------------------------------------------------------------------
def is_tarball(path: Path) -> bool:
    return TARBALL_RE.search(path.name) is not None


def tarball_stem(path: Path) -> str:
    """linux-source-6.12.tar.xz -> linux-source-6.12"""
    return TARBALL_RE.sub("", path.name)


def version_key(path: Path) -> tuple[int, ...]:
    """The version in a linux-source-X name as numbers: 6.9 < 6.12 < 6.12.1."""
    return tuple(int(x) for x in re.findall(r"\d+", tarball_stem(path)))


def find_debian_source(root: Path = DEBIAN_SOURCES, *, trees: bool = True) -> Path:
    """The newest kernel source from Debian's linux-source-* packages in
    `root`: a source tarball, or (with `trees`) an extracted tree with a
    Makefile, which beats the tarball of the same version."""
    found = [p for p in root.glob("linux-source-*")
             if (p.is_file() and is_tarball(p)) or (trees and (p / "Makefile").is_file())]
    if not found:
        what = "kernel source tree or tarball" if trees else "kernel source tarball"
        raise NoInputError(f"no {what} in {root}: give --tree PATH, or install Debian's kernel source "
                           "(apt-get install linux-source-6.12)")
    return max(found, key=lambda p: (version_key(p), p.is_dir()))


# -- the cache ------------------------------------------------------------------------------
def extract_tarball(tarball: Path, dest_root: Path, parts: Sequence[str] | None = None,
                    say: Callable[[str], None] | None = None, *, strip_top: bool = False,
                    prepare: Callable[[Path], None] | None = None) -> Path:
    """The kernel tree in `tarball` (an archive with one top directory),
    extracted once to `dest_root`, and returned: `dest_root/<top directory>`,
    or with `strip_top` the top directory itself becomes `dest_root`.

    `parts`: only these paths at the top of the tree (all when None).
    `prepare(tree)` runs on the new tree before it is put in place.

    Safe against a concurrent kvmsplit: under a lock file next to
    `dest_root`, the tarball is extracted into a temporary directory beside
    it, marked complete (a `.complete` file) and renamed into place, so a
    tree without the marker is a leftover and is extracted again, and a
    second extraction of the same tarball waits for the first and reuses it.
    """
    tarball = Path(tarball)
    with locked(dest_root.with_name(dest_root.name + ".lock")):
        if not (dest_root / COMPLETE).exists():
            if shutil.which("tar") is None:
                raise UnavailableError(f"cannot extract {tarball}: tar not found (apt-get install tar)")
            if say:
                say(f"extracting {tarball} into {dest_root} (once)")
            prefix = f".{dest_root.name}.extract-"
            for stale in dest_root.parent.glob(prefix + "*"):     # from a killed kvmsplit
                shutil.rmtree(stale, ignore_errors=True)
            shutil.rmtree(dest_root, ignore_errors=True)
            tmp = Path(tempfile.mkdtemp(dir=dest_root.parent, prefix=prefix))
            try:
                _untar(tarball, tmp, parts)
                top = _top(tarball, tmp)
                if prepare:
                    prepare(top)
                done = top if strip_top else tmp
                (done / COMPLETE).touch()
                done.rename(dest_root)
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
    return dest_root if strip_top else _top(tarball, dest_root)


def _untar(tarball: Path, into: Path, parts: Sequence[str] | None) -> None:
    # "*/PART" with no wildcard across "/": PART at the top of the archive's one directory
    only = ["--wildcards", "--no-wildcards-match-slash", *(f"*/{p}" for p in parts)] if parts else []
    r = subprocess.run(["tar", "-xf", str(tarball), "-C", str(into), *only],
                       check=False, capture_output=True, text=True, stdin=subprocess.DEVNULL)
    if r.returncode:
        why = next((ln.strip() for ln in r.stderr.splitlines() if ln.strip()), f"exit {r.returncode}")
        raise BadInputError(f"{tarball}: cannot extract: {why}")


def _top(tarball: Path, root: Path) -> Path:
    tops = [p for p in root.iterdir() if p.is_dir()]
    if len(tops) != 1:
        raise BadInputError(f"{tarball}: not a kernel source tarball (expected one top directory)")
    return tops[0]


# -- a failed build -------------------------------------------------------------------------
def first_error(log: str) -> str:
    """The line that explains a failed build or command: the compiler's first
    `file:line: error:`, else the first line that mentions an error (or `not
    found`, `***`), else the last line."""
    lines = [ln.strip() for ln in log.splitlines() if ln.strip()]
    hit = next((ln for ln in lines if _COMPILER_ERROR_RE.search(ln)), None) or \
        next((ln for ln in lines if _OTHER_ERROR_RE.search(ln)), None)
    return hit or (lines[-1] if lines else "no output")
