"""peftserve's EngineMetrics exported as Triton custom metric families (Triton's metrics port).

Families of the same name from two models merge in Triton, so every series carries a ``model`` label.
Nothing here deletes a family or a series: deleting them from ``finalize`` while a newer version of the
model holds the same families corrupted tritonserver's heap (measured with Triton 24.10: "malloc():
unaligned fastbin chunk", SIGABRT). They die with the stub process.
"""

from __future__ import annotations

import functools
import gc
import threading
from collections.abc import Callable

import triton_python_backend_utils as pb_utils

from peftserve.metrics import BASE_LABEL, EngineMetrics

LATENCY_BUCKETS = [0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0]
LOAD_BUCKETS = [0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0]

# name -> (kind, description); the metrics table of docs/deployment.md lists the same families.
FAMILIES = {
    "peftserve_requests_total": ("COUNTER", "Requests answered, by adapter"),
    "peftserve_request_errors_total": ("COUNTER", "Requests refused, by adapter and Triton error code"),
    "peftserve_generated_tokens_total": ("COUNTER", "Tokens generated, by adapter"),
    "peftserve_request_duration_seconds": ("HISTOGRAM", "Time from submission to answer, by adapter"),
    "peftserve_adapter_cache_hits_total": ("COUNTER", "Requests whose adapter was already loaded"),
    "peftserve_adapter_cache_misses_total": ("COUNTER", "Requests that loaded their adapter"),
    "peftserve_adapter_cache_evictions_total": ("COUNTER", "Adapters evicted from the cache"),
    "peftserve_adapters_loaded": ("GAUGE", "Adapters held in memory"),
    "peftserve_adapter_memory_bytes": ("GAUGE", "Bytes held by loaded adapters"),
    "peftserve_adapter_loaded_bytes": ("GAUGE", "Bytes held in memory per adapter (0: not loaded)"),
    "peftserve_adapter_load_duration_seconds": ("HISTOGRAM", "Time to read, check and convert an adapter"),
    "peftserve_adapter_load_wait_seconds": (
        "HISTOGRAM",
        "Time requests waited for their adapter to reach the device (cache misses), by adapter",
    ),
    "peftserve_host_adapter_cache_hits_total": (
        "COUNTER",
        "Adapters missing from the adapter cache copied from the host tier, by adapter",
    ),
    "peftserve_host_adapter_cache_misses_total": ("COUNTER", "Adapters read and converted from files, by adapter"),
    "peftserve_host_adapter_cache_bytes": ("GAUGE", "Bytes held by the host tier of converted adapters"),
    "peftserve_adapter_version_events_total": (
        "COUNTER",
        "Hot-swap events by adapter: switched, rejected, removed, files_changed",
    ),
    "peftserve_adapter_serving_version": ("GAUGE", "Version of each adapter that new requests get (0: none)"),
    "peftserve_adapter_rejected_version": ("GAUGE", "Last version of each adapter that failed its checks"),
    "peftserve_over_limit_total": ("COUNTER", "Requests refused at once: adapter over its rate or in-flight limit"),
    "peftserve_requests_in_flight": ("GAUGE", "Requests inside the model (running or waiting for a load)"),
    "peftserve_time_to_first_token_seconds": ("HISTOGRAM", "Arrival to first generated token, by adapter"),
    "peftserve_time_per_output_token_seconds": ("HISTOGRAM", "Mean time between tokens after the first"),
    "peftserve_response_cache_hits_total": ("COUNTER", "Requests answered from the response cache, by adapter"),
    "peftserve_response_cache_misses_total": (
        "COUNTER",
        "Requests the response cache could serve that ran the model, by adapter",
    ),
    "peftserve_response_cache_bytes": ("GAUGE", "Bytes held by the response cache (answers and keys)"),
    "peftserve_decode_graph_captures_total": ("COUNTER", "CUDA graphs of decoding steps captured, by batch size"),
    "peftserve_gc_pause_seconds": (
        "HISTOGRAM",
        "Pauses of Python's garbage collector in the engine's stub (every thread waits), by generation",
    ),
}
TOKEN_BUCKETS = [0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0]
_BUCKETS = {
    "peftserve_request_duration_seconds": LATENCY_BUCKETS,
    "peftserve_time_to_first_token_seconds": LATENCY_BUCKETS,
    "peftserve_time_per_output_token_seconds": TOKEN_BUCKETS,
    "peftserve_adapter_load_duration_seconds": LOAD_BUCKETS,
    "peftserve_adapter_load_wait_seconds": LATENCY_BUCKETS,
}
ZERO_INITIALIZED = [
    "peftserve_requests_total",
    "peftserve_generated_tokens_total",
    "peftserve_request_duration_seconds",
    "peftserve_adapter_cache_hits_total",
    "peftserve_adapter_cache_misses_total",
    "peftserve_adapter_cache_evictions_total",
    "peftserve_adapter_load_duration_seconds",
    "peftserve_host_adapter_cache_hits_total",
    "peftserve_host_adapter_cache_misses_total",
    "peftserve_over_limit_total",
    "peftserve_time_to_first_token_seconds",
    "peftserve_time_per_output_token_seconds",
    "peftserve_response_cache_hits_total",
    "peftserve_response_cache_misses_total",
]
_CACHE_FAMILIES = {
    "hit": "peftserve_adapter_cache_hits_total",
    "miss": "peftserve_adapter_cache_misses_total",
    "eviction": "peftserve_adapter_cache_evictions_total",
}
_HOST_CACHE_FAMILIES = {
    "hit": "peftserve_host_adapter_cache_hits_total",
    "miss": "peftserve_host_adapter_cache_misses_total",
}
_RESPONSE_CACHE_FAMILIES = {
    "hit": "peftserve_response_cache_hits_total",
    "miss": "peftserve_response_cache_misses_total",
}


