"""The host tier: converted adapters kept in host memory, so that a device-cache miss is a copy, not a load.

Reading an adapter means hashing its files, parsing them and converting them to the engine's runtime form
(milliseconds to seconds); copying a converted adapter from host memory to the device is a memcpy. The
engine keeps every accepted version here (bounded by ``host_adapter_cache_mb``, least recently used
leaves first), and a version evicted from the device cache comes back from here. A version read from its
files again (a host miss) is still checked against its accepted digest by the engine.

Each version is kept packed (:class:`~peftserve.packed_adapter.PackedAdapter`): one buffer per adapter, so
that thousands of them add a few objects each to what Python's garbage collector walks, not hundreds. On a
GPU the buffer is page-locked, and a device miss copies it in one transfer without blocking. On CPU the
device *is* host memory: a converted adapter is packed at once and served as views into that buffer
(:meth:`HostAdapterTier.runtime_form`), which the tier then keeps, so an adapter in both tiers takes its
bytes once; ``peftserve_host_adapter_cache_bytes`` still counts every adapter the tier keeps (what
evicting all of them would free once the device cache drops them too).
"""

from __future__ import annotations

import logging
import sys

import torch

from peftserve.adapter_cache import AdapterCache
from peftserve.adapter_repository import AdapterVersion
from peftserve.adapter_weights import AdapterWeights
from peftserve.packed_adapter import PackedAdapter

logger = logging.getLogger("peftserve.host_tier")


class HostAdapterTier:
    """Converted adapters by version, in CPU memory, bounded by bytes; ``max_bytes`` 0 turns the tier off."""

    def __init__(self, *, max_bytes: int, device: torch.device) -> None:
        self.device = device
        self.max_bytes = max_bytes
        self._shared = device.type == "cpu"  # the device tensors are host tensors already
        self._pin = device.type == "cuda" and torch.cuda.is_available()
        self.cache: AdapterCache[AdapterVersion, PackedAdapter] = AdapterCache(
            max_entries=sys.maxsize, max_bytes=max(max_bytes, 1), on_evict=self._evicted
        )

    @property
    def enabled(self) -> bool:
        return self.max_bytes > 0

    @property
    def shares_device_memory(self) -> bool:
        """True on CPU: a batch reads views into what the tier holds, so a hit needs no copy."""
        return self._shared

    @property
    def nbytes(self) -> int:
        return self.cache.nbytes

    def __contains__(self, version: AdapterVersion) -> bool:
        return version in self.cache

    def runtime_form(self, weights: AdapterWeights) -> AdapterWeights:
        """A freshly converted adapter as the engine should check and serve it: on CPU views into a packed
        buffer that :meth:`keep` then holds as it is (so the adapter cache, the tier and the smoke check share
        one copy), elsewhere ``weights`` itself."""
        if not self._shared or not self.enabled or weights.nbytes > self.max_bytes:
            return weights
        return PackedAdapter.pack(weights).unpack()

    def keep(self, version: AdapterVersion, weights: AdapterWeights) -> None:
        """Keep a packed host copy of ``weights`` (device tensors; on CPU the buffer they are views into, if
        they are) unless the tier holds it already or it is larger than the tier."""
        if not self.enabled or weights.nbytes > self.max_bytes or version in self.cache:
            return
        packed = weights.packed_from if self._shared else None
        if packed is None:
            packed = PackedAdapter.pack(weights, pin=self._pin)
        if packed.nbytes <= self.max_bytes:  # else its alignment padding tipped it over
            self.cache.add(version, packed)

    def fetch(self, version: AdapterVersion) -> AdapterWeights | None:
        """The adapter on the device, copied from the host tier (views into it on CPU); None on a miss (the
        files must be read)."""
        if not self.enabled:
            return None
        packed = self.cache.get(version)
        if packed is None:
            return None
        weights = packed.unpack(self.device, non_blocking=self._pin)
        if self._pin:  # one wait for the copy, on this loader thread: complete before any stream reads it
            torch.cuda.current_stream(self.device).synchronize()
        return weights

    def drop(self, version: AdapterVersion) -> None:
        """Forget a retired version (replaced or removed): it must never come back from here."""
        self.cache.retire(version)

    def _evicted(self, version: AdapterVersion) -> None:
        logger.info("adapter %s left the host tier (host_adapter_cache_mb)", version.label)
