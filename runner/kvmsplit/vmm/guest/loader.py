"""A multiboot (v1) loader: copy an ELF's PT_LOAD segments into guest memory
and describe the boot state the spec promises (EAX magic, EBX info pointer,
flat 32-bit protected mode). QEMU -kernel does the same for the same image."""
from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path

from elftools.elf.elffile import ELFFile

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
    with open(path, "rb") as f:
        elf = ELFFile(f)
        for seg in elf.iter_segments():
            if seg["p_type"] != "PT_LOAD":
                continue
            pa, filesz, memsz = seg["p_paddr"], seg["p_filesz"], seg["p_memsz"]
            if pa < mem_gpa or pa + memsz > mem_gpa + mem_size:
                raise BadInputError(f"{path}: segment at {pa:#x}+{memsz:#x} is outside guest memory")
            lo = pa - mem_gpa
            mem[lo:lo + filesz] = seg.data()
            mem[lo + filesz:lo + memsz] = bytes(memsz - filesz)
        entry = elf.header["e_entry"]
    # struct multiboot_info: flags, mem_lower (KiB below 1M), mem_upper (KiB above 1M)
    info = struct.pack("<III", MB_INFO_MEM, 640, (mem_size - 0x100000) // 1024)
    mem[mbinfo_gpa - mem_gpa:mbinfo_gpa - mem_gpa + len(info)] = info
    return BootInfo(entry=entry, mbinfo_gpa=mbinfo_gpa)