def _on_response_loop(method: Callable) -> Callable:
    """Queue the update for the thread that alone calls into pb_utils (see response_loop.py)."""

    @functools.wraps(method)
    def call(self: TritonMetrics, *args, **kwargs) -> None:
        self.run(functools.partial(method, self, *args, **kwargs))

    return call


class TritonMetrics(EngineMetrics):
    def __init__(self, model_name: str, run: Callable[[Callable[[], None]], None]) -> None:
        self.model_name = model_name
        self.run = run
        self.families = {
            name: pb_utils.MetricFamily(name=name, description=text, kind=getattr(pb_utils.MetricFamily, kind))
            for name, (kind, text) in FAMILIES.items()
        }
        self._series: dict[tuple, object] = {}
        self._loaded: dict[str, int] = {}  # adapters with a nonzero loaded-bytes gauge, and its value
        self._inflight_lock = threading.Lock()  # inflight() is called from the batching loop and submit
        self._inflight_pending: dict[str, int] = {}
        self._inflight_published: dict[str, int] = {}  # touched by the response thread only
        # Counters and histograms start at zero, so dashboards' rate() works from the first scrape.
        for family in ZERO_INITIALIZED:
            self._metric(family, _BUCKETS.get(family), adapter=BASE_LABEL)
        for generation in range(len(gc.get_count())):
            self._metric("peftserve_gc_pause_seconds", TOKEN_BUCKETS, generation=str(generation))

    def _metric(self, family: str, buckets: list[float] | None = None, **labels: str):
        key = (family, *sorted(labels.items()))
        if key not in self._series:
            full = {"model": self.model_name, **labels}
            self._series[key] = (
                self.families[family].Metric(labels=full, buckets=buckets)
                if buckets
                else self.families[family].Metric(labels=full)
            )
        return self._series[key]

    @_on_response_loop
    def request_done(self, adapter: str, *, error_code: str | None, seconds: float, tokens: int) -> None:
        if error_code is not None:
            self._metric("peftserve_request_errors_total", adapter=adapter, code=error_code).increment(1)
            return
        self._metric("peftserve_requests_total", adapter=adapter).increment(1)
        self._metric("peftserve_generated_tokens_total", adapter=adapter).increment(tokens)
        self._metric("peftserve_request_duration_seconds", LATENCY_BUCKETS, adapter=adapter).observe(seconds)

    @_on_response_loop
    def cache_event(self, event: str, adapter: str) -> None:
        self._metric(_CACHE_FAMILIES[event], adapter=adapter).increment(1)

    @_on_response_loop
    def host_cache_event(self, event: str, adapter: str) -> None:
        self._metric(_HOST_CACHE_FAMILIES[event], adapter=adapter).increment(1)

    @_on_response_loop
    def host_cache_bytes(self, nbytes: int) -> None:
        self._metric("peftserve_host_adapter_cache_bytes").set(nbytes)

    @_on_response_loop
    def response_cache_event(self, event: str, adapter: str) -> None:
        self._metric(_RESPONSE_CACHE_FAMILIES[event], adapter=adapter).increment(1)

    @_on_response_loop
    def decode_graph_captured(self, batch_size: int) -> None:
        self._metric("peftserve_decode_graph_captures_total", batch_size=str(batch_size)).increment(1)

    @_on_response_loop
    def gc_pause(self, generation: int, *, seconds: float) -> None:
        self._metric("peftserve_gc_pause_seconds", TOKEN_BUCKETS, generation=str(generation)).observe(seconds)

    @_on_response_loop
    def response_cache_bytes(self, nbytes: int) -> None:
        self._metric("peftserve_response_cache_bytes").set(nbytes)

    @_on_response_loop
    def adapter_loaded(self, adapter: str, *, seconds: float, nbytes: int) -> None:
        self._metric("peftserve_adapter_load_duration_seconds", LOAD_BUCKETS, adapter=adapter).observe(seconds)

    @_on_response_loop
    def load_wait(self, adapter: str, *, seconds: float) -> None:
        family = "peftserve_adapter_load_wait_seconds"
        self._metric(family, _BUCKETS[family], adapter=adapter).observe(seconds)

    @_on_response_loop
    def cache_state(self, *, loaded: int, nbytes: int, by_adapter: dict[str, int]) -> None:
        self._metric("peftserve_adapters_loaded").set(loaded)
        self._metric("peftserve_adapter_memory_bytes").set(nbytes)
        for adapter in self._loaded.keys() - by_adapter.keys():
            self._metric("peftserve_adapter_loaded_bytes", adapter=adapter).set(0)
        for adapter, adapter_bytes in by_adapter.items():
            if self._loaded.get(adapter) != adapter_bytes:  # each set is a call into the server
                self._metric("peftserve_adapter_loaded_bytes", adapter=adapter).set(adapter_bytes)
        self._loaded = dict(by_adapter)

    @_on_response_loop
    def adapter_event(self, event: str, adapter: str, version: int | None) -> None:
        self._metric("peftserve_adapter_version_events_total", adapter=adapter, event=event).increment(1)
        if event == "rejected":
            self._metric("peftserve_adapter_rejected_version", adapter=adapter).set(version or 0)

    @_on_response_loop
    def serving_version(self, adapter: str, version: int) -> None:
        self._metric("peftserve_adapter_serving_version", adapter=adapter).set(version)

    @_on_response_loop
    def over_limit(self, adapter: str) -> None:
        self._metric("peftserve_over_limit_total", adapter=adapter).increment(1)

    def inflight(self, by_adapter: dict[str, int]) -> None:
        """Kept for :meth:`publish_inflight`, not queued: the counts change twice a request, and a gauge's set,
        unlike a counter's or a histogram's update, holds the GIL for its whole call into the server (~35 us,
        measured in a stub): at 200 requests a second that stalled every other thread of the stub 14 ms a
        second (py-spy, demo at concurrency 16: nearly all of the response thread's time holding the GIL)."""
        with self._inflight_lock:
            self._inflight_pending.update(by_adapter)

    def publish_inflight(self) -> None:
        """Set the in-flight gauges whose counts changed since the last call (on the response thread, every
        poll: a scrape sees counts at most a poll old)."""
        with self._inflight_lock:
            pending, self._inflight_pending = self._inflight_pending, {}
        for adapter, count in pending.items():
            if self._inflight_published.get(adapter) != count:
                self._metric("peftserve_requests_in_flight", adapter=adapter).set(count)
                self._inflight_published[adapter] = count

    @_on_response_loop
    def first_token(self, adapter: str, *, seconds: float) -> None:
        family = "peftserve_time_to_first_token_seconds"
        self._metric(family, _BUCKETS[family], adapter=adapter).observe(seconds)

    @_on_response_loop
    def time_per_output_token(self, adapter: str, *, seconds: float) -> None:
        family = "peftserve_time_per_output_token_seconds"
        self._metric(family, _BUCKETS[family], adapter=adapter).observe(seconds)
