"""`kvmsplit kernel build`: a small bootable KVM host kernel, optionally with
patches, cached by what went into it.

The tree is a git repository: a kernel tree the user gives, or Debian's
linux-source tarball, extracted once into the cache and committed as
`kvmsplit-base` (that one is kvmsplit's own). Patches (mbox files with
`git am`, plain diffs with `git apply`) are never applied in a user's tree:
they go into a worktree of it that kvmsplit keeps in its cache (one per
tree, so a variant rebuilds only what its patches touch), reset to the
commit before each build. The user's checkout is never reset or cleaned, and
its untracked files are never touched. kvmsplit's own tree is always built
from its base tag, so a build killed with its patches applied cannot leak
them into a later build. An unpatched build of a user tree builds the tree
as it is, and its cache key includes its uncommitted edits. The bzImage is
copied into the cache under a key of (commit, uncommitted edits, patches,
config). A build of another commit than the tree's HEAD (a rerun rebuilding
what an earlier run booted) goes into the same worktree, at that commit.
Builds are reproducible (KBUILD_BUILD_TIMESTAMP from the commit, fixed
user, host and version), so a rebuild of the same commit, patches and config
gives the same build id and, on the same toolchain, the same bzImage.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from kvmsplit.errors import BadInputError, NoInputError, UnavailableError
from kvmsplit.kernel.source import DEBIAN_SOURCES, extract_tarball, find_debian_source, first_error, tarball_stem
from kvmsplit.kernel.vm import elf_build_id
from kvmsplit.paths import cache_dir

# virtme-ng's minimal config lacks these: KVM for both vendors (built in, so
# the image needs no modules) and THP, without which madvise(MADV_HUGEPAGE)
# fails and no THP scenario can run.
CONFIG_ITEMS = ("CONFIG_VIRTUALIZATION=y", "CONFIG_KVM=y", "CONFIG_KVM_AMD=y", "CONFIG_KVM_INTEL=y",
                "CONFIG_TRANSPARENT_HUGEPAGE=y", "CONFIG_TRANSPARENT_HUGEPAGE_MADVISE=y",
                "CONFIG_HUGETLBFS=y")
BASE_TAG = "kvmsplit-base"


@dataclass
class KernelImage:
    image: Path
    key: str
    release: str | None
    commit: str
    patches: list[str]
    cached: bool
    build_id: str | None = None

    def to_dict(self) -> dict:
        return {"image": str(self.image), "key": self.key, "release": self.release,
                "commit": self.commit, "patches": self.patches, "cached": self.cached,
                "build_id": self.build_id}


def _git(tree: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    r = subprocess.run(["git", "-C", str(tree), *args], check=False, capture_output=True, text=True)
    if check and r.returncode:
        raise UnavailableError(f"git {args[0]} in {tree} failed: {first_error(r.stderr or r.stdout)}")
    return r


def _is_base(tree: Path) -> bool:
    """A tree extracted before: a git repository with the base tag."""
    return (tree / ".git").is_dir() and \
        _git(tree, "rev-parse", "-q", "--verify", BASE_TAG, check=False).returncode == 0


def default_tree(root: Path | None = None, say: Callable[[str], None] | None = None) -> Path:
    """Debian's newest linux-source tarball (in `root`, /usr/src by default),
    extracted once into the cache as a git repo."""
    tar = find_debian_source(root or DEBIAN_SOURCES, trees=False)
    tree = cache_dir() / "kernel" / "src" / tarball_stem(tar)
    if _is_base(tree):
        return tree

    def commit_as_shipped(new: Path) -> None:
        _git(new, "init", "-q")
        _git(new, "add", "-A", "-f")    # Debian's .gitignore ignores the whole top level
        _git(new, "-c", "user.name=kvmsplit", "-c", "user.email=kvmsplit@localhost",
             "commit", "-qm", f"{tar.name} as shipped")
        _git(new, "tag", BASE_TAG)

    extract_tarball(tar, tree, say=say, strip_top=True, prepare=commit_as_shipped)
    if not _is_base(tree):
        raise UnavailableError(f"{tree}: not a git repository tagged {BASE_TAG}; delete it to extract {tar} again")
    return tree


def _check_tree(tree: Path) -> None:
    if not tree.is_dir():
        raise NoInputError(f"{tree}: no such directory")
    if not (tree / "Makefile").is_file() or not (tree / "arch/x86/kvm").is_dir():
        raise BadInputError(f"{tree}: not a kernel source tree (no Makefile and arch/x86/kvm)")
    if not (tree / ".git").exists():
        raise BadInputError(f"{tree}: not a git repository (kvmsplit applies and reverts patches with git)")


def _is_mbox(path: Path) -> bool:
    with open(path, "rb") as f:
        return f.read(5) == b"From "


def _key(commit: str, patches: list[Path], edits: str = "") -> str:
    h = hashlib.sha256(commit.encode())
    for p in patches:
        h.update(b"\0" + p.read_bytes())
    h.update("\0".join(CONFIG_ITEMS).encode())
    if edits:
        h.update(b"\0edits\0" + edits.encode())
    return h.hexdigest()[:16]


def _owned(tree: Path) -> bool:
    """kvmsplit's own extracted tree: it may reset and clean it at will."""
    try:
        Path(tree).resolve().relative_to((cache_dir() / "kernel" / "src").resolve())
    except ValueError:
        return False
    return _is_base(tree)


