"""Give back the resident pages of memory-mapped weights once they have been converted.

Loading in another precision reads every tensor of a memory-mapped file and keeps only the
converted copy. Pages of a file mapping that have been read stay in the process's resident set
(they count in RSS) until the mapping is closed, so converting an fp32 SD1.5 file to bf16 would
hold the whole 4 GB file plus the 2 GB result at its peak. `release` drops the source pages of a
tensor from the resident set with madvise(MADV_DONTNEED) as soon as it is converted; for a file
mapping this only unmaps them: the data stays in the page cache and in the file, and a later read
of the same tensor faults them in again (Linux madvise(2)). Only ranges inside a mapping of the
given file are touched, never anonymous memory (there MADV_DONTNEED would zero the data).
"""

from __future__ import annotations

import ctypes
import mmap
import os
import sys
from pathlib import Path

from torch import Tensor

_MADV_DONTNEED = 4


def file_ranges(path: str | Path) -> list[tuple[int, int]]:
    """Address ranges [start, end) where this process maps `path` (empty off Linux)."""
    if not sys.platform.startswith("linux"):
        return []
    target = os.path.realpath(path)
    ranges = []
    try:
        with open("/proc/self/maps") as maps:
            for line in maps:
                parts = line.split(maxsplit=5)
                if len(parts) == 6 and parts[5].strip() == target:
                    start, end = (int(v, 16) for v in parts[0].split("-"))
                    ranges.append((start, end))
    except OSError:
        return []
    return ranges


def release(tensor: Tensor, ranges: list[tuple[int, int]]) -> bool:
    """Drop `tensor`'s pages from the resident set if they lie in one of `ranges` (a file mapping)."""
    if not ranges or tensor.device.type != "cpu":
        return False
    start = tensor.data_ptr()
    end = start + tensor.numel() * tensor.element_size()
    if not any(lo <= start and end <= hi for lo, hi in ranges):
        return False
    page = mmap.PAGESIZE
    first, last = start // page * page, -(-end // page) * page
    libc = ctypes.CDLL(None, use_errno=True)
    return libc.madvise(ctypes.c_void_p(first), ctypes.c_size_t(last - first), _MADV_DONTNEED) == 0
