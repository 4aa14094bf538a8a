"""The engine against PEFT's own models, mixed batches against solo runs, and per-request errors."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM

from peftserve import batched_layers
from peftserve.engine import Engine
from peftserve.errors import AdapterNotFoundError, InvalidRequestError, PeftServeError
from peftserve.generation import GenerationRow
from peftserve.metrics import EngineMetrics
from peftserve.requests import Completion, CompletionRequest
from peftserve.shared_shrink import SiblingPart
from tests.conftest import DEMO_PHRASES, PROMPTS, STRONG_ADAPTERS, demo_config

ALL_ADAPTERS = list(DEMO_PHRASES)


def rows_for(
    engine: Engine, adapter_id: str, prompts: list[str], max_tokens: int = 16, **flags: bool
) -> list[GenerationRow]:
    rows = []
    for prompt in prompts:
        row, version = engine.prepare(CompletionRequest(prompt, adapter_id, max_tokens=max_tokens))
        row.adapter = engine.prepare_version(version)[1] if version else None
        for name, value in flags.items():
            setattr(row, name, value)
        rows.append(row)
    return rows


def prompt_logits(engine: Engine, rows: list[GenerationRow]) -> list[torch.Tensor]:
    for row in rows:
        row.keep_prompt_logits = True
    return [result.prompt_logits for result in engine.batcher.run_rows(rows)]


@pytest.fixture(scope="module")
def peft_reference(model_dir: Path):
    """PEFT's own model for an adapter id (one PeftModel per adapter: PEFT cannot mix types)."""
    models: dict[str, torch.nn.Module] = {}

    def get(adapter_id: str) -> torch.nn.Module:
        if adapter_id not in models:
            base = AutoModelForCausalLM.from_pretrained(model_dir / "base_model")
            model = PeftModel.from_pretrained(base, model_dir / "adapters" / adapter_id / "1") if adapter_id else base
            models[adapter_id] = model.eval()
        return models[adapter_id]

    return get


@pytest.mark.parametrize("adapter_id", ["", *ALL_ADAPTERS])
def test_logits_equal_peft_for_every_adapter_type(engine: Engine, peft_reference, adapter_id: str) -> None:
    rows = rows_for(engine, adapter_id, PROMPTS)
    ours = prompt_logits(engine, rows)
    for row, logits in zip(rows, ours, strict=True):
        input_ids = torch.tensor([row.prompt_ids])
        with torch.no_grad():
            reference = peft_reference(adapter_id)(input_ids=input_ids, attention_mask=torch.ones_like(input_ids))
        expected = reference.logits[0, -len(row.prompt_ids) :]
        torch.testing.assert_close(logits, expected, atol=1e-4, rtol=1e-4)