def _edits(tree: Path) -> str:
    """A digest of what the tree holds beyond its HEAD (tracked edits and
    untracked files, not build outputs), for the cache key: '' when clean."""
    diff = subprocess.run(["git", "-C", str(tree), "diff", "HEAD", "--binary"], check=False,
                          capture_output=True).stdout
    others = _git(tree, "ls-files", "--others", "--exclude-standard", "-z").stdout.split("\0")
    if not diff and not any(others):
        return ""
    h = hashlib.sha256(diff)
    for name in sorted(o for o in others if o):
        f = tree / name
        h.update(name.encode() + b"\0" + (f.read_bytes() if f.is_file() else b""))
    return h.hexdigest()


def worktree(tree: Path, commit: str) -> Path:
    """kvmsplit's worktree of a user's tree, at `commit`, clean but for build outputs."""
    wt = cache_dir() / "kernel" / "work" / hashlib.sha256(str(tree.resolve()).encode()).hexdigest()[:12]
    if not (wt / ".git").exists():
        _git(tree, "worktree", "prune")
        wt.parent.mkdir(parents=True, exist_ok=True)
        _git(tree, "worktree", "add", "-q", "--detach", str(wt), commit)
    restore(wt, commit)
    return wt


def apply_patches(tree: Path, patches: list[Path]) -> None:
    """git am for mails, git apply for diffs; the first that fails is one line."""
    for p in patches:
        if _is_mbox(p):
            r = _git(tree, "-c", "user.name=kvmsplit", "-c", "user.email=kvmsplit@localhost",
                     "am", "-q", "--3way", str(p.resolve()), check=False)
            if r.returncode:
                _git(tree, "am", "--abort", check=False)
        else:
            r = _git(tree, "apply", "--index", str(p.resolve()), check=False)
        if r.returncode:
            raise BadInputError(f"{p}: does not apply to {tree}: {first_error(r.stderr + r.stdout)}")


def restore(tree: Path, commit: str) -> None:
    """Back to the commit the build started from; build outputs are ignored
    files and stay, so the next build only redoes what the patches touched."""
    _git(tree, "am", "--abort", check=False)
    _git(tree, "reset", "-q", "--hard", commit)
    _git(tree, "clean", "-qfd")


def _commit(src: Path, owned: bool, wanted: str | None) -> str:
    """The commit to build: the tree's (its base tag for kvmsplit's own, else
    HEAD), or `wanted`, which must be in the tree (and, in kvmsplit's own
    tree, be its base: that tree has no other)."""
    own = _git(src, "rev-parse", f"{BASE_TAG}^{{commit}}" if owned else "HEAD").stdout.strip()
    if not wanted or own.startswith(wanted):
        return own
    r = _git(src, "rev-parse", "-q", "--verify", f"{wanted}^{{commit}}", check=False)
    if r.returncode or owned:
        raise UnavailableError(f"commit {wanted[:12]} is not in {src}" + (f" (it holds {own[:12]} only)"
                                                                         if owned else ""))
    return r.stdout.strip()


