"""`kvmsplit series`: sources (mbox with a cover letter, git range,
message-id without network), bad input, the module-parameter matrix, and
end to end on Debian's 6.12 tree with a two-patch series: a harmless patch
and a planted KVM_BUG_ON (kselftests/planted/0001). The series must be
found to introduce the failure, with the kernel's report title, the
bisection must name the second patch, the user-visible rerun line must
reproduce the failure in the same kernel, and the tree must be left as it
was."""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from kvmsplit.series.pipeline import matrix
from kvmsplit.series.source import from_git_range, from_mbox

PLANTED = Path(__file__).resolve().parents[1] / "kselftests" / "planted"
DOC = "Documentation/virt/kvm/api.rst"
CACHE = Path(os.environ["KVMSPLIT_CACHE_DIR"])
TREE = CACHE / "kernel" / "src" / "linux-source-6.12"


def kvmsplit(*args, timeout=600, cwd=None):
    return subprocess.run([sys.executable, "-m", "kvmsplit", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, cwd=cwd)


def mail(subject: str, body: str, msgid: str, extra: str = "") -> str:
    return (f"From 0000000000000000000000000000000000000000 Mon Sep 17 00:00:00 2001\n"
            f"From: Dev Eloper <dev@example.org>\nDate: Mon, 1 Dec 2026 00:00:00 +0000\n"
            f"Subject: {subject}\nMessage-Id: <{msgid}>\n{extra}\n{body}\n")


def harmless_patch(first_lines: list[str]) -> str:
    """A documentation-only change against the first lines of api.rst."""
    first, *rest = [f" {ln}\n" for ln in first_lines[:3]]
    return (f"A note for readers; changes nothing that is built.\n---\n"
            f"--- a/{DOC}\n+++ b/{DOC}\n@@ -1,3 +1,5 @@\n{first}+\n+.. kvmsplit: a harmless note\n{''.join(rest)}"
            f"-- \n2.39.5\n")


def planted_body(name: str) -> str:
    text = (PLANTED / name).read_text()
    return text.split("\n\n", 1)[1]       # the commit message and diff, after the mail headers


def series_mbox(path: Path, base: str | None, doc_lines: list[str]) -> Path:
    cover = mail("[PATCH v4 0/2] KVM: x86/mmu: a series with a bug in its second patch",
                 "Two patches; the second plants a KVM_BUG_ON.\n\n" + (f"base-commit: {base}\n" if base else ""),
                 "cover.kvmsplit-test@example.org")
    p1 = mail("[PATCH v4 1/2] Documentation: KVM: a harmless note", harmless_patch(doc_lines),
              "1.kvmsplit-test@example.org", "In-Reply-To: <cover.kvmsplit-test@example.org>\n")
    p2 = mail("[PATCH v4 2/2] KVM: x86/mmu: (planted) KVM_BUG_ON() in tdp_mmu_split_huge_page()",
              planted_body("0001-kvm-bug-on-in-eager-split.patch"), "2.kvmsplit-test@example.org",
              "In-Reply-To: <cover.kvmsplit-test@example.org>\n")
    path.write_text(cover + p1 + p2)
    return path


# -- sources -----------------------------------------------------------------------------------
def test_an_mbox_with_a_cover_letter_gives_its_patches_name_version_message_id_and_base(tmp_path):
    mbx = series_mbox(tmp_path / "s.mbx", "ac77283e4ab7ae402f749a176cfed58307f6ad35", ["a", "b", "c"])
    s = from_mbox(mbx, tmp_path / "p")
    assert s.subjects == ["Documentation: KVM: a harmless note",
                          "KVM: x86/mmu: (planted) KVM_BUG_ON() in tdp_mmu_split_huge_page()"]
    assert (s.name, s.version) == ("KVM: x86/mmu: a series with a bug in its second patch", 4)
    assert s.message_id == "<cover.kvmsplit-test@example.org>"
    assert s.base_commit == "ac77283e4ab7ae402f749a176cfed58307f6ad35"
    assert all(p.read_text().startswith("From ") for p in s.patches)
    want = hashlib.sha256(b"".join(hashlib.sha256(p.read_bytes()).hexdigest().encode() + b"\n"
                                   for p in s.patches)).hexdigest()
    assert s.patchset_hash == want


def test_a_git_range_is_its_patches_on_its_base(tmp_path):
    repo = tmp_path / "repo"
    git = ["git", "-C", str(repo), "-c", "user.name=t", "-c", "user.email=t@example.org"]
    subprocess.run(["git", "init", "-q", str(repo)], check=True)
    for i in range(3):
        (repo / "f").write_text(f"{i}\n")
        subprocess.run([*git, "add", "f"], check=True)
        subprocess.run([*git, "commit", "-qm", f"change {i}"], check=True)
    base = subprocess.run([*git, "rev-parse", "HEAD~2"], capture_output=True, text=True).stdout.strip()
    s = from_git_range(repo, "HEAD~2..HEAD", tmp_path / "w")
    assert s.subjects == ["change 1", "change 2"] and s.base_commit == base


def test_a_message_id_without_network_says_so_in_one_line(tmp_path):
    r = kvmsplit("series", "--output", tmp_path / "o", "<20261201.1-1-nobody@example.org>")
    assert r.returncode == 69, r.stderr
    line = r.stderr.strip()
    assert "\n" not in line and "Traceback" not in line
    assert ("no network to lore.kernel.org" in line) or ("needs b4" in line), line


@pytest.mark.parametrize("args, code, words", [
    (["nope.mbx"], 66, "no such mbox file"),
    (["--matrix", "eager_page_split=0,1", "X"], 66, "no such mbox"),
    (["X", "--bisect"], 64, "put options before SOURCE"),
    (["--output", "kvm.eager_page_split=0", "X"], 64, "'=' in its path cannot be shared with the VM"),
    ([], 64, "usage"),
])
def test_bad_input_is_one_line_with_its_exit_code(tmp_path, args, code, words):
    r = kvmsplit("series", *args, cwd=tmp_path)
    assert r.returncode == code, r.stderr
    assert words in r.stderr and "Traceback" not in r.stderr


def test_not_an_mbox_is_bad_input(tmp_path):
    (tmp_path / "x.mbx").write_text("hello\n")
    r = kvmsplit("series", tmp_path / "x.mbx")
    assert r.returncode == 65 and "not an mbox" in r.stderr


def test_the_matrix_is_every_combination_one_boot_each():
    assert matrix("kvm.eager_page_split=0,1 kvm.tdp_mmu=0,1") == [
        "kvm.eager_page_split=0 kvm.tdp_mmu=0", "kvm.eager_page_split=0 kvm.tdp_mmu=1",
        "kvm.eager_page_split=1 kvm.tdp_mmu=0", "kvm.eager_page_split=1 kvm.tdp_mmu=1"]
    assert matrix(None) == [None]


# -- end to end --------------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.kvm
@pytest.mark.timeout(3600)
def test_a_series_with_a_planted_bug_in_its_second_patch_is_caught_and_bisected(kernel_612, tmp_path):
    base = subprocess.run(["git", "-C", str(TREE), "rev-parse", "kvmsplit-base"], capture_output=True,
                          text=True).stdout.strip()
    doc = subprocess.run(["git", "-C", str(TREE), "show", f"kvmsplit-base:{DOC}"], capture_output=True,
                         text=True).stdout.splitlines()
    mbx = series_mbox(tmp_path / "series.mbx", base, doc)
    out = tmp_path / "out"
    r = kvmsplit("series", "--bisect", "--output", out, "--db", tmp_path / "h.db", mbx,
                 "--", "-k", "thp/2m/bitma[p]", "-k", "anon/4k/bitma[p]", timeout=3000)
    text = r.stdout
    assert r.returncode == 1, r.stdout + r.stderr[-4000:]
    assert "new failures (1):" in text and "thp/2m/bitmap" in text, text
    assert "WARNING in tdp_mmu_split_huge_page" in text, text
    assert 'first bad: patch 2/2 "KVM: x86/mmu: (planted) KVM_BUG_ON() in tdp_mmu_split_huge_page()"' in text
    assert "the series introduces new failures" in text
    data = json.loads((out / "series.json").read_text())
    combo = data["combinations"][0]
    assert combo["first_bad_patch"] == 2 and [f["name"] for f in combo["new_failures"]] == ["thp/2m/bitmap"]
    # the reports name the series as KCIDB asks
    kc = json.loads((out / "kcidb.json").read_text())
    checkout = kc["checkouts"][0]
    assert checkout["message_id"] == "cover.kvmsplit-test@example.org"
    assert checkout["patchset_hash"] == data["series"]["patchset_hash"]
    assert checkout["git_commit_hash"] == base
    assert "first bad: patch 2/2" in (out / "series.html").read_text()
    # the tree is as it was: at its base, clean
    assert subprocess.run(["git", "-C", str(TREE), "status", "--porcelain", "--untracked-files=no"],
                          capture_output=True, text=True).stdout == ""
    assert subprocess.run(["git", "-C", str(TREE), "rev-parse", "HEAD"], capture_output=True,
                          text=True).stdout.strip() == base
    # the rerun line the summary prints reproduces the failure: in the same kernel, not this host's
    line = next(ln.strip() for ln in text.splitlines() if ln.strip().startswith("kvmsplit rerun "))
    rerun = kvmsplit(*line.split()[1:], "--output", tmp_path / "rerun", "--db", tmp_path / "h.db", timeout=1800)
    assert rerun.returncode == 1, rerun.stderr[-3000:]
    again = json.loads((tmp_path / "rerun" / "results.json").read_text())
    assert again["host"]["vm"]["sha256"] == json.loads(
        (out / "default" / "patch-02" / "results.json").read_text())["host"]["vm"]["sha256"]
    assert [(s["name"], s["verdict"]) for s in again["scenarios"]] == [("thp/2m/bitmap", "FAIL")]
    assert "booting" in rerun.stderr and "again" in rerun.stderr
