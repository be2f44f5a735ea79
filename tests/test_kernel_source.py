"""Kernel source trees and the cache (kernel/source.py), shared by `kvmsplit
kernel build` and the KVM selftests: which Debian source is the newest, the
line that explains a failed build, and extracting a tarball once, also with
two kvmsplits at it at the same time."""
from __future__ import annotations

import multiprocessing
import subprocess
import time
from pathlib import Path

import pytest

from kvmsplit.errors import BadInputError, NoInputError
from kvmsplit.kernel import build as kb
from kvmsplit.kernel.source import extract_tarball, find_debian_source, first_error, version_key
from kvmsplit.selftests import build as sb


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch):
    """Never the user's cache."""
    monkeypatch.setenv("KVMSPLIT_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache"


def make_tarball(where: Path, top: str = "linux-source-6.12", name: str | None = None,
                 extra_top: str | None = None) -> Path:
    """A small kernel-like source tarball with `top` as its one directory."""
    src = where / f"src-{name or top}"
    files = {"Makefile": "VERSION = 6\nPATCHLEVEL = 12\n", "include/linux/kvm.h": "/* kvm */\n",
             "tools/testing/selftests/kvm/Makefile": "all:\n", "Documentation/index.rst": "docs\n",
             "scripts/Makefile.build": "\n", "arch/x86/kvm/x86.c": "\n", "arch/arm64/kvm/arm.c": "\n",
             "usr/Makefile": "\n"}
    for rel, text in files.items():
        (src / top / rel).parent.mkdir(parents=True, exist_ok=True)
        (src / top / rel).write_text(text)
    tops = [top]
    if extra_top:
        (src / extra_top).mkdir()
        tops.append(extra_top)
    tarball = where / (name or f"{top}.tar.xz")
    subprocess.run(["tar", "-cJf", str(tarball), "-C", str(src), *tops], check=True)
    return tarball


# -- which source ----------------------------------------------------------------------------
def test_versions_are_numbers_not_text(tmp_path):
    assert version_key(Path("linux-source-6.12.1.tar.xz")) == (6, 12, 1)
    for name in ("linux-source-6.9.tar.xz", "linux-source-6.12.tar.xz"):
        (tmp_path / name).touch()
    assert find_debian_source(tmp_path) == tmp_path / "linux-source-6.12.tar.xz"
    (tmp_path / "linux-source-6.12.1.tar.xz").touch()
    assert find_debian_source(tmp_path) == tmp_path / "linux-source-6.12.1.tar.xz"
    # an extracted 6.9 sorts after 6.12.1 as text, not as a version
    (tmp_path / "linux-source-6.9").mkdir()
    (tmp_path / "linux-source-6.9" / "Makefile").touch()
    assert find_debian_source(tmp_path) == tmp_path / "linux-source-6.12.1.tar.xz"


def test_at_one_version_an_extracted_tree_beats_its_tarball(tmp_path):
    for name in ("linux-source-6.9.tar.xz", "linux-source-6.12.tar.xz", "linux-source-6.12.1.tar.xz"):
        (tmp_path / name).touch()
    tree = tmp_path / "linux-source-6.12.1"
    tree.mkdir()
    assert find_debian_source(tmp_path) == tmp_path / "linux-source-6.12.1.tar.xz", "no Makefile: no tree"
    (tree / "Makefile").touch()
    assert find_debian_source(tmp_path) == tree
    assert find_debian_source(tmp_path, trees=False) == tmp_path / "linux-source-6.12.1.tar.xz"
    (tmp_path / "linux-source-6.12.1.tar.xz").unlink()
    assert find_debian_source(tmp_path) == tree, "a tree with no tarball"
    assert find_debian_source(tmp_path, trees=False) == tmp_path / "linux-source-6.12.tar.xz"


def test_no_source_is_one_line(tmp_path):
    (tmp_path / "linux-source-6.12").mkdir()          # no Makefile
    (tmp_path / "linux-source-6.12.txt").touch()      # no tarball
    for trees in (True, False):
        with pytest.raises(NoInputError) as e:
            find_debian_source(tmp_path, trees=trees)
        assert "\n" not in str(e.value)
        assert str(e.value).startswith(f"no kernel source {'tree or ' if trees else ''}tarball in {tmp_path}: "
                                       "give --tree PATH")
        assert "apt-get install linux-source" in str(e.value)


def test_both_builders_take_the_newest(tmp_path, monkeypatch, cache):
    for version in ("6.9", "6.12"):
        make_tarball(tmp_path, top=f"linux-source-{version}")
    monkeypatch.setattr(sb, "DEBIAN_SOURCES", tmp_path)
    assert sb.default_source() == tmp_path / "linux-source-6.12.tar.xz"
    assert kb.default_tree(tmp_path) == cache / "kernel" / "src" / "linux-source-6.12"


# -- first_error -----------------------------------------------------------------------------
@pytest.mark.parametrize("log, line", [
    (("make[1]: Entering directory\nx.c: In function 'main':\nx.c:2:16: error: 'y' undeclared\n"
      "x.c:3:1: error: 'z' undeclared\nmake: *** [all] Error 1\n"), "x.c:2:16: error: 'y' undeclared"),
    ("warning: an error-prone thing\nlib.h:9: fatal error: foo.h: No such file or directory\n",
     "lib.h:9: fatal error: foo.h: No such file or directory"),
    ("make: Entering directory '/x'\n/bin/sh: 1: gcc: not found\nmake: *** [Makefile:2: all] Error 127\n",
     "/bin/sh: 1: gcc: not found"),
    ("  \nmake: *** No rule to make target 'headers'.  Stop.\n", "make: *** No rule to make target 'headers'.  Stop."),
    ("Applying: a patch\nerror: patch failed: arch/x86/kvm/mmu.c:12\nerror: mmu.c: patch does not apply\n",
     "error: patch failed: arch/x86/kvm/mmu.c:12"),
    ("checking things\n  the last word  \n", "the last word"),
    ("", "no output"),
])
def test_first_error(log, line):
    assert first_error(log) == line


def test_both_builders_share_first_error():
    assert sb.first_error is first_error
    assert kb.first_error is first_error


# -- extraction ------------------------------------------------------------------------------
def test_extract_all_then_reuse(tmp_path):
    tarball = make_tarball(tmp_path)
    said: list[str] = []
    dest = tmp_path / "out" / "x"
    tree = extract_tarball(tarball, dest, say=said.append)
    assert tree == dest / "linux-source-6.12"
    assert (tree / "Documentation/index.rst").read_text() == "docs\n"
    assert (dest / ".complete").is_file()
    assert said == [f"extracting {tarball} into {dest} (once)"]
    assert extract_tarball(tarball, dest, say=said.append) == tree
    assert len(said) == 1, "extracted once"
    assert sorted(p.name for p in dest.parent.iterdir()) == ["x", "x.lock"], "no temporary directory left"


def test_extract_parts(tmp_path):
    tree = extract_tarball(make_tarball(tmp_path), tmp_path / "out", parts=("Makefile", "include"))
    assert sorted(p.name for p in tree.iterdir()) == ["Makefile", "include"]
    assert (tree / "include/linux/kvm.h").is_file()


def test_extract_as_the_tree_itself(tmp_path):
    dest = tmp_path / "src" / "linux-source-6.12"
    tree = extract_tarball(make_tarball(tmp_path), dest, strip_top=True, prepare=lambda t: (t / "prepared").touch())
    assert tree == dest
    assert (tree / "Makefile").is_file() and (tree / ".complete").is_file() and (tree / "prepared").is_file()


def test_a_half_extraction_is_redone(tmp_path):
    tarball = make_tarball(tmp_path)
    dest = tmp_path / "out"
    (dest / "linux-source-6.12").mkdir(parents=True)
    (dest / "linux-source-6.12" / "half").touch()
    tree = extract_tarball(tarball, dest)
    assert not (tree / "half").exists() and (tree / "Makefile").is_file()


def test_a_broken_tarball_leaves_nothing(tmp_path):
    bad = tmp_path / "linux-source-6.12.tar.xz"
    bad.write_bytes(b"not xz at all")
    with pytest.raises(BadInputError, match=r"linux-source-6.12.tar.xz: cannot extract: .+"):
        extract_tarball(bad, tmp_path / "out" / "x")
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["x.lock"]


def test_a_tarball_with_two_top_directories(tmp_path):
    tarball = make_tarball(tmp_path, extra_top="other")
    with pytest.raises(BadInputError, match="expected one top directory"):
        extract_tarball(tarball, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def _extract_in_a_process(tarball: Path, dest: Path, start, log: Path) -> None:
    def say(msg: str) -> None:
        with open(log, "a") as f:
            f.write(msg + "\n")

    def slow(tree: Path) -> None:        # hold the lock long enough that the other one must wait
        time.sleep(1)

    start.wait()
    tree = extract_tarball(tarball, dest, parts=("Makefile", "tools"), say=say, prepare=slow)
    with open(log, "a") as f:
        f.write(f"tree {tree} {sorted(p.name for p in tree.iterdir())}\n")


def test_two_extractions_at_once_give_one_tree(tmp_path):
    tarball = make_tarball(tmp_path)
    dest = tmp_path / "cache" / "selftests" / "src" / "linux-source-6.12-key"
    log = tmp_path / "log"
    ctx = multiprocessing.get_context("fork")
    start = ctx.Barrier(2)
    procs = [ctx.Process(target=_extract_in_a_process, args=(tarball, dest, start, log)) for _ in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    assert [p.exitcode for p in procs] == [0, 0]
    lines = log.read_text().splitlines()
    assert [ln for ln in lines if ln.startswith("extracting")] == [f"extracting {tarball} into {dest} (once)"]
    tree = dest / "linux-source-6.12"
    assert [ln for ln in lines if ln.startswith("tree")] == [f"tree {tree} ['Makefile', 'tools']"] * 2
    assert (dest / ".complete").is_file()
    assert sorted(p.name for p in dest.parent.iterdir()) == [dest.name, dest.name + ".lock"]


# -- the builders' caches --------------------------------------------------------------------
def test_kernel_tree_is_a_tagged_git_repo_in_the_old_place(tmp_path, cache):
    make_tarball(tmp_path)
    said: list[str] = []
    tree = kb.default_tree(tmp_path, say=said.append)
    assert tree == cache / "kernel" / "src" / "linux-source-6.12"
    assert len(said) == 1 and said[0].startswith("extracting")
    tagged = subprocess.run(["git", "-C", str(tree), "ls-tree", "-r", "--name-only", kb.BASE_TAG],
                            capture_output=True, text=True, check=True).stdout.split()
    assert "Documentation/index.rst" in tagged and ".complete" not in tagged
    assert kb.default_tree(tmp_path, say=said.append) == tree and len(said) == 1


def test_an_existing_kernel_tree_is_reused_unchanged(tmp_path, cache):
    """A tree from before the shared extractor (no .complete marker): a git
    repo with the base tag is used as it is."""
    make_tarball(tmp_path)
    tree = cache / "kernel" / "src" / "linux-source-6.12"
    tree.mkdir(parents=True)
    (tree / "built.o").write_text("hours of work")
    for args in (["init", "-q"], ["-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q", "--allow-empty",
                                  "-m", "old"], ["tag", kb.BASE_TAG]):
        subprocess.run(["git", "-C", str(tree), *args], check=True, capture_output=True)
    said: list[str] = []
    assert kb.default_tree(tmp_path, say=said.append) == tree
    assert said == [] and (tree / "built.o").read_text() == "hours of work" and not (tree / ".complete").exists()


def test_selftests_source_stays_where_it_was(tmp_path, cache):
    tarball = make_tarball(tmp_path)
    st = tarball.stat()
    root = sb.source_tree(tarball)
    assert root == cache / "selftests" / "src" / \
        f"linux-source-6.12-{sb._key(tarball, st.st_size, st.st_mtime_ns)}" / "linux-source-6.12"
    assert sorted(p.name for p in root.iterdir()) == sorted(sb.TARBALL_PARTS[:3] + ("arch", "tools", "usr"))
    assert [p.name for p in (root / "arch").iterdir()] == ["x86"]
