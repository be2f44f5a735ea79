"""`kvmsplit kernel build` and the trees it builds from: a user's tree is
never reset or cleaned (patches go into a worktree kvmsplit keeps), its
uncommitted edits are part of the cache key, and kvmsplit's own tree is
built from its base tag even after a build was killed with patches applied.

The trees are small real git repositories laid out like a kernel tree; the
kernel build itself is a stand-in `vng` on PATH that writes a bzImage made of
the file the patches change (a real build is tests/test_planted_bugs.py's)."""
import os
import subprocess
import textwrap
from pathlib import Path

import pytest

from kvmsplit.kernel import build as kb

PATCH = """From 0000000000000000000000000000000000000000 Mon Sep 17 00:00:00 2001
From: t <t@localhost>
Date: Wed, 02 Dec 2026 00:00:00 +0000
Subject: [PATCH] mmu: planted

---
--- a/arch/x86/kvm/mmu.c
+++ b/arch/x86/kvm/mmu.c
@@ -1 +1,2 @@
 int mmu;
+int planted;
--
2.39.5
"""


def git(tree, *args):
    return subprocess.run(["git", "-C", str(tree), "-c", "user.name=t", "-c", "user.email=t@localhost", *args],
                          check=True, capture_output=True, text=True).stdout


def make_tree(path: Path) -> Path:
    (path / "arch/x86/kvm").mkdir(parents=True)
    (path / "Makefile").write_text("VERSION = 6\nPATCHLEVEL = 12\n")
    (path / "arch/x86/kvm/mmu.c").write_text("int mmu;\n")
    (path / ".gitignore").write_text("arch/x86/boot/\ninclude/config/\n")
    git(path, "init", "-q")
    git(path, "add", "-A")
    git(path, "commit", "-qm", "base")
    return path


@pytest.fixture
def env(tmp_path, monkeypatch):
    """A private cache, and a `vng --build` that 'builds' mmu.c into the image."""
    monkeypatch.setenv("KVMSPLIT_CACHE_DIR", str(tmp_path / "cache"))
    bindir = tmp_path / "bin"
    bindir.mkdir()
    vng = bindir / "vng"
    vng.write_text(textwrap.dedent("""\
        #!/bin/sh
        mkdir -p arch/x86/boot include/config
        cat arch/x86/kvm/mmu.c > arch/x86/boot/bzImage
        echo 6.12.0-test > include/config/kernel.release
        """))
    vng.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bindir}{os.pathsep}{os.environ['PATH']}")
    for tool in ("flex", "bison", "bc"):
        if not any((Path(d) / tool).exists() for d in os.environ["PATH"].split(os.pathsep)):
            (bindir / tool).symlink_to("/bin/true")
    return tmp_path


def test_a_patched_build_never_touches_the_users_tree(env):
    tree = make_tree(env / "linux")
    (tree / "my-notes.txt").write_text("untracked, mine\n")
    (tree / "arch/x86/kvm/mmu.c").write_text("int mmu; /* my edit */\n")
    status, head = git(tree, "status", "--porcelain"), git(tree, "rev-parse", "HEAD")
    patch = env / "p.mbx"
    patch.write_text(PATCH)
    k = kb.build(tree, [str(patch)], say=lambda m: None)
    assert k.image.read_text() == "int mmu;\nint planted;\n"       # HEAD + the patch, built elsewhere
    assert (tree / "my-notes.txt").read_text() == "untracked, mine\n"
    assert (tree / "arch/x86/kvm/mmu.c").read_text() == "int mmu; /* my edit */\n"
    assert git(tree, "status", "--porcelain") == status and git(tree, "rev-parse", "HEAD") == head
    assert not (tree / "arch/x86/boot").exists()                    # nothing was built in the user's tree
    again = kb.build(tree, [str(patch)], say=lambda m: None)
    assert again.cached and again.key == k.key


def test_uncommitted_edits_are_part_of_the_key(env):
    tree = make_tree(env / "linux")
    clean = kb.build(tree, say=lambda m: None)
    (tree / "arch/x86/kvm/mmu.c").write_text("int mmu; /* edited */\n")
    edited = kb.build(tree, say=lambda m: None)
    assert edited.key != clean.key and not edited.cached
    assert edited.image.read_text() == "int mmu; /* edited */\n"   # not the stale clean image
    (tree / "arch/x86/kvm/new.c").write_text("int more;\n")         # an untracked source file too
    assert kb.build(tree, say=lambda m: None).key != edited.key


def test_a_killed_patched_build_of_kvmsplits_own_tree_leaks_nothing(env):
    own = make_tree(Path(os.environ["KVMSPLIT_CACHE_DIR"]) / "kernel" / "src" / "linux-source-6.12")
    git(own, "tag", kb.BASE_TAG)
    base = kb.build(own, say=lambda m: None)
    # a patched build killed mid-way: the patch is committed (git am) and HEAD has moved
    patch = env / "p.mbx"
    patch.write_text(PATCH)
    git(own, "am", "-q", str(patch))
    assert git(own, "rev-parse", "HEAD") != git(own, "rev-parse", kb.BASE_TAG)
    again = kb.build(own, force=True, say=lambda m: None)
    assert again.key == base.key and again.image.read_text() == "int mmu;\n"
    assert git(own, "rev-parse", "HEAD") == git(own, "rev-parse", kb.BASE_TAG)
    assert git(own, "status", "--porcelain", "--untracked-files=no") == ""
