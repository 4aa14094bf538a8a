"""Continuous batching: rows that join a running batch get their solo logits; streaming, stop, cancel."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
import torch

from peftserve.continuous import ContinuousBatcher, Work
from peftserve.engine import Engine
from peftserve.errors import CancelledError
from peftserve.generation import ActiveRow, RunningBatch
from peftserve.requests import Completion, CompletionRequest
from tests.conftest import DEMO_PHRASES, demo_config

# Every adapter family joins: low-rank (LoRA, DoRA), IA3, prefix tuning, prompt tuning.
JOINERS = [("robot", "a dog"), ("poet", "the river"), ("oracle", "my friend writes about"), ("chef", "the cat")]


@pytest.fixture(scope="module")
def engine(model_dir: Path) -> Engine:
    return Engine(demo_config(model_dir))


def row_for(engine: Engine, adapter_id: str, prompt: str, max_tokens: int):
    row, version = engine.prepare(CompletionRequest(prompt, adapter_id, max_tokens=max_tokens, ignore_eos=True))
    row.adapter = engine.prepare_version(version)[1] if version else None
    return row


def test_rows_joining_a_running_batch_get_their_solo_logits(engine: Engine) -> None:
    first = ActiveRow(row_for(engine, "pirate", "the cat looks at", 20))
    joiners = [ActiveRow(row_for(engine, a, p, 12)) for a, p in JOINERS]
    late = ActiveRow(row_for(engine, "", "a dog", 6))
    batch = RunningBatch(engine.generator, keep_logits=True)
    with engine.lock:
        batch.join([first])
        for _ in range(3):
            batch.step()
        batch.join(joiners)  # shorter prompts, other adapters, prefixes and virtual tokens
        for _ in range(4):
            batch.step()
        batch.join([late])
        while len(batch):
            batch.step()
        batch.close()
    for entry in [first, *joiners, late]:
        (solo,) = engine.generator.generate([entry.row], keep_logits=True)
        assert entry.result.token_ids == solo.token_ids
        assert len(entry.result.step_logits) == len(solo.step_logits)
        for mixed, alone in zip(entry.result.step_logits, solo.step_logits, strict=True):
            torch.testing.assert_close(mixed, alone, atol=1e-4, rtol=1e-4)


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
    batcher = ContinuousBatcher(engine)
    try:
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
    finally:
        batcher.close()


def test_cancelled_request_stops_and_its_slot_serves_the_next_at_once(engine: Engine) -> None:
    batcher = ContinuousBatcher(engine, max_rows=1)  # one slot: the next request needs the cancelled one's
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
    small = Engine(demo_config(model_dir, max_loaded_adapters="2"))
    batcher = ContinuousBatcher(small, max_rows=8)  # more running rows than the cache holds adapters
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


def test_a_request_whose_prefill_fails_fails_alone(engine: Engine, monkeypatch) -> None:
    real_prefill = engine.generator._prefill_inputs
    poison = engine.tokenizer("zebra zebra").input_ids

    def prefill(rows):
        if any(row.prompt_ids == poison for row in rows):
            raise RuntimeError("simulated kernel failure")
        return real_prefill(rows)

    monkeypatch.setattr(engine.generator, "_prefill_inputs", prefill)
    batcher = ContinuousBatcher(engine)
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
