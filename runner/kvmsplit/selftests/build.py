"""Building the kernel's KVM selftests (tools/testing/selftests/kvm), cached.

The source tree is only read: `make headers` writes into the cache with O=,
and the selftests with OUTPUT= next to it. A source tarball (Debian's
/usr/src/linux-source-6.12.tar.xz) is extracted into the cache once, and only
the parts the build reads. The build directory is keyed by the tree's path
and kernel version; a stamp over the inputs (file sizes and mtimes, the
compiler) lets an unchanged tree skip make entirely, and a changed one gets an
incremental make in the same directory.

Layout under `cache_dir()/selftests/`:
  src/<tarball>-<key>/<top dir>/     an extracted tarball
  build/<version>-<key>/usr/include  the uapi headers (`make headers`)
  build/<version>-<key>/kvm/         the test binaries, x86_64/ included
  build/<version>-<key>/build.log    the last build's output
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from kvmsplit.errors import BadInputError, NoInputError, UnavailableError
from kvmsplit.kernel.source import (
    DEBIAN_SOURCES,
    extract_tarball,
    find_debian_source,
    first_error,
    is_tarball,
    locked,
    tarball_stem,
)
from kvmsplit.paths import cache_dir

SELFTESTS = "tools/testing/selftests/kvm"
# All that `make headers` and the KVM selftests read: 160 MB of a 1.7 GB tree.
TARBALL_PARTS = ("Makefile", "scripts", "include", "arch/x86", "tools", "usr")
# Inputs whose change means the binaries may change (walked for the stamp).
STAMP_INPUTS = ("Makefile", SELFTESTS, "tools/testing/selftests/lib.mk",
                "tools/testing/selftests/kselftest.h", "tools/include", "tools/arch/x86/include",
                "include/uapi", "arch/x86/include/uapi", "arch/x86/entry/syscalls")
# A binary that every kernel's KVM selftests build: proof a build finished.
SENTINEL = "kvm_binary_stats_test"


@dataclass
class SelftestBuild:
    tree: Path              # the kernel source tree the tests were built from
    source: str             # what was asked for: the tree, or the tarball it came from
    version: str            # the kernel version in the tree's Makefile, e.g. 6.12.117
    directory: Path         # the build directory in the cache
    cached: bool            # nothing had to be rebuilt
    seconds: float

    @property
    def bindir(self) -> Path:
        return self.directory / "kvm"

    def binary(self, test: str) -> Path:
        return self.bindir / test

    def to_dict(self) -> dict:
        return {"tree": str(self.tree), "source": self.source, "version": self.version,
                "directory": str(self.directory), "cached": self.cached}


# -- finding the source ---------------------------------------------------------------------
def default_source() -> Path:
    """The tree from Debian's linux-source-* package: an extracted
    /usr/src/linux-source-X/ if there is one, else its tarball; the newest."""
    return find_debian_source(DEBIAN_SOURCES)


def kernel_version(tree: Path) -> str:
    fields = {}
    for line in (tree / "Makefile").read_text(errors="replace").splitlines()[:12]:
        k, sep, v = line.partition("=")
        if sep and k.strip() in ("VERSION", "PATCHLEVEL", "SUBLEVEL", "EXTRAVERSION"):
            fields[k.strip()] = v.strip()
    if "VERSION" not in fields or "PATCHLEVEL" not in fields:
        raise BadInputError(f"{tree}: not a kernel source tree (its Makefile has no VERSION/PATCHLEVEL)")
    return f"{fields['VERSION']}.{fields['PATCHLEVEL']}.{fields.get('SUBLEVEL') or 0}" \
           f"{fields.get('EXTRAVERSION', '')}"


def check_tree(tree: Path) -> str:
    """The kernel version of `tree`, or BadInputError if it is no kernel tree."""
    if not (tree / "Makefile").is_file():
        raise BadInputError(f"{tree}: not a kernel source tree (no Makefile)")
    version = kernel_version(tree)
    if not (tree / SELFTESTS / "Makefile").is_file():
        raise BadInputError(f"{tree}: not a kernel source tree with KVM selftests (no {SELFTESTS}/Makefile)")
    return version


def source_tree(path: Path, say: Callable[[str], None] | None = None) -> Path:
    """A kernel tree from a directory or a source tarball (extracted into the cache)."""
    if not path.exists():
        raise NoInputError(f"{path}: no such file or directory")
    if path.is_dir():
        return path.resolve()
    if not is_tarball(path):
        raise BadInputError(f"{path}: neither a kernel source tree nor a source tarball")
    return _extract(path.resolve(), say)


def _key(*parts: object) -> str:
    return hashlib.sha256("\0".join(map(str, parts)).encode()).hexdigest()[:12]


def _extract(tarball: Path, say: Callable[[str], None] | None) -> Path:
    st = tarball.stat()
    dest = cache_dir() / "selftests" / "src" / f"{tarball_stem(tarball)}-{_key(tarball, st.st_size, st.st_mtime_ns)}"
    return extract_tarball(tarball, dest, TARBALL_PARTS, say)


# -- building ------------------------------------------------------------------------------
def _stamp(tree: Path, compiler: str) -> str:
    h = hashlib.sha256(f"{tree}\0{compiler}\n".encode())
    for rel in STAMP_INPUTS:
        top = tree / rel
        paths = [top] if not top.is_dir() else sorted(
            Path(root) / f for root, dirs, files in os.walk(top) for f in files)
        for p in paths:
            try:
                st = p.lstat()
            except FileNotFoundError:
                continue
            h.update(f"{p.relative_to(tree)}:{st.st_size}:{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


def _compiler() -> str:
    for tool, pkg in (("make", "make"), ("gcc", "gcc"), ("tar", "tar")):
        if shutil.which(tool) is None:
            raise UnavailableError(f"cannot build the KVM selftests: {tool} not found "
                                   f"(apt-get install {pkg})")
    r = subprocess.run(["gcc", "--version"], check=False, capture_output=True, text=True)
    return r.stdout.splitlines()[0] if r.stdout else "gcc"


def _make_env() -> dict:
    # The outer make's MAKEFLAGS (`make test ARGS=...`, its jobserver) and
    # MAKELEVEL (lib.mk picks OUTPUT by it) must not leak into this build;
    # LC_ALL=C keeps the error lines first_error() looks for in English.
    env = {k: v for k, v in os.environ.items() if k not in ("MAKEFLAGS", "MFLAGS", "MAKELEVEL")}
    env["LC_ALL"] = "C"
    return env


def _run_make(step: str, argv: list[str], log) -> None:
    log.write(f"$ {' '.join(argv)}\n")
    log.flush()
    start = log.tell()
    r = subprocess.run(argv, check=False, stdout=log, stderr=subprocess.STDOUT, env=_make_env(),
                       stdin=subprocess.DEVNULL)
    if r.returncode:
        with open(log.name, errors="replace") as f:
            f.seek(start)
            why = first_error(f.read())
        raise UnavailableError(f"building the KVM selftests failed in {step}: {why} (log: {log.name})")


def build(tree: Path | str | None = None, *, force: bool = False, jobs: int | None = None,
          say: Callable[[str], None] | None = None) -> SelftestBuild:
    """Build (or find in the cache) the KVM selftests of `tree`: a kernel
    source directory or tarball; by default Debian's linux-source package."""
    t0 = time.monotonic()
    compiler = _compiler()
    source = Path(tree) if tree is not None else default_source()
    root = source_tree(source, say)
    version = check_tree(root)
    out = cache_dir() / "selftests" / "build" / f"{version}-{_key(root, version)}"
    result = SelftestBuild(root, str(source), version, out, cached=True, seconds=0.0)
    with locked(out.with_name(out.name + ".lock")):
        stamp_file = out / "stamp.json"
        stamp = _stamp(root, compiler)
        try:
            done = json.loads(stamp_file.read_text()).get("stamp") == stamp
        except (OSError, ValueError):
            done = False
        if force or not done or not result.binary(SENTINEL).exists():
            result.cached = False
            if say:
                say(f"building the KVM selftests of {root} ({version}) in {out}")
            _make(root, out, jobs or os.cpu_count() or 1)
            stamp_file.write_text(json.dumps({"stamp": stamp, "tree": str(root), "version": version,
                                              "compiler": compiler, "built": time.time()}))
    result.seconds = time.monotonic() - t0
    return result


def _make(root: Path, out: Path, jobs: int) -> None:
    out.mkdir(parents=True, exist_ok=True)
    # A tree configured in-tree (.config) refuses O=; its developer builds
    # there anyway, so its headers go where `make headers` puts them.
    in_tree = any((root / p).exists() for p in (".config", "include/config", "arch/x86/include/generated"))
    hdr = (root if in_tree else out) / "usr" / "include"
    with open(out / "build.log", "w") as log:
        _run_make("make headers", ["make", "-C", str(root), f"-j{jobs}",
                                   *([] if in_tree else [f"O={out}"]), "headers"], log)
        _run_make(f"make -C {SELFTESTS}",
                  ["make", "-C", str(root / SELFTESTS), f"-j{jobs}", f"OUTPUT={out / 'kvm'}",
                   f"KHDR_INCLUDES=-isystem {hdr}"], log)
