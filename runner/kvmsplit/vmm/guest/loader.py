"""A multiboot (v1) loader: copy an ELF's PT_LOAD segments into guest memory
and describe the boot state the spec promises (EAX magic, EBX info pointer,
flat 32-bit protected mode). QEMU -kernel does the same for the same image."""
from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path

from kvmsplit.errors import BadInputError

MB_HEADER_MAGIC = 0x1BADB002
MB_BOOT_MAGIC = 0x2BADB002
MB_INFO_MEM = 1 << 0
MB_SEARCH = 8192


@dataclass
class BootInfo:
    entry: int
    mbinfo_gpa: int


def load_multiboot(path: Path | str, mem: bytearray | memoryview, mem_gpa: int, mem_size: int,
                   mbinfo_gpa: int = 0x9000) -> BootInfo:
    """Load `path` into `mem` (a writable buffer mapping GPA mem_gpa..+mem_size)."""
    data = Path(path).read_bytes()
    for off in range(0, min(len(data), MB_SEARCH) - 12, 4):
        magic, flags, csum = struct.unpack_from("<III", data, off)
        if magic == MB_HEADER_MAGIC and (magic + flags + csum) & 0xFFFFFFFF == 0:
            break
    else:
        raise BadInputError(f"{path}: no multiboot header in the first {MB_SEARCH} bytes")
    entry, segments = elf_load_segments(data, path)
    for pa, off, filesz, memsz in segments:
        if pa < mem_gpa or pa + memsz > mem_gpa + mem_size:
            raise BadInputError(f"{path}: segment at {pa:#x}+{memsz:#x} is outside guest memory")
        lo = pa - mem_gpa
        mem[lo:lo + filesz] = data[off:off + filesz]
        mem[lo + filesz:lo + memsz] = bytes(memsz - filesz)
    # struct multiboot_info: flags, mem_lower (KiB below 1M), mem_upper (KiB above 1M)
    info = struct.pack("<III", MB_INFO_MEM, 640, (mem_size - 0x100000) // 1024)
    mem[mbinfo_gpa - mem_gpa:mbinfo_gpa - mem_gpa + len(info)] = info
    return BootInfo(entry=entry, mbinfo_gpa=mbinfo_gpa)


PT_LOAD = 1
# e_ident's class -> the ELF header after e_ident, a program header, and where in one
# p_paddr, p_offset, p_filesz and p_memsz are
_ELF_CLASS = {1: ("<HHIIIIIHHHHHH", "<IIIIIIII", (3, 1, 4, 5)),      # ELF32
              2: ("<HHIQQQIHHHHHH", "<IIQQQQQQ", (4, 2, 5, 6))}      # ELF64


def elf_load_segments(data: bytes, path: Path | str = "guest") -> tuple[int, list[tuple[int, int, int, int]]]:
    """(entry, [(p_paddr, p_offset, p_filesz, p_memsz)] of the PT_LOAD segments) of a
    little-endian ELF: the ELF header and program headers are all a loader reads (pyelftools
    reads them the same way, at 40 ms of imports before the guest's first line; the tests
    compare the two on the guest image)."""
    if len(data) < 16 or data[:4] != b"\x7fELF" or data[4] not in _ELF_CLASS or data[5] != 1:
        raise BadInputError(f"{path}: not a little-endian ELF file")
    ehdr, phdr, (pa, off, filesz, memsz) = _ELF_CLASS[data[4]]
    try:
        h = struct.unpack_from(ehdr, data, 16)
        entry, phoff, phentsize, phnum = h[3], h[4], h[8], h[9]
        rows = [struct.unpack_from(phdr, data, phoff + i * phentsize) for i in range(phnum)]
    except struct.error:
        raise BadInputError(f"{path}: truncated ELF headers") from None
    segs = [(r[pa], r[off], r[filesz], r[memsz]) for r in rows if r[0] == PT_LOAD]
    if any(o + fs > len(data) for _, o, fs, _ in segs):
        raise BadInputError(f"{path}: a PT_LOAD segment lies beyond the end of the file")
    return entry, segs
