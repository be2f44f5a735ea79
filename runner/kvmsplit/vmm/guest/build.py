"""Build the multiboot guest on first use, cached by a hash of its sources.

The cache key covers every file in guests/ plus the compiler's version, so an
edited source or a new toolchain rebuilds, and an unchanged tree costs one
directory listing and a hash.
"""
from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

from kvmsplit.errors import UnavailableError
from kvmsplit.paths import cache_dir, guests_dir

TOOLS = ("make", "gcc", "ld", "objcopy")


def _source_hash(src: Path) -> str:
    """The sources and the compiler that builds them. The compiler is known by its
    driver's resolved path, size and mtime: a package update changes them (running
    `gcc --version` took a fork and exec of every run's start-up)."""
    h = hashlib.sha256()
    for f in sorted(p for p in src.iterdir() if p.is_file() and p.suffix in (".S", ".c", ".h", ".ld", "")):
        h.update(f.name.encode() + b"\0" + f.read_bytes() + b"\0")
    gcc = shutil.which("gcc")
    if gcc:
        real = os.path.realpath(gcc)
        st = os.stat(real)
        h.update(f"{real}\0{st.st_size}\0{st.st_mtime_ns}".encode())
    return h.hexdigest()[:16]


def guest_image(src: Path | None = None) -> Path:
    """Path of the built guest ELF, building it if the cache lacks it."""
    src = Path(src or guests_dir())
    if not (src / "Makefile").is_file():
        raise UnavailableError(f"guest sources not found at {src} (set KVMSPLIT_GUESTS_DIR)")
    out = cache_dir() / "guests" / _source_hash(src)
    image = out / "guest.elf"
    if image.is_file():
        return image
    missing = [t for t in TOOLS if shutil.which(t) is None]
    if missing:
        raise UnavailableError(f"cannot build the guest: {', '.join(missing)} not found "
                               "(install gcc, make and binutils)")
    out.parent.mkdir(parents=True, exist_ok=True)
    # build into a private directory and rename: concurrent runs never see half a build
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=".build-"))
    try:
        r = subprocess.run(["make", "-s", "-C", str(src), f"OUT={tmp}"],
                           capture_output=True, text=True, check=False)
        if r.returncode != 0:
            last = (r.stderr or r.stdout).strip().splitlines()[-1:] or ["?"]
            first = next((ln for ln in (r.stderr + r.stdout).splitlines() if "error" in ln.lower()), last[0])
            raise UnavailableError(f"guest build failed: {first}")
        try:
            os.rename(tmp, out)
        except OSError:  # another process won the race; its build is as good as ours
            shutil.rmtree(tmp, ignore_errors=True)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return image
