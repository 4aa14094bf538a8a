"""What the engine reports for monitoring, independent of where it is exported.

The engine calls an :class:`EngineMetrics`; the Triton model passes one that writes Triton custom metric
families (``peftserve/triton/metrics.py``), tests pass a recording one, and the default
does nothing. Adapter labels are adapter ids known to the repository, :data:`BASE_LABEL` for the base model
and :data:`UNKNOWN_LABEL` for ids that never resolved, so clients cannot grow the label set at will.
"""

from __future__ import annotations

BASE_LABEL = "(base)"
UNKNOWN_LABEL = "(unknown)"


class EngineMetrics:
    """No-op observer; subclasses export what they need."""

    def request_done(self, adapter: str, *, error_code: str | None, seconds: float, tokens: int) -> None:
        """One request answered (``error_code`` None) or refused (a Triton error code name)."""

    def cache_event(self, event: str, adapter: str) -> None:
        """``event`` is ``hit``, ``miss`` or ``eviction``."""

    def host_cache_event(self, event: str, adapter: str) -> None:
        """``event`` is ``hit`` (a device-cache miss copied from the host tier) or ``miss`` (an adapter read and
        converted from its files); only while the host tier is on."""

    def host_cache_bytes(self, nbytes: int) -> None:
        """Bytes the host tier holds, after each change."""

    def response_cache_event(self, event: str, adapter: str) -> None:
        """``event`` is ``hit`` (answered from the response cache) or ``miss`` (a request the cache could serve
        ran the model)."""

    def response_cache_bytes(self, nbytes: int) -> None:
        """Bytes the response cache holds, after each answer it stores."""

    def load_wait(self, adapter: str, *, seconds: float) -> None:
        """A request whose adapter was not on the device waited ``seconds`` for its load (queued on a loader
        thread, then read or copied from the host tier), beside the running batch."""

    def adapter_loaded(self, adapter: str, *, seconds: float, nbytes: int) -> None:
        """An adapter version was read, checked and converted."""

    def cache_state(self, *, loaded: int, nbytes: int, by_adapter: dict[str, int]) -> None:
        """Adapters held in memory and their bytes (in all, and per adapter id), after each batch."""

    def adapter_event(self, event: str, adapter: str, version: int | None) -> None:
        """A version event of the hot-swap watcher: ``switched``, ``rejected``, ``removed`` or
        ``files_changed`` (a version's files changed in place)."""

    def serving_version(self, adapter: str, version: int) -> None:
        """The version new requests for ``adapter`` get now (0 once it is no longer served)."""

    def over_limit(self, adapter: str) -> None:
        """A request was refused because ``adapter`` is over its rate or in-flight limit."""

    def decode_graph_captured(self, batch_size: int) -> None:
        """The CUDA graph of a decoding step was captured for this batch-size bucket: on the bucket's first use,
        and again after the adapter ops in use changed (each capture costs two forward passes on the loop)."""

    def gc_pause(self, generation: int, *, seconds: float) -> None:
        """Python's garbage collector held the GIL this long for a collection of ``generation`` (2: full),
        stalling every thread of the process (peftserve.gc_pauses)."""

    def inflight(self, by_adapter: dict[str, int]) -> None:
        """Requests inside the model now, for the adapters whose count just changed."""

    def first_token(self, adapter: str, *, seconds: float) -> None:
        """Time from a request's arrival to its first generated token (continuous batching)."""

    def time_per_output_token(self, adapter: str, *, seconds: float) -> None:
        """Mean time between a request's tokens after the first."""
