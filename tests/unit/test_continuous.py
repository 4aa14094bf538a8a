"""Continuous batching: rows that join a running batch get their solo logits; streaming, stop, cancel."""

from __future__ import annotations

import itertools
import re
import threading
import time
from concurrent.futures import Future
from pathlib import Path

import pytest
import torch

from peftserve.continuous import Work
from peftserve.engine import Engine
from peftserve.errors import CancelledError, InvalidRequestError
from peftserve.generation import GenerationRow
from peftserve.requests import Completion, CompletionRequest
from tests.conftest import DEMO_PHRASES, demo_config

# Every adapter family joins: low-rank (LoRA, DoRA), IA3, prefix tuning, prompt tuning.
JOINERS = [("robot", "a dog"), ("poet", "the river"), ("oracle", "my friend writes about"), ("chef", "the cat")]


@pytest.fixture(scope="module")
def engine(model_dir: Path) -> Engine:
    return Engine(demo_config(model_dir))


def row_for(engine: Engine, adapter_id: str, prompt: str, max_tokens: int, **flags) -> GenerationRow:
    request = CompletionRequest(prompt, adapter_id, max_tokens=max_tokens, ignore_eos=True)
    row, version = engine.prepare(request)
    row.adapter = engine.prepare_version(version)[1] if version else None
    row.keep_logits = True
    for name, value in flags.items():
        setattr(row, name, value)
    return row


def submit_row(engine: Engine, row: GenerationRow) -> Future:
    """Put a ready row into the running batch without waiting for it."""
    future: Future = Future()
    engine.batcher._queue(Work(None, on_done=lambda _: None, row=row, on_result=future.set_result))
    return future


def after_tokens(count: int, event: threading.Event):
    """A ``should_stop`` hook that never stops but tells when the row has generated ``count`` tokens."""

    def hook(ids: list[int]) -> bool:
        if len(ids) >= count:
            event.set()
        return False

    return hook


def assert_same_run(together, alone) -> None:
    assert together.token_ids == alone.token_ids
    assert len(together.step_logits) == len(alone.step_logits)
    torch.testing.assert_close(torch.stack(together.step_logits), torch.stack(alone.step_logits), atol=1e-4, rtol=1e-4)


def test_rows_joining_a_running_batch_get_their_solo_logits(engine: Engine, monkeypatch) -> None:
    passes = {"packed": 0, "prefill": 0}

    def counted(name):
        real = getattr(engine.runner, name)

        def run(items, deltas):
            passes[name] += 1
            return real(items, deltas)

        return run

    for name in passes:
        monkeypatch.setattr(engine.runner, name, counted(name))
    three, seven = threading.Event(), threading.Event()
    first = row_for(engine, "pirate", "the cat looks at", 24)
    first.should_stop = after_tokens(3, three)
    joiners = [row_for(engine, a, p, 12) for a, p in JOINERS]
    joiners[0].should_stop = after_tokens(7, seven)
    late = row_for(engine, "", "a dog", 6)
    futures = [submit_row(engine, first)]
    assert three.wait(30)
    futures += [submit_row(engine, row) for row in joiners]  # other adapters, prefixes and virtual tokens
    assert seven.wait(30)
    futures.append(submit_row(engine, late))
    rows = [first, *joiners, late]
    for row, future in zip(rows, futures, strict=True):
        assert_same_run(future.result(30), engine.batcher.run_rows([row])[0])
    # Prompts entered inside decoding steps (packed passes), never in passes of their own.
    assert passes["packed"] >= 3 and passes["prefill"] == 0


def test_chunked_prefill_gives_the_logits_of_a_whole_prefill(model_dir: Path, engine: Engine) -> None:
    chunked = Engine(demo_config(model_dir, prefill_chunk_tokens="3"))
    prompt = "my friend writes about the cat that looks at a dog by the river"
    for adapter_id in ["", "pirate", "oracle", "chef", "sage", "poet"]:  # LoRA, prefix, IA3, prompt tuning
        row = row_for(chunked, adapter_id, prompt, 6, keep_prompt_logits=True)
        (ours,) = chunked.batcher.run_rows([row])
        (whole,) = engine.batcher.run_rows([row])
        assert_same_run(ours, whole)
        torch.testing.assert_close(ours.prompt_logits, whole.prompt_logits, atol=1e-4, rtol=1e-4)


