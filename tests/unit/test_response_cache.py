"""The response cache: repeats of determined requests are answered without running the model, never across a
hot-swap, never for unseeded sampling or streams, within its byte bound, and only when switched on."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
import threading
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest

from peftserve.config import ServeConfig, read_model_config
from peftserve.continuous import Work
from peftserve.engine import Engine
from peftserve.errors import OverLimitError
from peftserve.generation import GenerationRow, SamplingParams
from peftserve.hot_swap import AdapterWatcher
from peftserve.metrics import BASE_LABEL, EngineMetrics
from peftserve.requests import Completion, CompletionRequest
from peftserve.response_cache import ENTRY_OVERHEAD_BYTES, CachedAnswer, ResponseCache
from tests.conftest import DEMO_PHRASES, demo_config

CHAT_TEMPLATE = "{% for m in messages %}<{{ m['role'] }}> {{ m['content'] }}</s>{% endfor %}<assistant>"


class RecordedCache(EngineMetrics):
    def __init__(self) -> None:
        self.events: Counter[tuple[str, str]] = Counter()
        self.nbytes: list[int] = []

    def response_cache_event(self, event: str, adapter: str) -> None:
        self.events[(event, adapter)] += 1

    def response_cache_bytes(self, nbytes: int) -> None:
        self.nbytes.append(nbytes)


class Counted:
    """An engine whose model forward passes are counted (prefill chunks and decoding steps alike)."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.forward_passes = 0
        forward = engine.runner._forward

        def counting(*args, **kwargs):
            self.forward_passes += 1
            return forward(*args, **kwargs)

        engine.runner._forward = counting

    @property
    def metrics(self) -> RecordedCache:
        return self.engine.metrics

    def ask(self, request: CompletionRequest) -> tuple[Completion | Exception, int]:
        """The answer and how many forward passes it took."""
        before = self.forward_passes
        (answer,) = self.engine.complete([request])
        return answer, self.forward_passes - before


def counted_engine(config: ServeConfig) -> Iterator[Counted]:
    engine = Engine(config, metrics=RecordedCache())
    try:
        yield Counted(engine)
    finally:
        engine.batcher.close()


@pytest.fixture
def cached(model_dir: Path) -> Iterator[Counted]:
    yield from counted_engine(demo_config(model_dir, response_cache_mb="1"))


PIRATE = CompletionRequest("the cat looks at", "pirate", max_tokens=24)
REQUESTS = {
    "lora adapter": PIRATE,
    "prefix adapter": CompletionRequest("a dog", "oracle", max_tokens=16),
    "base model": CompletionRequest("the river", max_tokens=16),
    "seeded sampling": CompletionRequest("a dog", "robot", max_tokens=16, temperature=0.9, top_k=50, seed=7),
    "chat messages": CompletionRequest(
        "", "knight", max_tokens=16, messages=json.dumps([{"role": "user", "content": "hi"}])
    ),
}


