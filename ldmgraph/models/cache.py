"""The model cache: one loaded model per file identity, shared by every node and workflow of a session.

Keys are built by the loaders (`checkpoint.load_checkpoint` & co.): the file's resolved path, size
and modification time plus the load options, so a rewritten file is loaded afresh and two nodes
that ask for the same file share one module. The cache is bounded by a byte budget (parameters and
buffers, counted once per tensor); when an insertion goes over it, the least recently used entries
are dropped (Python frees them once no node still holds them). An entry larger than the whole
budget is returned but not kept. The executor creates one cache per session through
`NodeContext.resource("model_cache", ModelCache)`; nothing here is global. A cache given a
`runtime` (`ldmgraph.models.manager.ModelRuntime`: `--compile`, `--gpu-memory`) has it adopt every
model it loads, so compiled calls and device placement are set up once and shared by every hit.
"""

from __future__ import annotations

import os
import sys
import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

T = TypeVar("T")

DEFAULT_BUDGET_FRACTION = 0.5
"""Default budget: half of the machine's physical memory (override with LDMGRAPH_MODEL_CACHE_BYTES)."""


def default_budget() -> int:
    """LDMGRAPH_MODEL_CACHE_BYTES if set, else half of physical RAM (8 GiB when it cannot be read)."""
    env = os.environ.get("LDMGRAPH_MODEL_CACHE_BYTES")
    if env:
        return int(float(env))
    try:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        total = 16 * 2**30
    return int(total * DEFAULT_BUDGET_FRACTION)


@dataclass
class CacheStats:
    """Counters the nodes' tests and the CLI read: lookups that hit, missed, loads run, entries evicted."""

    hits: int = 0
    misses: int = 0
    loads: int = 0
    evictions: int = 0


class ModelCache:
    """A thread-safe LRU of loaded models bounded by bytes (see the module docstring).

    `get_or_load(key, load)` returns the cached value or runs `load()` once, even when several
    threads ask for the same key at the same time. `sizeof` measures a value (default: bytes of
    the tensors of modules, handles and checkpoints).
    """

    def __init__(self, budget_bytes: int | None = None, sizeof: Callable[[Any], int] | None = None,
                 runtime: Any = None) -> None:
        self.budget_bytes = default_budget() if budget_bytes is None else int(budget_bytes)
        self.runtime = runtime  # the session's ModelRuntime (--compile, --gpu-memory), which adopts every model
        self._sizeof = sizeof
        self._entries: OrderedDict[Any, tuple[Any, int]] = OrderedDict()
        self._lock = threading.Lock()
        self._key_locks: dict[Any, threading.Lock] = {}
        self.stats = CacheStats()

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, key: Any) -> bool:
        return key in self._entries

    @property
    def used_bytes(self) -> int:
        with self._lock:
            return sum(size for _, size in self._entries.values())

    def keys(self) -> list[Any]:
        """Keys from least to most recently used."""
        with self._lock:
            return list(self._entries)

    def measure(self, value: Any) -> int:
        if self._sizeof is not None:
            return int(self._sizeof(value))
        return module_nbytes(value)

    def get(self, key: Any) -> Any | None:
        """The cached value (marked most recently used) or None; counts a hit or a miss."""
        with self._lock:
            if key in self._entries:
                self._entries.move_to_end(key)
                self.stats.hits += 1
                return self._entries[key][0]
            self.stats.misses += 1
            return None

    def get_or_load(self, key: Any, load: Callable[[], T]) -> T:
        """The value for `key`, loading it with `load()` on a miss (one load per key at a time)."""
        with self._lock:
            key_lock = self._key_locks.setdefault(key, threading.Lock())
        with key_lock:
            value = self.get(key)
            if value is not None:
                return value  # type: ignore[no-any-return]
            loaded = load()
            if self.runtime is not None:
                self.runtime.adopt(loaded)
            with self._lock:
                self.stats.loads += 1
            self.put(key, loaded)
            return loaded

    def put(self, key: Any, value: Any) -> None:
        """Insert (or replace) an entry, then evict least recently used entries over the budget."""
        size = self.measure(value)
        with self._lock:
            self._entries.pop(key, None)
            if size > self.budget_bytes:
                return  # bigger than the whole budget: the caller keeps it, the cache does not
            self._entries[key] = (value, size)
            total = sum(s for _, s in self._entries.values())
            while total > self.budget_bytes and len(self._entries) > 1:
                old_key, (_, old_size) = self._entries.popitem(last=False)
                self._key_locks.pop(old_key, None)
                total -= old_size
                self.stats.evictions += 1

    def evict(self, key: Any) -> bool:
        """Drop one entry; True when it was cached."""
        with self._lock:
            return self._entries.pop(key, None) is not None

    def clear(self) -> None:
        """Drop every entry (counters are kept)."""
        with self._lock:
            self._entries.clear()
            self._key_locks.clear()


def module_nbytes(obj: Any) -> int:
    """Bytes of parameters and buffers held by a module, a handle or a Checkpoint (for the cache budget).

    Tensors shared by several parts count once; meta tensors (no storage) count nothing. Torch is
    not imported here: a value that holds tensors was made after torch was imported.
    """
    parts = getattr(obj, "parts", None)
    if callable(parts) and not hasattr(obj, "parameters"):  # a Checkpoint: the sum of its handles
        return sum(module_nbytes(p) for p in parts())
    torch = sys.modules.get("torch")
    if torch is None:
        return 0
    if isinstance(obj, torch.nn.Module):
        seen: set[tuple[int, int]] = set()
        total = 0
        for t in [*obj.parameters(), *obj.buffers()]:
            if t.device.type == "meta":
                continue
            key = (t.data_ptr(), t.numel())
            if key not in seen:
                seen.add(key)
                total += t.numel() * t.element_size()
        return total
    if isinstance(obj, torch.Tensor):
        return int(obj.numel() * obj.element_size())
    return 0
