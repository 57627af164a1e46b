"""An in-memory LRU cache of node outputs, bounded in bytes (not entries).

Sizes are estimated by duck typing so this layer never imports torch: numpy arrays and anything
with an integer ``nbytes``; torch-like tensors through ``numel() * element_size()``; containers and
plain objects by summing their parts (a few levels deep); anything else counts a small constant.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

SMALL_OBJECT_BYTES = 64
_MAX_DEPTH = 4
_MAX_ITEMS = 256


def estimate_nbytes(value: Any, depth: int = 0) -> int:
    """Rough memory size of a value in bytes, for the cache's budget."""
    nbytes = getattr(value, "nbytes", None)
    if isinstance(nbytes, int):
        return nbytes
    numel = getattr(value, "numel", None)
    element_size = getattr(value, "element_size", None)
    if callable(numel) and callable(element_size):
        try:
            return int(numel()) * int(element_size())
        except Exception:  # noqa: BLE001 - duck typing: fall through to the generic estimate
            pass
    if value is None or isinstance(value, bool | int | float):
        return SMALL_OBJECT_BYTES
    if isinstance(value, str | bytes):
        return SMALL_OBJECT_BYTES + len(value)
    if depth >= _MAX_DEPTH:
        return SMALL_OBJECT_BYTES
    if isinstance(value, dict):
        items = list(value.values())[:_MAX_ITEMS]
    elif isinstance(value, list | tuple | set | frozenset):
        items = list(value)[:_MAX_ITEMS]
    elif hasattr(value, "__dict__"):
        items = list(vars(value).values())[:_MAX_ITEMS]
    else:
        return SMALL_OBJECT_BYTES
    return SMALL_OBJECT_BYTES + sum(estimate_nbytes(item, depth + 1) for item in items)


@dataclass
class CacheEntry:
    """A node's outputs, the files it wrote, and the estimated size."""

    outputs: dict[str, Any]
    nbytes: int
    files: list[Path] = field(default_factory=list)


class ByteLRU:
    """Least-recently-used mapping from cache key to :class:`CacheEntry`, bounded in total bytes."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self.nbytes = 0
        self._entries: OrderedDict[bytes, CacheEntry] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, key: bytes) -> bool:
        return key in self._entries

    def get(self, key: bytes) -> CacheEntry | None:
        """The entry for ``key`` (marking it most recently used), or None."""
        entry = self._entries.get(key)
        if entry is not None:
            self._entries.move_to_end(key)
        return entry

    def put(self, key: bytes, outputs: dict[str, Any], files: list[Path] | None = None) -> None:
        """Store outputs, evicting the least recently used entries to stay within the budget.

        An entry larger than the whole budget is not stored.
        """
        size = sum(estimate_nbytes(v) for v in outputs.values()) + SMALL_OBJECT_BYTES
        old = self._entries.pop(key, None)
        if old is not None:
            self.nbytes -= old.nbytes
        if size > self.max_bytes:
            return
        self._entries[key] = CacheEntry(outputs, size, list(files or []))
        self.nbytes += size
        while self.nbytes > self.max_bytes:
            _, evicted = self._entries.popitem(last=False)
            self.nbytes -= evicted.nbytes

    def clear(self) -> None:
        """Drop every entry."""
        self._entries.clear()
        self.nbytes = 0
