"""Per-adapter admission: requests in flight and a request rate with burst, checked when a request arrives.

A request beyond its adapter's limits is refused at once with :class:`OverLimitError` instead of
queueing behind the flood, so one adapter's traffic cannot take the server from the others. Only ids
that resolve to an adapter get a counter (plus the base model), so clients cannot grow this state by
inventing ids.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from peftserve.config import AdapterLimits
from peftserve.errors import OverLimitError


@dataclass
class _TokenBucket:
    rate: float
    capacity: float
    tokens: float
    updated: float

    def take(self, now: float) -> bool:
        self.tokens = min(self.capacity, self.tokens + (now - self.updated) * self.rate)
        self.updated = now
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return True
        return False


class Admission:
    def __init__(
        self,
        default: AdapterLimits,
        overrides: dict[str, AdapterLimits] | None = None,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.default = default
        self.overrides = overrides or {}
        self.clock = clock
        self._inflight: dict[str, int] = {}
        self._buckets: dict[str, _TokenBucket] = {}
        self._lock = threading.Lock()

    def limits(self, adapter: str) -> AdapterLimits:
        return self.overrides.get(adapter, self.default)

    def admit(self, adapter: str) -> None:
        """Count one request in, or raise :class:`OverLimitError` saying which limit it hit."""
        limits = self.limits(adapter)
        with self._lock:
            inflight = self._inflight.get(adapter, 0)
            if limits.max_inflight and inflight >= limits.max_inflight:
                raise OverLimitError(
                    f"over limit: adapter {adapter!r} already has {inflight} requests in flight "
                    f"(max_inflight {limits.max_inflight}); retry later"
                )
            if limits.rate_per_second and not self._bucket(adapter, limits).take(self.clock()):
                raise OverLimitError(
                    f"over limit: adapter {adapter!r} exceeds its request rate ({limits.rate_per_second:g}/s, "
                    f"burst {self._bucket(adapter, limits).capacity:g}); retry later"
                )
            self._inflight[adapter] = inflight + 1

    def release(self, adapter: str) -> None:
        with self._lock:
            self._inflight[adapter] = max(0, self._inflight.get(adapter, 0) - 1)

    def inflight(self, adapter: str) -> int:
        return self._inflight.get(adapter, 0)

    def _bucket(self, adapter: str, limits: AdapterLimits) -> _TokenBucket:
        bucket = self._buckets.get(adapter)
        if bucket is None:
            capacity = float(limits.burst or max(1.0, limits.rate_per_second))
            bucket = self._buckets[adapter] = _TokenBucket(limits.rate_per_second, capacity, capacity, self.clock())
        return bucket
