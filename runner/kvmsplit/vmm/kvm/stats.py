"""KVM binary statistics (KVM_GET_STATS_FD), read by name.

The header and descriptors are parsed once; afterwards a snapshot is one
pread() of the data block, which is what makes per-phase snapshots cheap.
"""
from __future__ import annotations

import ctypes as C
import os
from dataclasses import dataclass

from kvmsplit.vmm.kvm import uapi


@dataclass(frozen=True)
class StatDesc:
    name: str
    offset: int   # byte offset into the data block
    size: int     # number of u64 values (1 for counters, >1 for histograms)
    flags: int
    exponent: int


class StatsFd:
    def __init__(self, fd: int):
        self.fd = fd
        hdr = uapi.kvm_stats_header.from_buffer_copy(os.pread(fd, C.sizeof(uapi.kvm_stats_header), 0))
        self.id = os.pread(fd, hdr.name_size, hdr.id_offset).split(b"\0", 1)[0].decode()
        dsize = C.sizeof(uapi.kvm_stats_desc) + hdr.name_size
        raw = os.pread(fd, dsize * hdr.num_desc, hdr.desc_offset)
        self.descs: dict[str, StatDesc] = {}
        data_len = 0
        for i in range(hdr.num_desc):
            d = uapi.kvm_stats_desc.from_buffer_copy(raw, i * dsize)
            name = raw[i * dsize + C.sizeof(d): (i + 1) * dsize].split(b"\0", 1)[0].decode()
            self.descs[name] = StatDesc(name, d.offset, d.size, d.flags, d.exponent)
            data_len = max(data_len, d.offset + 8 * d.size)
        self._data_offset = hdr.data_offset
        self._data_len = data_len

    def names(self) -> list[str]:
        return list(self.descs)

    def read(self, names=None) -> dict[str, int]:
        """One snapshot: scalar stats by name (histograms are summed)."""
        blob = os.pread(self.fd, self._data_len, self._data_offset)
        out = {}
        for name in (names if names is not None else self.descs):
            d = self.descs[name]
            vals = memoryview(blob)[d.offset:d.offset + 8 * d.size].cast("Q")
            out[name] = vals[0] if d.size == 1 else sum(vals)
        return out

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __del__(self):
        try:
            self.close()
        except OSError:
            pass
