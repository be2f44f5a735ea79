"""Guest memory backings: anonymous 4K, THP (madvise), hugetlb 2M and 1G.

Each backing is an mmap whose host virtual address is 2M (or 1G) aligned, as
KVM only maps a guest page huge when the host page under it is huge and the
GPA and HVA agree modulo the huge-page size.
"""
from __future__ import annotations

import ctypes
import mmap
import os
from enum import StrEnum
from typing import TYPE_CHECKING, Self

from kvmsplit.lazy import lazy

if TYPE_CHECKING:
    import numpy as np
else:
    np = lazy("numpy")     # not needed before the guest's first line (start-up goal: 0.2 s)


MB = 1 << 20
GB = 1 << 30


class Backing(StrEnum):
    ANON = "anon"
    THP = "thp"
    HUGETLB_2M = "hugetlb-2m"
    HUGETLB_1G = "hugetlb-1g"

    @property
    def page_size(self) -> int:
        """Host page size the backing provides (THP: what it can provide)."""
        return {"anon": 4096, "thp": 2 * MB, "hugetlb-2m": 2 * MB, "hugetlb-1g": GB}[self.value]

    @property
    def hugetlb_kb(self) -> int | None:
        return {"hugetlb-2m": 2048, "hugetlb-1g": 1048576}.get(self.value)


class GuestMemory:
    """`size` bytes of host memory for one or more memslots."""

    def __init__(self, backing: Backing, size: int):
        self.backing = backing
        self.size = size
        self._fd = -1
        align = max(backing.page_size, 2 * MB)
        if backing.hugetlb_kb:
            flag = os.MFD_HUGE_1GB if backing is Backing.HUGETLB_1G else os.MFD_HUGE_2MB
            self._fd = os.memfd_create(f"kvmsplit-{backing.value}", os.MFD_CLOEXEC | os.MFD_HUGETLB | flag)
            try:
                os.ftruncate(self._fd, size)
                # hugetlbfs aligns the mapping to its page size itself
                m = mmap.mmap(self._fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
            except OSError:
                os.close(self._fd)      # e.g. no free huge pages: the fd must not outlive the failure
                self._fd = -1
                raise
            self._off = 0
        else:
            # over-allocate and use an aligned window; the slack is never touched
            m = mmap.mmap(-1, size + align, mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS,
                          mmap.PROT_READ | mmap.PROT_WRITE)
            base = ctypes.addressof(ctypes.c_char.from_buffer(m))
            self._off = (-base) % align
            advice = mmap.MADV_HUGEPAGE if backing is Backing.THP else mmap.MADV_NOHUGEPAGE
            m.madvise(advice, self._off, size)
        self._map: mmap.mmap | None = m
        self.hva = ctypes.addressof(ctypes.c_char.from_buffer(m)) + self._off
        self.buf = memoryview(m)[self._off:self._off + size]

    def qwords(self) -> np.ndarray:
        """A zero-copy u64 view of the memory."""
        return np.frombuffer(self.buf, dtype=np.uint64)

    def huge_bytes(self) -> int:
        """How much of this mapping the host kernel backs with huge pages
        (AnonHugePages / hugetlb), from /proc/self/smaps."""
        start, end = self.hva, self.hva + self.size
        total = 0
        cur = None
        with open("/proc/self/smaps") as f:
            for line in f:
                if "-" in line.split(" ", 1)[0] and not line[0].isupper():
                    lo, hi = (int(x, 16) for x in line.split(" ", 1)[0].split("-"))
                    cur = (lo, hi) if lo < end and hi > start else None
                elif cur and line.startswith(("AnonHugePages:", "Private_Hugetlb:", "Shared_Hugetlb:")):
                    total += int(line.split()[1]) * 1024
        return total

    def close(self) -> None:
        if self._map is not None:
            try:
                self.buf.release()
                self._map.close()
            except BufferError:
                pass  # a numpy view is still alive; the mapping goes when it does
            self._map = None
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
