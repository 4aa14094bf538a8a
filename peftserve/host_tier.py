"""The host tier: converted adapters kept in host memory, so that a device-cache miss is a copy, not a load.

Reading an adapter means hashing its files, parsing them and converting them to the engine's runtime form
(milliseconds to seconds); copying a converted adapter from host memory to the device is a memcpy. The
engine keeps every accepted version here (bounded by ``host_adapter_cache_mb``, least recently used
leaves first), and a version evicted from the device cache comes back from here. A version read from its
files again (a host miss) is still checked against its accepted digest by the engine.

On a GPU the host copies are separate, page-locked CPU tensors (copied to the device without blocking).
On CPU the device *is* host memory: the tier holds the very tensors the device cache holds, no copy, so an
adapter in both tiers takes its bytes once; ``peftserve_host_adapter_cache_bytes`` still counts every
adapter the tier keeps (what evicting all of them would free once the device cache drops them too).
"""

from __future__ import annotations

import logging
import sys

import torch

from peftserve.adapter_cache import AdapterCache
from peftserve.adapter_repository import AdapterVersion
from peftserve.adapter_weights import AdapterWeights

logger = logging.getLogger("peftserve.host_tier")


class HostAdapterTier:
    """Converted adapters by version, in CPU memory, bounded by bytes; ``max_bytes`` 0 turns the tier off."""

    def __init__(self, *, max_bytes: int, device: torch.device) -> None:
        self.device = device
        self.max_bytes = max_bytes
        self._shared = device.type == "cpu"  # the device tensors are host tensors already
        self._pin = device.type == "cuda" and torch.cuda.is_available()
        self.cache: AdapterCache[AdapterVersion, AdapterWeights] = AdapterCache(
            max_entries=sys.maxsize, max_bytes=max(max_bytes, 1), on_evict=self._evicted
        )

    @property
    def enabled(self) -> bool:
        return self.max_bytes > 0

    @property
    def shares_device_memory(self) -> bool:
        """True on CPU: what the tier holds is what a batch reads, so a hit needs no copy."""
        return self._shared

    @property
    def nbytes(self) -> int:
        return self.cache.nbytes

    def __contains__(self, version: AdapterVersion) -> bool:
        return version in self.cache

    def keep(self, version: AdapterVersion, weights: AdapterWeights) -> None:
        """Keep a host copy of ``weights`` (device tensors) unless it is there already or larger than the tier."""
        if not self.enabled or version in self.cache or weights.nbytes > self.max_bytes:
            return
        host = weights if self._shared else weights.copied_to(torch.device("cpu"), pin=self._pin)
        self.cache.add(version, host)

    def fetch(self, version: AdapterVersion) -> AdapterWeights | None:
        """The adapter on the device, copied from the host tier; None on a miss (the files must be read)."""
        if not self.enabled:
            return None
        host = self.cache.get(version)
        if host is None or self._shared:
            return host
        weights = host.copied_to(self.device, non_blocking=self._pin)
        if self._pin:  # one wait for all the copies, on this loader thread: complete before any stream reads them
            torch.cuda.current_stream(self.device).synchronize()
        return weights

    def drop(self, version: AdapterVersion) -> None:
        """Forget a retired version (replaced or removed): it must never come back from here."""
        self.cache.retire(version)

    def _evicted(self, version: AdapterVersion) -> None:
        logger.info("adapter %s left the host tier (host_adapter_cache_mb)", version.label)