def build(tree: str | Path | None = None, patches: Sequence[str] = (), *, force: bool = False,
          say: Callable[[str], None] | None = None, commit: str | None = None) -> KernelImage:
    """The image of `tree` (at `commit`, default its HEAD) with `patches`, from the cache or built."""
    say = say or (lambda m: print(f"kvmsplit: {m}", file=sys.stderr))
    src = Path(tree) if tree else default_tree(say=say)
    _check_tree(src)
    pfiles = [Path(p) for p in patches]
    for p in pfiles:
        if not p.is_file():
            raise NoInputError(f"{p}: no such patch file")
    owned = _owned(src)
    head = _git(src, "rev-parse", "HEAD").stdout.strip()
    commit = _commit(src, owned, commit)
    elsewhere = not owned and commit != head       # not the checkout as it is: a worktree at the commit
    edits = "" if owned or pfiles or elsewhere else _edits(src)
    key = _key(commit, pfiles, edits)
    out = cache_dir() / "kernel" / "images" / key
    if (out / "bzImage").is_file() and not force:
        info = json.loads((out / "info.json").read_text())
        return KernelImage(out / "bzImage", key, info.get("release"), commit, [str(p) for p in pfiles], True,
                           info.get("build_id"))
    vng = _tools()
    if owned:
        restore(src, commit)        # ours: whatever a killed build left applied goes
        where = src
    elif pfiles or elsewhere:
        where = worktree(src, commit)
        if _edits(src):
            say(f"{src} has uncommitted changes; the patches go onto its HEAD {commit[:12]} without them")
    else:
        where = src                 # the user's tree as it is, edits and all (they are in the key)
    try:
        apply_patches(where, pfiles)
        say(f"building {src} at {commit[:12]}" + (f" + {len(pfiles)} patch(es) in {where}" if pfiles else "")
            + " (minutes; an unchanged tree is not rebuilt)")
        release, build_id = _make(where, vng, _timestamp(where, commit))
        _store(out, where, {"tree": str(src), "built_in": str(where), "commit": commit, "edits": edits or None,
                            "patches": [str(p) for p in pfiles],
                            "patch_sha256": [hashlib.sha256(p.read_bytes()).hexdigest() for p in pfiles],
                            "config": list(CONFIG_ITEMS), "release": release, "build_id": build_id})
    finally:
        if pfiles:
            restore(where, commit)
    return KernelImage(out / "bzImage", key, release, commit, [str(p) for p in pfiles], False, build_id)


def _tools() -> str:
    vng = shutil.which("vng") or shutil.which("vng", path=str(Path(sys.executable).parent))
    if not vng:
        raise UnavailableError("vng not found: pip install virtme-ng")
    missing = [t for t in ("flex", "bison", "bc", "gcc", "make") if not shutil.which(t)]
    if missing:
        raise UnavailableError(f"cannot build a kernel: {', '.join(missing)} not installed "
                               "(apt-get install flex bison bc libelf-dev libssl-dev)")
    return vng


def _timestamp(tree: Path, commit: str) -> str:
    """The commit's date, as the build's timestamp: a rebuild says the same."""
    return _git(tree, "log", "-1", "--format=%cd", "--date=rfc", commit).stdout.strip()


def _make(where: Path, vng: str, timestamp: str) -> tuple[str | None, str | None]:
    args = [vng, "--build", "--force"] + [a for item in CONFIG_ITEMS for a in ("--configitem", item)]
    env = {**os.environ, "PATH": os.pathsep.join([str(Path(vng).parent), os.environ.get("PATH", "")]),
           "KBUILD_BUILD_TIMESTAMP": timestamp, "KBUILD_BUILD_USER": "kvmsplit",
           "KBUILD_BUILD_HOST": "kvmsplit", "KBUILD_BUILD_VERSION": "1"}
    r = subprocess.run(args, check=False, cwd=where, capture_output=True, text=True, env=env)
    if r.returncode:
        raise UnavailableError(f"kernel build failed: {first_error(r.stderr + r.stdout)}")
    rel = where / "include/config/kernel.release"
    release = rel.read_text().strip() if rel.exists() else None
    build_id = elf_build_id(where / "vmlinux") if (where / "vmlinux").is_file() else None
    return release, build_id


def _store(out: Path, where: Path, info: dict) -> None:
    """The image and what went into it, in the cache; the image appears last, whole."""
    out.mkdir(parents=True, exist_ok=True)
    shutil.copy2(where / "arch/x86/boot/bzImage", out / "bzImage.tmp")
    (out / "info.json").write_text(json.dumps(info, indent=1))
    os.replace(out / "bzImage.tmp", out / "bzImage")