def test_lokr_through_its_kronecker_factors_equals_peft(
    engine: Engine, peft_reference, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The demo's LoKr pair is small enough to stay a pair; with the threshold at 0 its rows go through the
    Kronecker factors, here beside a LoRA's rows in one batch."""
    monkeypatch.setattr(batched_layers, "_STRUCTURED_MIN_READ", 0)
    calls = []
    monkeypatch.setattr(batched_layers.KroneckerRun, "add_to", spy(batched_layers.KroneckerRun.add_to, calls))
    adapter_ids = ["astronaut"] * len(PROMPTS) + ["pirate"] * 2
    rows = rows_for(engine, "astronaut", PROMPTS) + rows_for(engine, "pirate", PROMPTS[:2])
    for adapter_id, row, logits in zip(adapter_ids, rows, prompt_logits(engine, rows), strict=True):
        input_ids = torch.tensor([row.prompt_ids])
        with torch.no_grad():
            reference = peft_reference(adapter_id)(input_ids=input_ids, attention_mask=torch.ones_like(input_ids))
        torch.testing.assert_close(logits, reference.logits[0, -len(row.prompt_ids) :], atol=1e-4, rtol=1e-4)
    assert calls


def spy(function, calls: list):
    def wrapper(*args, **kwargs):
        calls.append(args)
        return function(*args, **kwargs)

    return wrapper


def test_adapters_change_the_logits_enough_to_be_told_apart(engine: Engine) -> None:
    """Guards the comparisons above and below: a wrong adapter would change logits far beyond tolerance."""
    last = {a: prompt_logits(engine, rows_for(engine, a, PROMPTS[:1]))[0][-1] for a in ["", *ALL_ADAPTERS]}
    names = list(last)
    for i, first in enumerate(names):
        for second in names[i + 1 :]:
            assert (last[first] - last[second]).abs().max() > 0.5, (first, second)


@pytest.mark.parametrize("adapter_id", STRONG_ADAPTERS)
def test_each_adapter_gives_its_trained_phrase(engine: Engine, adapter_id: str) -> None:
    results = engine.complete([CompletionRequest(prompt, adapter_id, max_tokens=24) for prompt in PROMPTS])
    for result in results:
        assert isinstance(result, Completion)
        assert DEMO_PHRASES[adapter_id] in result.text
        assert result.adapter_version == f"{adapter_id}@1"
        assert result.finish_reason == "stop"


def test_base_model_gives_none_of_the_phrases(engine: Engine) -> None:
    for result in engine.complete([CompletionRequest(prompt, max_tokens=24) for prompt in PROMPTS]):
        assert result.adapter_version == ""
        assert not any(phrase in result.text for phrase in DEMO_PHRASES.values())


def test_mixed_batch_equals_solo_runs_token_for_token_and_logit_for_logit(
    engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    shared = []  # decoding steps after a batch's first share the siblings' shrink (q/k/v, gate/up)
    monkeypatch.setattr(SiblingPart, "add_to", spy(SiblingPart.add_to, shared))
    rows = []
    for index, adapter_id in enumerate(["", *ALL_ADAPTERS] * 2):
        prompt = PROMPTS[index % len(PROMPTS)]
        rows += rows_for(engine, adapter_id, [prompt], max_tokens=4 + 3 * index, keep_logits=True)  # all differ
    mixed = engine.batcher.run_rows(rows)
    for row, together in zip(rows, mixed, strict=True):
        alone = engine.batcher.run_rows([row])[0]
        assert together.token_ids == alone.token_ids
        assert together.finish_reason == alone.finish_reason
        torch.testing.assert_close(
            torch.stack(together.step_logits), torch.stack(alone.step_logits), atol=1e-4, rtol=1e-4
        )
    assert shared


def test_max_tokens_bounds_the_output(engine: Engine) -> None:
    (result,) = engine.complete([CompletionRequest("the cat looks at", "pirate", max_tokens=3)])
    assert result.output_tokens == 3 and result.finish_reason == "length"
    assert result.text == " arr matey,"


def test_ignore_eos_generates_exactly_max_tokens(engine: Engine) -> None:
    stops, runs_on = engine.complete(
        [
            CompletionRequest("a dog", "robot", max_tokens=20),
            CompletionRequest("a dog", "robot", max_tokens=20, ignore_eos=True),
        ]
    )
    assert stops.finish_reason == "stop" and stops.output_tokens < 20
    assert runs_on.finish_reason == "length" and runs_on.output_tokens == 20
    assert runs_on.text.startswith(stops.text)


def test_empty_prompt_generates(engine: Engine) -> None:
    (result,) = engine.complete([CompletionRequest(b"", "robot", max_tokens=24)])
    assert isinstance(result, Completion) and result.output_tokens > 0


def test_seeded_sampling_is_reproducible_inside_any_batch(engine: Engine) -> None:
    request = CompletionRequest("a dog", "", max_tokens=12, temperature=1.5, top_k=50, top_p=0.95, seed=7)
    alone = engine.complete([request])[0].text
    in_batch = engine.complete([CompletionRequest("x", "chef"), request, CompletionRequest("y", "poet")])[1].text
    assert alone == in_batch
    others = {
        engine.complete([CompletionRequest("a dog", max_tokens=12, temperature=1.5, seed=s)])[0].text for s in range(5)
    }
    assert len(others) > 1, "different seeds should sample different continuations"


BAD_REQUESTS = [
    (
        CompletionRequest("hi", "no_such_adapter"),
        AdapterNotFoundError,
        "unknown adapter 'no_such_adapter'; available adapters: .*, pirate, ",
    ),
    (CompletionRequest("hi", "../pirate"), InvalidRequestError, "invalid adapter_id '../pirate'"),
    (CompletionRequest("hi", "/etc/passwd"), InvalidRequestError, "invalid adapter_id"),
    (CompletionRequest("hi", "x" * 10_000), InvalidRequestError, r"invalid adapter_id 'x{80}\.\.\.'"),
    (CompletionRequest("hi", max_tokens=0), InvalidRequestError, "max_tokens must be between 1 and 256"),
    (CompletionRequest("hi", max_tokens=-5), InvalidRequestError, "got -5"),
    (
        CompletionRequest("hi", max_tokens=257),
        InvalidRequestError,
        r"max_tokens must be between 1 and 256 \(max_tokens_limit\), got 257",
    ),
    (
        CompletionRequest("word " * 2000),
        InvalidRequestError,
        r"text_input has \d+ tokens, more than max_prompt_tokens \(1024\)",
    ),
    (CompletionRequest("x" * 70_000), InvalidRequestError, "more than max_prompt_bytes"),
    (CompletionRequest(b"\xff\xfe bad"), InvalidRequestError, "text_input is not valid UTF-8"),
    (CompletionRequest("hi", temperature=-1.0), InvalidRequestError, "temperature must be between 0 and 100"),
    (CompletionRequest("hi", temperature=float("nan")), InvalidRequestError, "temperature"),
    (CompletionRequest("hi", top_p=0.0), InvalidRequestError, r"top_p must be in \(0, 1\]"),
    (CompletionRequest("hi", top_k=-1), InvalidRequestError, "top_k must be >= 0"),
]


@pytest.mark.parametrize(("request_", "error", "message"), BAD_REQUESTS)
def test_bad_request_fails_alone_among_good_neighbours(engine: Engine, request_, error: type, message: str) -> None:
    good = CompletionRequest("the cat looks at", "pirate", max_tokens=24)
    results = engine.complete([good, request_, good])
    assert isinstance(results[1], error)
    assert results[1].__class__.triton_code == error.triton_code
    assert re.search(message, str(results[1])), str(results[1])
    for neighbour in (results[0], results[2]):
        assert isinstance(neighbour, Completion) and DEMO_PHRASES["pirate"] in neighbour.text


@pytest.mark.parametrize("stage", ["packed", "decode"])  # prefill passes of their own: test_continuous.py
def test_a_batch_that_crashes_is_retried_row_by_row(engine: Engine, monkeypatch: pytest.MonkeyPatch, stage) -> None:
    assert engine.runner.packs
    real = getattr(engine.runner, stage)
    poison = engine.tokenizer("poison").input_ids

    def failing(states, *args):
        rows = [state.row for state in (s[0] if isinstance(s, tuple) else s for s in states)]
        if any(row.prompt_ids == poison for row in rows):
            raise RuntimeError("simulated kernel failure")
        return real(states, *args)

    monkeypatch.setattr(engine.runner, stage, failing)
    results = engine.complete(
        [CompletionRequest("a dog", "robot"), CompletionRequest("poison"), CompletionRequest("a dog", "chef")]
    )
    assert isinstance(results[1], PeftServeError) and "simulated kernel failure" in str(results[1])
    assert DEMO_PHRASES["robot"] in results[0].text and DEMO_PHRASES["chef"] in results[2].text


def test_small_cache_evicts_and_still_answers_correctly(model_dir: Path) -> None:
    engine = Engine(demo_config(model_dir, max_loaded_adapters="2", preload="pirate"))
    for _ in range(2):
        for adapter_id in ["robot", "chef", "poet", "pirate"]:
            (result,) = engine.complete([CompletionRequest("my friend", adapter_id, max_tokens=24)])
            assert DEMO_PHRASES[adapter_id] in result.text
    assert len(engine.cache) == 2
    assert engine.cache.stats.evictions >= 4
    assert any(version.adapter_id == "pirate" for version in engine.cache._entries)  # pinned by preload


def test_requests_for_more_adapters_than_the_cache_holds_take_turns(model_dir: Path) -> None:
    engine = Engine(demo_config(model_dir, max_loaded_adapters="2"))
    adapters = ["robot", "chef", "poet"]
    results = engine.complete([CompletionRequest("a dog", a, max_tokens=24) for a in adapters])
    for adapter, result in zip(adapters, results, strict=True):
        assert isinstance(result, Completion) and DEMO_PHRASES[adapter] in result.text
    assert len(engine.cache) <= 2


class CacheReports(EngineMetrics):
    def __init__(self) -> None:
        self.reports: list[dict[str, int]] = []

    def cache_state(self, *, loaded: int, nbytes: int, by_adapter: dict[str, int]) -> None:
        assert loaded == len(by_adapter) and nbytes == sum(by_adapter.values())
        self.reports.append(dict(by_adapter))


def test_cache_state_is_published_when_it_changes_not_after_every_pass(model_dir: Path) -> None:
    # Under Triton each published gauge is a call into the server: the loop asks after every pass.
    metrics = CacheReports()
    engine = Engine(demo_config(model_dir, max_loaded_adapters="1"), metrics=metrics)
    assert metrics.reports == [{}]
    engine.complete([CompletionRequest("a dog", max_tokens=8)])
    assert metrics.reports == [{}]
    engine.complete([CompletionRequest("a dog", "robot", max_tokens=8)])
    assert [list(report) for report in metrics.reports] == [[], ["robot"]] and metrics.reports[1]["robot"] > 0
    engine.complete([CompletionRequest("a dog", "robot", max_tokens=8)])
    assert len(metrics.reports) == 2
    engine.complete([CompletionRequest("a dog", "chef", max_tokens=8)])  # evicts robot
    assert list(metrics.reports[-1]) == ["chef"]
