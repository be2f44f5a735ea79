"""Where a series comes from, made into one patch file per patch:

- an mbox file (a cover letter, if any, gives the name, message-id and
  base-commit; each patch mail becomes a file `git am` takes);
- a lore message-id, fetched with `b4 am` where the network allows;
- a git range in a tree (`git format-patch A..B`; A is the base).

The patchset hash is KCIDB's: the sha256 of the newline-terminated sha256
hex digests of the patches, in order of application.
"""
from __future__ import annotations

import hashlib
import mailbox
import re
import shutil
import subprocess
from dataclasses import dataclass, field
from email.message import Message
from pathlib import Path

from kvmsplit.errors import BadInputError, NoInputError, UnavailableError

BASE_COMMIT = re.compile(r"^base-commit:\s*([0-9a-f]{7,40})\s*$", re.M)
NUMBERED = re.compile(r"\[[^\]]*\b(\d+)/(\d+)\]")
VERSION = re.compile(r"\[[^\]]*\bv(\d+)\b[^\]]*\]", re.I)
PATCH_PREFIX = re.compile(r"^\s*\[[^\]]*\]\s*")
MSGID = re.compile(r"^<?[^<>@\s]+@[^<>@\s]+>?$")


@dataclass
class Series:
    patches: list[Path]
    subjects: list[str]
    name: str
    message_id: str | None = None
    base_commit: str | None = None
    version: int | None = None
    source: str = ""
    extra: dict = field(default_factory=dict)

    @property
    def patchset_hash(self) -> str:
        h = hashlib.sha256()
        for p in self.patches:
            h.update((hashlib.sha256(p.read_bytes()).hexdigest() + "\n").encode())
        return h.hexdigest()

    def to_dict(self) -> dict:
        """The series as every run and report records it (RunResult.series)."""
        d = {"name": self.name, "version": self.version, "message_id": self.message_id,
             "base_commit": self.base_commit, "patchset_hash": self.patchset_hash,
             "patches": self.subjects}
        return {k: v for k, v in d.items() if v is not None}

    def label(self, k: int) -> str:
        return f"patch {k}/{len(self.patches)} \"{self.subjects[k - 1]}\""


def _subject(msg: Message) -> str:
    return " ".join(str(msg.get("Subject", "")).split())


def _body(msg: Message) -> str:
    if msg.is_multipart():
        return "\n".join(_body(p) for p in msg.get_payload() if isinstance(p, Message))
    payload = msg.get_payload(decode=True)
    return payload.decode("utf-8", "replace") if isinstance(payload, bytes) else str(msg.get_payload())


def _is_patch(msg: Message) -> bool:
    body = _body(msg)
    return bool(re.search(r"^(diff --git |--- a/|\+\+\+ b/)", body, re.M))


def from_mbox(path: Path, workdir: Path, source: str | None = None) -> Series:
    """One file per patch mail (in order) in workdir; the cover letter's facts."""
    if not path.is_file():
        raise NoInputError(f"{path}: no such mbox")
    with open(path, "rb") as head_of:
        if head_of.read(5) != b"From ":
            raise BadInputError(f"{path}: not an mbox (it must start with a 'From ' line)")
    box = mailbox.mbox(str(path), create=False)
    try:
        # each mail's own bytes, From_ line included: a patch file's bytes are
        # its build's cache key, so they must not change from run to run
        keyed = [(box[k], box.get_bytes(k, from_=True)) for k in box.keys()]
    finally:
        box.close()
    mails = [m for m, _ in keyed]
    raw = {id(m): b for m, b in keyed}
    patches = [m for m in mails if _is_patch(m)]
    if not patches:
        raise BadInputError(f"{path}: no patches in it (no mail with a diff)")
    cover = next((m for m in mails if not _is_patch(m) and NUMBERED.search(_subject(m))), None)
    head = cover or patches[0]
    shutil.rmtree(workdir, ignore_errors=True)
    workdir.mkdir(parents=True)
    files, subjects = [], []
    for i, m in enumerate(patches, 1):
        f = workdir / f"{i:04d}.patch"
        f.write_bytes(raw[id(m)])
        files.append(f)
        subjects.append(PATCH_PREFIX.sub("", _subject(m)))
    base = next((b.group(1) for m in [head, *patches] for b in [BASE_COMMIT.search(_body(m))] if b), None)
    v = VERSION.search(_subject(head))
    version = int(v.group(1)) if v else None
    msgid = str(head.get("Message-Id") or head.get("Message-ID") or "").strip() or None
    name = PATCH_PREFIX.sub("", _subject(head)) if cover else subjects[0]
    return Series(files, subjects, name, msgid, base, version, source or str(path))


