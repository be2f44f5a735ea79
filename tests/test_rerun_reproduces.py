"""`kvmsplit rerun` replays what the original run's command line changed:
here, a phase timeout so short that the guest "hangs" in its first phases.
A rerun that dropped it would pass; the replayed one errors the same way,
and says what it replayed. A rerun of a series run whose kernel is gone from
the cache rebuilds it from the recorded tree, commit and patches (the same
image: builds are reproducible), boots it with the same --append and gets
the same result; one whose kernel cannot be found or rebuilt says why in one
line (exit 69). (Reruns that go back to the box are proven in
tests/test_remote.py.)"""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

SUITE = Path(__file__).resolve().parent / "remote" / "scenarios.toml"
pytestmark = pytest.mark.kvm


def kvmsplit(*args, timeout=300):
    return subprocess.run([sys.executable, "-m", "kvmsplit", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout)


def verdicts(out: Path) -> list[tuple[str, str]]:
    res = json.loads((out / "results.json").read_text())
    return [(s["verdict"], s["reasons"][0] if s["reasons"] else "") for s in res["scenarios"]]


EARLY = ("boot", "populate")      # where 10 ms runs out: the guest boots in about that here


def test_a_rerun_replays_the_original_phase_timeout_and_says_so(tmp_path):
    r = kvmsplit("run", "--scenario", SUITE, "-k", "one", "--phase-timeout", "0.01", "--output", tmp_path / "a",
                 "--db", tmp_path / "h.db")
    assert r.returncode == 1
    [(verdict, why)] = verdicts(tmp_path / "a")
    assert verdict == "ERROR" and any(f"guest hung in phase {p}:" in why for p in EARLY)
    again = kvmsplit("rerun", tmp_path / "a", "--output", tmp_path / "b", "--db", tmp_path / "h.db")
    assert "replaying the original run's options: --phase-timeout 0.01" in again.stderr, again.stderr
    assert again.returncode == 1
    [(verdict_b, why_b)] = verdicts(tmp_path / "b")
    assert verdict_b == "ERROR" and any(f"guest hung in phase {p}:" in why_b for p in EARLY)
    # and a rerun told otherwise does what it is told
    fine = kvmsplit("rerun", tmp_path / "a", "--phase-timeout", "60", "--output", tmp_path / "c",
                    "--db", tmp_path / "h.db")
    assert fine.returncode == 0, fine.stderr
    assert "replaying" not in fine.stderr
    assert verdicts(tmp_path / "c")[0][0] == "PASS"


def test_a_rerun_of_a_vm_run_whose_kernel_is_gone_says_so_plainly(tmp_path):
    """No image at its path, none in the cache with its sha256, nothing to rebuild it from."""
    r = kvmsplit("run", "--scenario", SUITE, "-k", "one", "--output", tmp_path / "a", "--db", tmp_path / "h.db")
    assert r.returncode == 0, r.stderr
    res = json.loads((tmp_path / "a" / "results.json").read_text())
    res["host"]["vm"] = {"image": str(tmp_path / "gone" / "bzImage"), "sha256": "0" * 64, "append": None}
    (tmp_path / "a" / "results.json").write_text(json.dumps(res))
    again = kvmsplit("rerun", tmp_path / "a", "--output", tmp_path / "b")
    assert again.returncode == 69, again.stderr
    assert "the kernel under test (sha256 0000" in again.stderr and "is gone" in again.stderr
    assert "--here" in again.stderr and "Traceback" not in again.stderr


@pytest.fixture(scope="module")
def a_run(tmp_path_factory) -> dict:
    """One real run's results, to be dressed up as a vm run whose kernel is gone."""
    out = tmp_path_factory.mktemp("a-run")
    r = kvmsplit("run", "--scenario", SUITE, "-k", "one", "--output", out, "--db", out / "h.db")
    assert r.returncode == 0, r.stderr
    return json.loads((out / "results.json").read_text())


def git_repo(where: Path) -> Path:
    where.mkdir()
    for args in (["init", "-q"], ["-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q", "--allow-empty",
                                  "-m", "the only commit"]):
        subprocess.run(["git", "-C", str(where), *args], check=True)
    return where


@pytest.mark.parametrize("gone, why", [
    ("tree", "not rebuildable: its tree {tmp}/no-such-tree is gone"),
    ("commit", "not rebuildable: its commit 1234567890ab is not in {tmp}/tree"),
    ("patch", "not rebuildable: its patch {tmp}/gone.patch is gone"),
])
def test_a_rerun_whose_kernel_cannot_be_rebuilt_says_why_in_one_line(a_run, tmp_path, gone, why):
    res = json.loads(json.dumps(a_run))
    res["host"]["vm"] = {"image": str(tmp_path / "gone" / "bzImage"), "sha256": "0" * 64, "append": None}
    tree = git_repo(tmp_path / "tree")
    head = subprocess.run(["git", "-C", str(tree), "rev-parse", "HEAD"], capture_output=True, text=True).stdout
    res["host"]["kernel_under_test"] = {
        "tree": str(tmp_path / "no-such-tree") if gone == "tree" else str(tree),
        "commit": "1234567890ab" * 3 + "1234" if gone == "commit" else head.strip(),
        "patch_files": [str(tmp_path / "gone.patch")] if gone == "patch" else []}
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "results.json").write_text(json.dumps(res))
    again = kvmsplit("rerun", tmp_path / "a", "--output", tmp_path / "b")
    assert again.returncode == 69, again.stderr
    [line] = again.stderr.strip().splitlines()
    assert "the kernel under test (sha256 0000" in line and "is gone" in line
    assert why.format(tmp=tmp_path) in line and "--here" in line


