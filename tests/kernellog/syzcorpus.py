"""syzkaller's Linux report corpus (tests/kernellog/syzkaller-corpus.tar.xz), read and measured.

The archive is an unmodified copy of syzkaller's pkg/report/testdata/linux/report/
at the commit named in its COMMIT and NOTICE files (Apache-2.0; LICENSE inside,
and LICENSES/other/Apache-2.0). Each file is header lines, a blank line, then
the console log; an optional `REPORT:` line after a blank line starts the
report syzkaller extracts (not input). The headers, as pkg/report/report_test.go
reads them:

  TITLE      the title of the first report (no TITLE: the log holds no report)
  ALT        alternative titles syzbot also files it under (not compared here)
  TYPE       syzkaller's crash type (crash/types.go)
  FRAME      the frame the title names, where it is not the title's last word
  CORRUPTED  Y: syzkaller flags the report corrupted (truncated, interleaved,
             no usable stack); its title is then syzkaller's best guess
  SUPPRESSED Y: a report syzkaller ignores (e.g. the fuzzer's own failure)
  PANICKED, EXECUTOR, START, END: not used here
"""
from __future__ import annotations

import lzma
import re
import tarfile
from dataclasses import dataclass, field
from pathlib import Path

ARCHIVE = Path(__file__).parent / "syzkaller-corpus.tar.xz"
_TOP = "syzkaller-linux-report/"

# Report types and layouts that only non-x86 kernels print: arm64's `Internal
# error` and `pc : ` registers, 32-bit ARM's `PC is at` and `(fn) from [<...>]`
# backtraces, powerpc's `NIP [...]`, s390's `Krnl PSW`, riscv's `epc :`.
NON_X86 = re.compile(r"Internal error: |^\S*\s*pc : |PC is at |\) from \[<[0-9a-f]+>\]|\bNIP \[|"
                     r"Krnl PSW|\bepc : |\bLR is at |\bESR 0x|el0t_64_sync|el1h_64_sync",
                     re.MULTILINE)


@dataclass
class CorpusFile:
    name: str
    log: str
    title: str | None = None
    alt: list[str] = field(default_factory=list)
    type: str | None = None
    corrupted: bool = False
    suppressed: bool = False

    @property
    def non_x86(self) -> bool:
        return bool(NON_X86.search(self.log))


def _parse(name: str, data: bytes) -> CorpusFile:
    text = data.replace(b"\r", b"").decode("utf-8", "surrogateescape")
    head, _, rest = text.partition("\n\n")
    cf = CorpusFile(name=name, log="")
    for ln in head.splitlines():
        key, _, value = ln.partition(": ")
        if key == "TITLE":
            cf.title = value
        elif key == "ALT":
            cf.alt.append(value)
        elif key == "TYPE":
            cf.type = value
        elif key == "CORRUPTED":
            cf.corrupted = value == "Y"
        elif key == "SUPPRESSED":
            cf.suppressed = value == "Y"
    log_lines: list[str] = []
    prev_empty = False
    for ln in rest.split("\n"):
        if prev_empty and ln == "REPORT:":
            break
        log_lines.append(ln)
        prev_empty = ln == ""
    cf.log = "\n".join(log_lines)
    return cf


def load_corpus(archive: Path = ARCHIVE) -> tuple[str, list[CorpusFile]]:
    """The corpus commit and its files, sorted by name."""
    files: list[CorpusFile] = []
    commit = ""
    with lzma.open(archive) as xz, tarfile.open(fileobj=xz, mode="r|") as tar:
        for member in tar:
            f = tar.extractfile(member) if member.isfile() else None
            if f is None:
                continue
            if member.name == _TOP + "COMMIT":
                commit = f.read().decode().strip()
            elif member.name.startswith(_TOP + "report/"):
                files.append(_parse(member.name[len(_TOP + "report/"):], f.read()))
    return commit, sorted(files, key=lambda cf: cf.name)
