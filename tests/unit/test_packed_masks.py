"""Masks of packed passes: who sees whom, per attention kind, and which models get no packed pass."""

from __future__ import annotations

import torch
from transformers import LlamaConfig, MistralConfig, Qwen2Config

from peftserve.kv_cache import LayerShape, PagedKVCache
from peftserve.packed_masks import packed_mask_builder


def cache() -> PagedKVCache:
    shapes = {0: LayerShape((1, 2), (1, 2))}
    return PagedKVCache(
        layer_shapes=shapes, num_blocks=8, block_size=4, dtype=torch.float32, device=torch.device("cpu")
    )


def with_attention(config, implementation: str):
    config._attn_implementation = implementation
    return config


def test_a_packed_plan_lets_each_token_see_its_own_sequence_up_to_itself() -> None:
    kv = cache()
    kv.reserve(7, 8)
    kv.reserve(9, 8)
    kv.plan([(7, 3)], 3)  # sequence 7 holds 3 tokens already
    layout = kv.plan_packed([(7, 1), (9, 2)])  # its next token, and sequence 9's first two
    assert layout.query_owner.tolist() == [0, 1, 1]
    assert layout.query_position.tolist() == [3, 0, 1]
    assert layout.key_owner.tolist() == [0, 0, 0, 0, 1, 1]
    assert layout.key_position.tolist() == [0, 1, 2, 3, 0, 1]
    expected = [
        [1, 1, 1, 1, 0, 0],
        [0, 0, 0, 0, 1, 0],
        [0, 0, 0, 0, 1, 1],
    ]
    assert layout.allowed()[0, 0].int().tolist() == expected
    windowed = layout.allowed(2)[0, 0].int().tolist()  # the last two positions, itself included
    assert windowed == [[0, 0, 1, 1, 0, 0], [0, 0, 0, 0, 1, 0], [0, 0, 0, 0, 1, 1]]
    assert kv.length(7) == 4 and kv.length(9) == 2
    kv.rewind([(7, 1), (9, 2)])
    assert kv.length(7) == 3 and kv.length(9) == 0


def test_the_mask_form_follows_the_attention_kinds_of_the_config() -> None:
    kv = cache()
    kv.reserve(1, 12)
    layout = kv.plan_packed([(1, 10)])
    causal = layout.allowed()
    llama = packed_mask_builder(with_attention(LlamaConfig(), "sdpa"), torch.float32)
    assert torch.equal(llama(layout), causal)
    mistral = packed_mask_builder(with_attention(MistralConfig(sliding_window=4), "sdpa"), torch.float32)
    assert torch.equal(mistral(layout), layout.allowed(4)) and not torch.equal(layout.allowed(4), causal)
    hybrid_config = Qwen2Config(
        num_hidden_layers=2,
        use_sliding_window=True,
        sliding_window=4,
        layer_types=["sliding_attention", "full_attention"],
    )
    masks = packed_mask_builder(with_attention(hybrid_config, "sdpa"), torch.float32)(layout)
    assert torch.equal(masks["sliding_attention"], layout.allowed(4)) and torch.equal(masks["full_attention"], causal)
    no_window = Qwen2Config(num_hidden_layers=2)  # a window in the config, switched off
    assert torch.equal(packed_mask_builder(with_attention(no_window, "sdpa"), torch.float32)(layout), causal)
    eager = packed_mask_builder(with_attention(LlamaConfig(), "eager"), torch.bfloat16)(layout)
    assert eager.dtype == torch.bfloat16
    assert torch.equal(eager == 0, causal) and (eager[~causal] == torch.finfo(torch.bfloat16).min).all()


def test_attention_a_dense_mask_cannot_describe_gets_no_packed_pass() -> None:
    assert packed_mask_builder(with_attention(LlamaConfig(), "flash_attention_2"), torch.float16) is None
    chunked = LlamaConfig(num_hidden_layers=2)
    chunked.layer_types = ["chunked_attention", "full_attention"]
    assert packed_mask_builder(with_attention(chunked, "sdpa"), torch.float32) is None