MARK = "virt/kvm/binary_stats.c"


def marked_kernel_mbox(path: Path, tree: Path) -> Path:
    """One patch that puts a string into the image (so it is an image of its
    own), in a file that compiles in seconds."""
    lines = tree.joinpath(MARK).read_text().splitlines()
    before, after = lines[8:11], lines[11:14]
    assert before[-1] == "#include <linux/uaccess.h>", before
    diff = (f"--- a/{MARK}\n+++ b/{MARK}\n@@ -9,6 +9,8 @@\n" + "".join(f" {ln}\n" for ln in before)
            + '+\n+static const char kvmsplit_rerun_mark[] __used = "kvmsplit rerun test";\n'
            + "".join(f" {ln}\n" for ln in after))
    path.write_text("From 0000000000000000000000000000000000000000 Mon Sep 17 00:00:00 2001\n"
                    "From: Dev Eloper <dev@example.org>\nDate: Mon, 1 Dec 2026 00:00:00 +0000\n"
                    "Subject: [PATCH] KVM: a mark in the image\n\nFor kvmsplit's rerun test.\n---\n"
                    f"{diff}-- \n2.39.5\n")
    return path


@pytest.mark.slow
@pytest.mark.timeout(3600)
def test_a_rerun_rebuilds_a_kernel_gone_from_the_cache_and_reproduces_the_run(kernel_612, tmp_path):
    tree = Path(kernel_612).parents[2] / "src" / "linux-source-6.12"
    mbx = marked_kernel_mbox(tmp_path / "mark.mbx", tree)
    db = tmp_path / "h.db"
    r = kvmsplit("series", "--matrix", "kvm.eager_page_split=0", "--output", tmp_path / "s", "--db", db, mbx,
                 "--", "--scenario", SUITE, "-k", "one", timeout=3000)
    assert r.returncode == 0, r.stderr[-3000:]
    ran = tmp_path / "s" / "eager_page_split-0" / "patch-01"
    before = json.loads((ran / "results.json").read_text())
    kut, vm = before["host"]["kernel_under_test"], before["host"]["vm"]
    assert vm["state"] == "done", before["scenarios"][0].get("console_tail", [])[-10:]
    assert len(kut["patch_files"]) == 1 and vm["append"] == "kvm.eager_page_split=0"
    shutil.rmtree(Path(kut["image"]).parent)        # the image and its info: gone from the cache
    again = kvmsplit("rerun", ran, "--only", "one", "--output", tmp_path / "again", "--db", db, timeout=3000)
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"rebuilding it from {tree} at {kut['commit'][:12]} + 1 patch(es)" in again.stderr
    assert f"the rebuilt image is the one that ran: sha256 {vm['sha256'][:16]}, build id {kut['build_id']}" \
        in again.stderr, again.stderr[-3000:]
    after = json.loads((tmp_path / "again" / "results.json").read_text())
    assert after["host"]["vm"]["sha256"] == vm["sha256"]
    assert after["host"]["vm"]["append"] == "kvm.eager_page_split=0"
    assert [(s["name"], s["verdict"]) for s in after["scenarios"]] == [("one", "PASS")] == \
        [(s["name"], s["verdict"]) for s in before["scenarios"]]
    assert Path(kut["image"]).is_file()             # back in the cache, under the same key