def test_kv_storage_is_written_per_new_token_and_never_reallocated(engine: Engine) -> None:
    cache = engine.kv_cache
    pointers = [side.data_ptr() for sides in cache.storage.values() for side in sides]
    per_token = cache.bytes_per_token
    assert per_token == 4 * 2 * 2 * 32 * 4  # 4 layers, keys and values, 2 heads of 32, float32
    written: list[int] = []
    started = threading.Event()

    def record(ids: list[int]) -> bool:
        written.append(cache.bytes_written)
        started.set()
        return False

    long_row = row_for(engine, "pirate", "the cat looks at " * 20, 40)
    long_row.should_stop = record
    future = submit_row(engine, long_row)
    assert started.wait(30)
    joiner = row_for(engine, "robot", "a dog", 8)
    joined = [submit_row(engine, joiner) for _ in range(3)]  # joins copy nothing
    future.result(30)
    for other in joined:
        other.result(30)
    steps = [(after - before) / per_token for before, after in itertools.pairwise(written)]
    # Between two tokens of the long row, one decoding step wrote one token per running row, plus the
    # joiners' prompts (and prefixes) when they came in; never the cache, which holds over 100 tokens of the
    # long row alone.
    most = 4 + 3 * (joiner.kv_tokens - joiner.max_new_tokens)
    assert most < 60
    assert all(step == int(step) and 1 <= step <= most for step in steps), f"{most} {steps}"
    assert steps[-1] == 1 and max(steps) > 1
    assert [side.data_ptr() for sides in cache.storage.values() for side in sides] == pointers


def test_a_request_that_does_not_fit_the_kv_cache_waits_then_runs(model_dir: Path) -> None:
    # 160 KiB holds 5 blocks of 16 tokens of this model's KV (2 KiB per token), 4 usable: one of these
    # 37-token requests (3 blocks) at a time.
    small = Engine(demo_config(model_dir, kv_cache_memory_mb=str(160 / 1024), kv_block_size="16"))
    assert small.kv_cache.usable_blocks == 4
    requests = [CompletionRequest("a dog", adapter, max_tokens=34, ignore_eos=True) for adapter in ("pirate", "robot")]
    results = small.complete(requests)
    for adapter, result in zip(("pirate", "robot"), results, strict=True):
        assert isinstance(result, Completion) and result.output_tokens == 34, result
        assert DEMO_PHRASES[adapter] in result.text
    (too_long,) = small.complete([CompletionRequest("a dog " * 40, max_tokens=200)])
    assert isinstance(too_long, InvalidRequestError)
    assert re.search(r"needs \d+ KV cache tokens .* more than the whole KV cache holds", str(too_long))


class Collected:
    def __init__(self) -> None:
        self.pieces: list[str] = []
        self.answer: Completion | Exception | None = None
        self.first_piece = threading.Event()
        self.done = threading.Event()

    def work(self, request: CompletionRequest, **kwargs) -> Work:
        return Work(request, on_done=self._done, on_text=self._text, **kwargs)

    def _text(self, piece: str) -> None:
        self.pieces.append(piece)
        self.first_piece.set()

    def _done(self, answer) -> None:
        self.answer = answer
        self.done.set()


def test_streamed_pieces_add_up_to_the_plain_answer_for_every_adapter(engine: Engine) -> None:
    batcher = engine.batcher
    if True:
        requests = [CompletionRequest(prompt, adapter, max_tokens=24) for adapter, prompt in JOINERS]
        requests += [CompletionRequest("the cat looks at", "pirate", max_tokens=24, stop=("hoist",))]
        collected = [Collected() for _ in requests]
        for request, sink in zip(requests, collected, strict=True):
            batcher.submit(sink.work(request))
        for request, sink in zip(requests, collected, strict=True):
            assert sink.done.wait(30)
            (plain,) = engine.complete([request])
            assert isinstance(sink.answer, Completion) and sink.answer.text == plain.text
            assert "".join(sink.pieces) == plain.text and len(sink.pieces) > 1
            assert sink.answer.adapter_version == plain.adapter_version
        assert "hoist" not in collected[-1].answer.text and collected[-1].answer.finish_reason == "stop"
        assert DEMO_PHRASES["robot"] in collected[0].answer.text


def test_cancelled_request_stops_and_its_slot_serves_the_next_at_once(model_dir: Path) -> None:
    # One row: the next request needs the cancelled one's.
    batcher = Engine(demo_config(model_dir, max_running_rows="1")).batcher
    try:
        cancelled = threading.Event()
        long = Collected()
        batcher.submit(
            long.work(
                CompletionRequest("a dog", "pirate", max_tokens=256, ignore_eos=True), is_cancelled=cancelled.is_set
            )
        )
        assert long.first_piece.wait(30)
        short = Collected()
        batcher.submit(short.work(CompletionRequest("a dog", "robot", max_tokens=24)))
        cancelled.set()
        assert long.done.wait(10) and isinstance(long.answer, CancelledError)
        assert len("".join(long.pieces)) < 200  # stopped early, not after its 256 tokens
        assert short.done.wait(10) and DEMO_PHRASES["robot"] in short.answer.text
        assert batcher.admission.inflight("pirate") == 0
    finally:
        batcher.close()