def from_message_id(msgid: str, workdir: Path) -> Series:
    """`b4 am` of a lore thread; without network this says so, in one line."""
    b4 = shutil.which("b4")
    if not b4:
        raise UnavailableError(f"{msgid}: fetching a series by message-id needs b4 (apt-get install b4); "
                               "or give the series as an mbox file")
    workdir.mkdir(parents=True, exist_ok=True)
    r = subprocess.run([b4, "am", "-n", "series", "-o", str(workdir),
                        msgid.strip("<>")], capture_output=True, text=True, timeout=300)
    mbx = sorted(workdir.glob("series*.mbx"))
    if r.returncode or not mbx:
        text = (r.stderr + r.stdout).strip()
        netless = re.search(r"(resolve|connect|network|unreachable|Name or service|timed out|HTTPS?Connection)",
                            text, re.I)
        why = "no network to lore.kernel.org from here" if netless else (text.splitlines() or ["b4 failed"])[-1]
        raise UnavailableError(f"{msgid}: b4 could not fetch the series: {why}; "
                               "save it as an mbox (b4 am elsewhere, or your mail client) and give that")
    s = from_mbox(mbx[0], workdir / "patches", source=msgid)
    s.message_id = s.message_id or f"<{msgid.strip('<>')}>"
    return s


def from_git_range(tree: Path, rng: str, workdir: Path) -> Series:
    """`git format-patch A..B` in tree; A is the base commit."""
    base_ref = rng.split("..", 1)[0]
    r = subprocess.run(["git", "-C", str(tree), "rev-parse", "--verify", "-q", f"{base_ref}^{{commit}}"],
                       capture_output=True, text=True)
    if r.returncode:
        raise BadInputError(f"{rng}: '{base_ref}' is not a commit in {tree}")
    base = r.stdout.strip()
    mbx = workdir / "range.mbx"
    workdir.mkdir(parents=True, exist_ok=True)
    with open(mbx, "wb") as f:
        fp = subprocess.run(["git", "-C", str(tree), "format-patch", "--stdout", "--no-signature", rng],
                            stdout=f, stderr=subprocess.PIPE, text=False)
    if fp.returncode or mbx.stat().st_size == 0:
        raise BadInputError(f"{rng}: no patches in that range of {tree}"
                            + (f": {fp.stderr.decode(errors='replace').strip()}" if fp.returncode else ""))
    s = from_mbox(mbx, workdir / "patches", source=f"{tree}:{rng}")
    s.base_commit = base
    return s


def load(source: str, tree: Path | None, workdir: Path) -> Series:
    """SOURCE as the command line gives it: an mbox file, a git range (with
    --tree), or a message-id."""
    p = Path(source)
    if p.exists():
        return from_mbox(p, workdir / "patches")
    if ".." in source and not source.startswith("<"):
        if tree is None:
            raise BadInputError(f"{source}: a git range needs --tree (the repository it is in)")
        return from_git_range(tree, source, workdir)
    if MSGID.match(source):
        return from_message_id(source, workdir)
    raise NoInputError(f"{source}: no such mbox file, and not a git range (A..B) or a message-id")
