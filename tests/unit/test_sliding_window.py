"""A sliding-window model (Mistral-style) stays exact after joins and chunked prefills.

The window is shorter than the sequences, so a cache or mask that forgets the window, or miscounts
positions after rows join and leave, gives different logits than the model's own full forward pass.
"""

from __future__ import annotations

import shutil
import threading
from pathlib import Path

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM, MistralConfig, Qwen2Config

from peftserve.config import ServeConfig
from peftserve.engine import Engine
from peftserve.generation import GenerationRow
from peftserve.requests import CompletionRequest
from tests.unit.test_continuous import after_tokens, submit_row

WINDOW = 6
PROMPTS = ["the cat looks at the river and a dog", "my friend writes about the quiet town by the tall tree", "a dog"]


def _save_tiny(config_class, model_dir: Path, directory: Path, **attention) -> Path:
    """A tiny random model of ``config_class`` with the demo's tokenizer and an empty adapter repository."""
    demo = model_dir / "base_model"
    vocab = AutoModelForCausalLM.from_pretrained(demo).config.vocab_size
    config = config_class(
        vocab_size=vocab,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        sliding_window=WINDOW,
        max_position_embeddings=256,
        **attention,
    )
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(directory)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(demo / name, directory / name)
    (directory / "adapters").mkdir()
    return directory


@pytest.fixture(scope="module")
def mistral_dir(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _save_tiny(MistralConfig, model_dir, tmp_path_factory.mktemp("mistral"))


@pytest.fixture(scope="module")
def hybrid_dir(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Sliding and full attention layers in one model: the packed pass needs a mask per layer kind."""
    layers = ["sliding_attention", "full_attention"]
    return _save_tiny(
        Qwen2Config, model_dir, tmp_path_factory.mktemp("hybrid"), use_sliding_window=True, layer_types=layers
    )


def reference_logits(model, row: GenerationRow, tokens: list[int]) -> torch.Tensor:
    """The model's own full forward pass over prompt + answer, at the positions that chose each token."""
    ids = torch.tensor([row.prompt_ids + tokens])
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0]
    start = len(row.prompt_ids) - 1
    return logits[start : start + len(tokens)]


@pytest.mark.parametrize("model", ["mistral", "hybrid"])
@pytest.mark.parametrize(("chunk", "packed"), [("0", "true"), ("4", "true"), ("4", "false")])
def test_sliding_window_rows_match_the_full_forward_after_joins(
    request: pytest.FixtureRequest, model: str, chunk: str, packed: str
) -> None:
    model_path = request.getfixturevalue(f"{model}_dir")
    engine = Engine(
        ServeConfig(
            base_model=str(model_path),
            adapter_repository=str(model_path / "adapters"),
            prefill_chunk_tokens=chunk,
            packed_steps=packed,
        )
    )
    assert engine.runner.packs == (packed == "true")
    reference = AutoModelForCausalLM.from_pretrained(model_path, attn_implementation="eager").eval()
    unwindowed_config = AutoConfig.from_pretrained(model_path)
    unwindowed_config.sliding_window = None
    if getattr(unwindowed_config, "layer_types", None):
        unwindowed_config.layer_types = ["full_attention"] * len(unwindowed_config.layer_types)
    unwindowed = AutoModelForCausalLM.from_pretrained(model_path, config=unwindowed_config).eval()
    assert reference.config.sliding_window == WINDOW
    rows = [GenerationRow(engine.tokenizer(p).input_ids, None, 14, ignore_eos=True, keep_logits=True) for p in PROMPTS]
    assert all(len(row.prompt_ids) + 14 > 2 * WINDOW for row in rows)
    started = threading.Event()
    rows[0].should_stop = after_tokens(5, started)
    futures = [submit_row(engine, rows[0])]
    assert started.wait(30)
    futures += [submit_row(engine, row) for row in rows[1:]]  # join mid-generation, then leave at different times
    for row, future in zip(rows, futures, strict=True):
        result = future.result(30)
        expected = reference_logits(reference, row, result.token_ids)
        torch.testing.assert_close(torch.stack(result.step_logits), expected, atol=1e-4, rtol=1e-4)
        # The window matters here: without it the same weights give other logits.
        assert (reference_logits(unwindowed, row, result.token_ids) - expected).abs().max() > 1e-2


def test_a_kv_cache_too_small_for_the_packing_check_keeps_separate_passes(mistral_dir: Path) -> None:
    # 2 usable blocks of 4 tokens: the check's two sequences (the window plus a few tokens, and 5) do not fit.
    engine = Engine(
        ServeConfig(
            base_model=str(mistral_dir),
            adapter_repository=str(mistral_dir / "adapters"),
            kv_block_size="4",
            kv_cache_memory_mb=str(3 * 4 * engine_token_bytes(mistral_dir) / 2**20),
            max_tokens_limit="4",
            default_max_tokens="4",
            max_prompt_tokens="4",
        )
    )
    assert engine.kv_cache.usable_blocks == 2 and not engine.runner.packs
    assert engine.kv_cache.free_blocks == 2  # the check gave back what it took
    (answer,) = engine.complete([CompletionRequest("a dog", max_tokens=2, ignore_eos=True)])
    assert answer.output_tokens == 2


def engine_token_bytes(model_path: Path) -> int:
    """KV bytes per token of the tiny test models: 2 layers, keys and values, 2 heads of 16, float32."""
    config = AutoConfig.from_pretrained(model_path)
    head_dim = config.hidden_size // config.num_attention_heads
    return config.num_hidden_layers * 2 * config.num_key_value_heads * head_dim * 4


def test_a_half_precision_model_passes_the_packing_check(mistral_dir: Path) -> None:
    engine = Engine(
        ServeConfig(base_model=str(mistral_dir), adapter_repository=str(mistral_dir / "adapters"), dtype="bfloat16")
    )
    assert next(engine.model.parameters()).dtype == torch.bfloat16 and engine.runner.packs