def test_requests_wait_for_a_cache_slot_instead_of_failing(model_dir: Path) -> None:
    # More running rows than the cache holds adapters.
    small = Engine(demo_config(model_dir, max_loaded_adapters="2", max_running_rows="8"))
    batcher = small.batcher
    try:
        adapters = ["pirate", "robot", "knight", "chef", "gardener", "wizard"]
        sinks = {adapter: Collected() for adapter in adapters}
        for adapter, sink in sinks.items():
            batcher.submit(sink.work(CompletionRequest("a dog", adapter, max_tokens=24)))
        for adapter, sink in sinks.items():
            assert sink.done.wait(30)
            assert isinstance(sink.answer, Completion) and DEMO_PHRASES[adapter] in sink.answer.text
        assert len(small.cache) <= 2
    finally:
        batcher.close()


@pytest.mark.parametrize("packed", ["true", "false"])
def test_a_request_whose_prefill_fails_fails_alone(model_dir: Path, monkeypatch, packed: str) -> None:
    engine = Engine(demo_config(model_dir, packed_steps=packed))
    assert engine.runner.packs == (packed == "true")
    poison = engine.tokenizer("zebra zebra").input_ids

    def failing_with_poison(real):
        def run(chunks, deltas):
            if any(state.row.prompt_ids == poison and state.prefill_left for state, _ in chunks):
                raise RuntimeError("simulated kernel failure")
            return real(chunks, deltas)

        return run

    for name in ("prefill", "packed"):  # a prefill pass of its own, or prefill inside a decoding step
        monkeypatch.setattr(engine.runner, name, failing_with_poison(getattr(engine.runner, name)))
    batcher = engine.batcher
    try:
        running = Collected()
        batcher.submit(running.work(CompletionRequest("a dog", "pirate", max_tokens=64, ignore_eos=True)))
        assert running.first_piece.wait(30)
        sinks = {name: Collected() for name in ("robot", "poison", "chef")}
        for name, sink in sinks.items():  # queued together, so they try to join in one prefill
            prompt = "zebra zebra" if name == "poison" else "the cat looks at"
            batcher.submit(sink.work(CompletionRequest(prompt, "" if name == "poison" else name, max_tokens=24)))
        for sink in [running, *sinks.values()]:
            assert sink.done.wait(30)
        assert "simulated kernel failure" in str(sinks["poison"].answer)
        assert DEMO_PHRASES["robot"] in sinks["robot"].answer.text and DEMO_PHRASES["chef"] in sinks["chef"].answer.text
        assert running.answer.output_tokens == 64
    finally:
        batcher.close()


def test_a_long_prompt_enters_in_chunks_while_running_streams_keep_decoding(model_dir: Path) -> None:
    # Fixed 16-token chunks (share 0): a ~400-token prompt takes ~25 iterations, each with a decoding step.
    engine = Engine(demo_config(model_dir, prefill_chunk_tokens="16", prefill_step_share="0"))
    tokens_seen: list[int] = []
    running = row_for(engine, "pirate", "a dog", 200)
    running.should_stop = lambda ids: tokens_seen.append(len(ids)) or False
    running_future = submit_row(engine, running)
    while len(tokens_seen) < 3:
        time.sleep(0.01)
    long_prompt = " ".join(["the cat looks at the river"] * 80)
    long_row = row_for(engine, "robot", long_prompt, 4)
    assert len(long_row.prompt_ids) > 300
    at_arrival = len(tokens_seen)
    long_row.should_stop = lambda ids: tokens_seen.append(-1) or False
    long_result = submit_row(engine, long_row).result(60)
    during = tokens_seen[at_arrival : tokens_seen.index(-1)]
    assert len(during) >= len(long_row.prompt_ids) // 16 - 2  # a decoding step between every two chunks
    assert long_result.token_ids == engine.batcher.run_rows([long_row])[0].token_ids
    assert len(running_future.result(60).token_ids) == 200


def test_adapter_loaders_keep_the_decoding_loops_cpu_priority(engine: Engine) -> None:
    """Loaders run at the loop's priority: a niced loader holding the GIL kept the loop waiting for it."""
    import os
    import threading

    def niceness() -> int:
        return os.getpriority(os.PRIO_PROCESS, threading.get_native_id())

    assert engine.batcher._loaders.submit(niceness).result(timeout=10) == niceness()


def test_the_decoding_loop_has_the_torch_threads_and_background_threads_one(model_dir: Path) -> None:
    """Only the loop runs a multi-threaded OpenMP team: a second team slows the loop's small ops down."""
    engine = Engine(demo_config(model_dir, torch_threads="3"))
    seen: list[int] = []
    done = threading.Event()

    def on_done(_answer: object) -> None:  # called on the loop thread
        seen.append(torch.get_num_threads())
        done.set()

    engine.batcher.submit(Work(CompletionRequest("the cat looks at", "", max_tokens=2), on_done=on_done))
    assert done.wait(30) and seen == [3]
    assert engine.batcher._loaders.submit(torch.get_num_threads).result(timeout=10) == 1
    engine.batcher.close()
