"""A least-recently-used cache of loaded adapters, bounded by count and by bytes.

Pinned adapters are never evicted; an adapter leased by a batch in flight is never evicted under it. A
retired adapter (a version replaced by a newer one) leaves as soon as its last lease is released. The
cache is an explicit object owned by the engine (one per model instance), never module state. The engine
keeps two: the device cache that batches lease from, and the host tier (:mod:`peftserve.host_tier`) that
device misses copy from, which uses only :meth:`AdapterCache.get`, :meth:`AdapterCache.add` and
:meth:`AdapterCache.retire`.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from typing import Generic, Protocol, TypeVar

from peftserve.errors import AdapterLoadError, CacheFullError


class Sized(Protocol):
    @property
    def nbytes(self) -> int: ...


K = TypeVar("K", bound=Hashable)
V = TypeVar("V", bound=Sized)


@dataclass
class CacheStats:
    hits: int = 0
    misses: int = 0
    evictions: int = 0


class AdapterCache(Generic[K, V]):
    """LRU over loaded adapters; ``on_evict`` is called with each evicted key (for metrics and logs), and
    ``on_drop`` with every value that leaves, evicted or retired (so whatever else holds it can let go)."""

    def __init__(
        self,
        *,
        max_entries: int,
        max_bytes: int,
        on_evict: Callable[[K], None] | None = None,
        on_drop: Callable[[V], None] | None = None,
    ) -> None:
        self.max_entries = max_entries
        self.max_bytes = max_bytes
        self.on_evict = on_evict
        self.on_drop = on_drop
        self.stats = CacheStats()
        self._entries: OrderedDict[K, V] = OrderedDict()
        self._pinned: set[K] = set()
        self._leases: dict[K, int] = {}
        self._retired: set[K] = set()
        self._lock = threading.RLock()

    def __contains__(self, key: K) -> bool:
        return key in self._entries

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def nbytes(self) -> int:
        # Under the lock: loader threads read this while other loaders add (summing a changing dict raises).
        with self._lock:
            return sum(value.nbytes for value in self._entries.values())

    def sizes(self) -> dict[K, int]:
        """Bytes held per cached key."""
        with self._lock:
            return {key: value.nbytes for key, value in self._entries.items()}

    def pin(self, key: K) -> None:
        self._pinned.add(key)

    def retire(self, key: K) -> None:
        """Drop ``key`` now, or when the batches holding it release it (they finish on what they started)."""
        with self._lock:
            self._pinned.discard(key)
            if key in self._leases:
                self._retired.add(key)
            else:
                self._drop(key)

    def get(self, key: K) -> V | None:
        """The cached value, touched as most recently used, without a lease; None on a miss (nothing loaded)."""
        with self._lock:
            value = self._entries.get(key)
            if value is None:
                self.stats.misses += 1
                return None
            self.stats.hits += 1
            self._entries.move_to_end(key)
            return value

    def acquire(self, key: K, load: Callable[[], V]) -> V:
        """Return the cached value (loading it on a miss) and lease it until :meth:`release`."""
        with self._lock:
            value = self._entries.get(key)
            if value is not None:
                self.stats.hits += 1
                self._entries.move_to_end(key)
            else:
                self.stats.misses += 1
                value = load()
                self._make_room(value.nbytes, key)
                self._entries[key] = value
            self._leases[key] = self._leases.get(key, 0) + 1
            return value

    def add(self, key: K, value: V) -> None:
        """Put a value loaded elsewhere into the cache (or touch it if present), without leasing it."""
        with self._lock:
            self.acquire(key, lambda: value)
            self.release(key)

    def release(self, key: K) -> None:
        with self._lock:
            remaining = self._leases[key] - 1
            if remaining:
                self._leases[key] = remaining
                return
            del self._leases[key]
            if key in self._retired:
                self._retired.discard(key)
                self._drop(key)

    def _make_room(self, incoming_bytes: int, incoming_key: K) -> None:
        if incoming_bytes > self.max_bytes:
            raise AdapterLoadError(
                f"adapter {incoming_key} needs {incoming_bytes} bytes, more than the whole adapter cache "
                f"({self.max_bytes} bytes, max_adapter_memory_mb)"
            )
        while len(self._entries) + 1 > self.max_entries or self.nbytes + incoming_bytes > self.max_bytes:
            victim = next((k for k in self._entries if k not in self._pinned and k not in self._leases), None)
            if victim is None:
                raise CacheFullError(
                    f"adapter cache full ({len(self._entries)} adapters, {self.nbytes} bytes), every entry pinned or "
                    "in use; raise max_loaded_adapters or max_adapter_memory_mb"
                )
            self._drop(victim)
            self.stats.evictions += 1
            if self.on_evict is not None:
                self.on_evict(victim)

    def _drop(self, key: K) -> None:
        value = self._entries.pop(key, None)
        if value is not None and self.on_drop is not None:
            self.on_drop(value)
