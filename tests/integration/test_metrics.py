"""peftserve's custom metric families on Triton's metrics port, labelled by adapter."""

from __future__ import annotations

import time

import pytest
from tritonclient.utils import InferenceServerException

from tests.integration.conftest import Stream, infer, metrics_of
from tools.server_probe import Metrics
from tools.triton_server import TritonServer


def peft_llm(metrics: Metrics, name: str, **labels: str) -> float:
    """The value of ``name`` for the peft_llm model's samples with these labels (0 if none)."""
    return metrics.total(name, model="peft_llm", **labels)


def test_metrics_count_requests_tokens_errors_and_cache(triton: TritonServer) -> None:
    before = metrics_of(triton)
    for _ in range(3):
        infer(triton, "a dog", "gardener", 8)
    infer(triton, "a dog", max_tokens=8)
    with pytest.raises(InferenceServerException, match="unknown adapter 'nobody'"):
        infer(triton, "a dog", "nobody", 8)
    after = metrics_of(triton)

    def delta(name: str, **labels: str) -> float:
        return peft_llm(after, name, **labels) - peft_llm(before, name, **labels)

    assert delta("peftserve_requests_total", adapter="gardener") == 3
    assert delta("peftserve_requests_total", adapter="(base)") == 1
    assert delta("peftserve_request_errors_total", adapter="(unknown)", code="NOT_FOUND") == 1
    assert 3 <= delta("peftserve_generated_tokens_total", adapter="gardener") <= 24
    assert delta("peftserve_request_duration_seconds_count", adapter="gardener") == 3
    assert delta("peftserve_adapter_cache_hits_total", adapter="gardener") >= 2
    assert peft_llm(after, "peftserve_adapter_cache_misses_total", adapter="gardener") >= 1
    assert peft_llm(after, "peftserve_adapter_load_duration_seconds_count", adapter="gardener") >= 1
    assert peft_llm(after, "peftserve_adapters_loaded") >= 1
    assert peft_llm(after, "peftserve_adapter_memory_bytes") > 0


def test_garbage_collector_pauses_of_the_engine_stub_are_a_histogram_per_generation(triton: TritonServer) -> None:
    """Series for every generation from the first scrape on; the stub's collections since start-up counted
    (when one happens depends on what the stub allocated: the unit tests time them exactly)."""
    before = metrics_of(triton)
    assert set(before.by_label("peftserve_gc_pause_seconds_count", "generation", model="peft_llm")) == set("012")
    for _ in range(20):  # the stub allocates for each request: by now some young collection has run
        infer(triton, "a dog", "pirate", 8)
    after = metrics_of(triton)
    for generation in "012":
        count = peft_llm(after, "peftserve_gc_pause_seconds_count", generation=generation)
        assert peft_llm(after, "peftserve_gc_pause_seconds_bucket", generation=generation, le="+Inf") == count
        assert count >= peft_llm(before, "peftserve_gc_pause_seconds_count", generation=generation)
    assert peft_llm(after, "peftserve_gc_pause_seconds_count", generation="0") > 0
    assert peft_llm(after, "peftserve_gc_pause_seconds_sum", generation="0") > 0


def test_requests_in_flight_are_counted_while_they_run_and_not_after(triton: TritonServer) -> None:
    """The gauge is published on the response thread's polls (every 20 ms), not on every change."""

    def in_flight() -> float:
        return peft_llm(metrics_of(triton), "peftserve_requests_in_flight", adapter="chef")

    def eventually(wanted: float) -> float:
        deadline = time.monotonic() + 5
        while (seen := in_flight()) != wanted and time.monotonic() < deadline:
            time.sleep(0.02)
        return seen

    stream = Stream(triton)
    try:
        stream.send("long", "a dog", "chef", 128, ignore_eos=True)
        first = stream.responses.get(timeout=60)
        assert first[1] is None
        assert eventually(1) == 1
        stream.collect(1)
        assert eventually(0) == 0
    finally:
        stream.close()