@pytest.mark.parametrize("request_", REQUESTS.values(), ids=REQUESTS.keys())
def test_a_repeat_is_answered_from_the_cache_exactly_without_running_the_model(
    cached: Counted, engine: Engine, request_: CompletionRequest, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(cached.engine.tokenizer, "chat_template", CHAT_TEMPLATE)
    monkeypatch.setattr(engine.tokenizer, "chat_template", CHAT_TEMPLATE)
    label = request_.adapter_id or BASE_LABEL
    computed, passes = cached.ask(request_)
    assert isinstance(computed, Completion) and passes > 0
    assert cached.metrics.events == {("miss", label): 1}
    repeat, passes = cached.ask(request_)
    assert repeat == computed, "text, token count, finish reason and adapter_version label all equal"
    assert passes == 0
    assert cached.metrics.events == {("miss", label): 1, ("hit", label): 1}
    (uncached,) = engine.complete([request_])  # the session's engine: settings as shipped, cache off
    assert uncached == computed


def test_every_setting_that_changes_the_answer_misses(cached: Counted) -> None:
    sampled = dataclasses.replace(PIRATE, temperature=0.8, seed=1)
    cached.ask(PIRATE)
    cached.ask(sampled)
    variants = {
        "prompt": dataclasses.replace(PIRATE, text="the cat looks at "),
        "adapter": dataclasses.replace(PIRATE, adapter_id="robot"),
        "base model": dataclasses.replace(PIRATE, adapter_id=""),
        "max_tokens": dataclasses.replace(PIRATE, max_tokens=23),
        "stop": dataclasses.replace(PIRATE, stop=("gold",)),
        "ignore_eos": dataclasses.replace(PIRATE, ignore_eos=True),
        "temperature": dataclasses.replace(sampled, temperature=0.7),
        "top_p": dataclasses.replace(sampled, top_p=0.9),
        "top_k": dataclasses.replace(sampled, top_k=5),
        "seed": dataclasses.replace(sampled, seed=2),
    }
    for name, variant in variants.items():
        answer, passes = cached.ask(variant)
        assert isinstance(answer, Completion) and passes > 0, f"{name}: answered from the cache"
    misses = sum(n for (event, _), n in cached.metrics.events.items() if event == "miss")
    assert misses == 2 + len(variants) and not any(event == "hit" for event, _ in cached.metrics.events)
    # A greedy request draws nothing, so its sampling knobs cannot change its answer: they share it.
    greedy_with_knobs = dataclasses.replace(PIRATE, top_p=0.5, top_k=3, seed=99)
    assert cached.ask(greedy_with_knobs) == (cached.ask(PIRATE)[0], 0)


def test_the_key_covers_every_request_and_row_setting() -> None:
    """A tripwire: a new generation setting must join response_cache.request_digest (then update this list)."""
    assert [f.name for f in dataclasses.fields(CompletionRequest)] == [
        *("text", "adapter_id", "max_tokens", "temperature", "top_p", "top_k", "seed", "ignore_eos", "stop"),
        "messages",
    ]
    keyed = {"prompt_ids", "max_new_tokens", "sampling", "ignore_eos", "should_stop"}  # should_stop: the stops
    not_served = {"keep_logits", "keep_prompt_logits"}  # rows that ask for logits never use the cache
    assert {f.name for f in dataclasses.fields(GenerationRow)} == keyed | not_served | {"adapter"}
    assert [f.name for f in dataclasses.fields(SamplingParams)] == ["temperature", "top_p", "top_k", "seed"]


@pytest.fixture
def repository(model_dir: Path, tmp_path: Path) -> Path:
    root = tmp_path / "adapters"
    shutil.copytree(model_dir / "adapters" / "pirate" / "1", root / "pirate" / "1")
    return root


def publish(model_dir: Path, repository: Path, source_id: str, version: int) -> None:
    shutil.copytree(model_dir / "adapters" / source_id / "1", repository / "pirate" / str(version))


def test_a_hot_swap_makes_the_next_repeat_miss_and_answer_with_the_new_version(
    model_dir: Path, repository: Path
) -> None:
    for cached in counted_engine(demo_config(model_dir, adapter_repository=str(repository), response_cache_mb="1")):
        watcher = AdapterWatcher(cached.engine, interval=0)
        first, _ = cached.ask(PIRATE)
        assert first.adapter_version == "pirate@1" and DEMO_PHRASES["pirate"] in first.text
        assert cached.ask(PIRATE) == (first, 0)

        publish(model_dir, repository, "robot", 2)
        watcher.poll_once()
        swapped, passes = cached.ask(PIRATE)
        assert passes > 0 and swapped.adapter_version == "pirate@2" and DEMO_PHRASES["robot"] in swapped.text
        assert cached.ask(PIRATE) == (swapped, 0)

        # Version 3 ships version 1's files again: same content, so its answer is known; the label is of now.
        publish(model_dir, repository, "pirate", 3)
        watcher.poll_once()
        assert cached.ask(PIRATE) == (dataclasses.replace(first, adapter_version="pirate@3"), 0)
        assert cached.metrics.events == {("miss", "pirate"): 2, ("hit", "pirate"): 3}


def test_unseeded_sampling_and_streams_never_use_the_cache(cached: Counted) -> None:
    unseeded = dataclasses.replace(PIRATE, temperature=0.8)
    for _ in range(2):
        answer, passes = cached.ask(unseeded)
        assert isinstance(answer, Completion) and passes > 0
    for _ in range(2):
        done = threading.Event()
        pieces: list[str] = []
        before = cached.forward_passes
        cached.engine.batcher.submit(Work(PIRATE, on_done=lambda _, d=done: d.set(), on_text=pieces.append))
        assert done.wait(30) and pieces and cached.forward_passes > before
    assert len(cached.engine.batcher.response_cache) == 0
    assert not cached.metrics.events and not cached.metrics.nbytes
    answer, passes = cached.ask(PIRATE)  # the streamed greedy request was not stored either
    assert passes > 0 and cached.metrics.events == {("miss", "pirate"): 1}


def test_the_cache_is_off_by_default(model_dir: Path, engine: Engine) -> None:
    assert ServeConfig.model_fields["response_cache_mb"].default == 0
    assert read_model_config(model_dir).response_cache_mb == 0  # the shipped config.pbtxt
    assert engine.batcher.response_cache is None
    for counted in counted_engine(demo_config(model_dir)):
        first, _ = counted.ask(PIRATE)
        again, passes = counted.ask(PIRATE)
        assert again == first and passes > 0 and not counted.metrics.events


def test_limits_apply_to_cached_answers(model_dir: Path) -> None:
    limits = '{"pirate": {"rate_per_second": 0.001, "burst": 2}}'
    config = demo_config(model_dir, response_cache_mb="1", adapter_limit_overrides=limits)
    for cached in counted_engine(config):
        computed, _ = cached.ask(PIRATE)
        assert cached.ask(PIRATE) == (computed, 0)
        refused, _ = cached.ask(PIRATE)
        assert isinstance(refused, OverLimitError)
        assert cached.engine.batcher.admission.inflight("pirate") == 0


def test_stored_bytes_stay_within_the_bound_evicting_the_least_recently_used(model_dir: Path, engine: Engine) -> None:
    prompts = ["a dog", "the river", "the cat looks at", "my friend writes about"]
    requests = [CompletionRequest(prompt, "pirate", max_tokens=16) for prompt in prompts]
    sizes = [len(a.text.encode()) + 64 + 32 + ENTRY_OVERHEAD_BYTES for a in engine.complete(requests)]
    room = sum(sorted(sizes)[1:])  # any three answers fit, all four do not
    for cached in counted_engine(demo_config(model_dir, response_cache_mb=str(room / 2**20))):
        cache = cached.engine.batcher.response_cache
        for request in requests[:3]:
            cached.ask(request)
        assert len(cache) == 3
        assert cached.ask(requests[0])[1] == 0  # touched: now the most recently used
        cached.ask(requests[3])  # evicts requests[1], the least recently used
        assert cache.nbytes <= cache.max_bytes == room and cached.metrics.nbytes[-1] == cache.nbytes
        assert [cached.ask(r)[1] == 0 for r in (requests[0], requests[2], requests[3])] == [True] * 3
        assert cached.ask(requests[1])[1] > 0


def test_response_cache_bounds_orders_and_never_waits() -> None:
    def key(n: int) -> bytes:
        return hashlib.sha256(bytes([n])).digest()

    answer = CachedAnswer("x" * 100, 5, "length")
    entry = 100 + 64 + 32 + ENTRY_OVERHEAD_BYTES
    cache = ResponseCache(max_bytes=3 * entry)
    for n in range(3):
        assert cache.put("a" * 64, key(n), answer)
    assert cache.get("a" * 64, key(0)) == answer and cache.get("b" * 64, key(0)) is None
    assert cache.put("a" * 64, key(3), answer)
    assert [cache.get("a" * 64, key(n)) is not None for n in range(4)] == [True, False, True, True]
    assert (len(cache), cache.nbytes) == (3, 3 * entry)
    assert not cache.put("a" * 64, key(9), CachedAnswer("x" * 4 * entry, 5, "length")), "larger than the cache"
    with cache._lock:  # a lookup holds the lock: the batching loop's store gives up instead of waiting
        assert not cache.put("a" * 64, key(4), answer)
    assert cache.get("a" * 64, key(4)) is None and cache.nbytes == 3 * entry
