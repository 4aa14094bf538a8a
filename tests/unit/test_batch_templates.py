"""Batches over one list of distinct adapters share one template (batched_layers._MaskTemplate): a new
arrangement of rows makes only its masks and scaling vectors, and every row still equals the row alone."""

from __future__ import annotations

import pytest
import torch

from peftserve import batched_layers
from peftserve.adapter_weights import AdapterWeights, ModuleDelta
from peftserve.shared_shrink import SiblingPart
from tests.unit.test_shared_shrink import IN, OUT, SIBLINGS, Block, layers_for


def adapter(seed: int, rank: int, modules: tuple[str, ...], *, scaled: bool = False) -> AdapterWeights:
    """LoRA pairs on ``modules``; ``scaled``: an output scale beside each pair too (DoRA's form)."""
    generator = torch.Generator().manual_seed(seed)
    parts = {}
    for name in modules:
        fan_in, fan_out = (OUT, IN) if name == "o" else (IN, OUT)
        scale = torch.rand(fan_out, generator=generator) + 0.5 if scaled else None
        parts[name] = ModuleDelta(
            lora_a=torch.randn(fan_in, rank, generator=generator),
            lora_b=torch.randn(rank, fan_out, generator=generator),
            out_scale=scale,
        )
    return AdapterWeights("LORA", parts)


EVERYWHERE = (*SIBLINGS, "o")
FIRST, SECOND, THIRD = adapter(1, 4, EVERYWHERE), adapter(2, 8, ("q", "v")), adapter(3, 4, ("q", "o"), scaled=True)


def alone(block: Block, x: torch.Tensor, row_adapter: AdapterWeights | None) -> torch.Tensor:
    """One row by the definition: each layer ``(W x + x A B) * out_scale`` with the row's own adapter."""

    def layer(name: str, inputs: torch.Tensor) -> torch.Tensor:
        out = inputs @ getattr(block, name).base.weight.T
        delta = row_adapter.modules.get(name) if row_adapter else None
        if delta is None:
            return out
        out = out + inputs @ delta.lora_a @ delta.lora_b
        return out if delta.out_scale is None else out * delta.out_scale

    return layer("o", layer("q", x) + layer("k", x) + layer("v", x))


ARRANGEMENTS = [
    [FIRST, FIRST, SECOND, THIRD],
    [None, FIRST, SECOND, SECOND, SECOND, THIRD, THIRD],
    [FIRST, SECOND, FIRST, THIRD, SECOND],  # rows apart: masks serve any order
    [FIRST, *[SECOND] * 12, THIRD],  # a packed pass: one adapter's prompt chunk beside decoding rows
]


@pytest.mark.parametrize("tokens", [1, 3], ids=["one token per row", "several tokens per row"])
def test_every_arrangement_over_one_template_equals_each_row_alone(
    tokens: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    torch.manual_seed(0)
    block = Block()
    layers = layers_for(block)
    built = []
    module_deltas = batched_layers._BatchLayout.module_deltas
    monkeypatch.setattr(
        batched_layers._BatchLayout, "module_deltas", lambda *args: built.append(1) or module_deltas(*args)
    )
    inputs = [torch.randn(len(rows), tokens, IN) for rows in ARRANGEMENTS]
    with torch.inference_mode():
        batches = [layers.deltas(rows) for rows in ARRANGEMENTS]
        assert len(built) == len(EVERYWHERE)  # the template's groups, once: no arrangement builds its own
        for _ in range(2):  # in turn, twice: each install binds its own masks and vectors into the template
            for rows, batch, x in zip(ARRANGEMENTS, batches, inputs, strict=True):
                batch.install()
                expected = torch.stack([alone(block, x[i], row_adapter) for i, row_adapter in enumerate(rows)])
                torch.testing.assert_close(block(x), expected, rtol=1e-5, atol=1e-4)
    template = batches[0].template
    assert template is not None and all(batch.template is template for batch in batches)
    groups = template.per_module["q"].low_rank
    assert len(groups) == 1 and isinstance(groups[0], SiblingPart)  # q, k, v share one shrink from the start


def test_a_template_goes_with_an_adapter_that_leaves_the_cache() -> None:
    layers = layers_for(Block())
    layers.deltas([FIRST, SECOND])
    kept = layers.deltas([FIRST, THIRD])
    assert len(layers.templates) == 2
    layers.forget(SECOND)
    assert len(layers.templates) == 1 and layers.deltas([FIRST, THIRD, THIRD]).template is kept.template


def test_adapters_masked_pairs_would_not_serve_are_built_per_layout(monkeypatch: pytest.MonkeyPatch) -> None:
    """Above the masked pairs' column cap (or where their wasted columns cost more than the ops they save)."""
    monkeypatch.setattr(batched_layers, "_MASKED_MAX_RANK", 8)
    torch.manual_seed(0)
    block = Block()
    layers = layers_for(block)
    rows = [FIRST, SECOND, SECOND, THIRD]
    batch = layers.deltas(rows)
    assert batch.template is None and layers.deltas([FIRST, SECOND]).template is None
    x = torch.randn(len(rows), 1, IN)
    with torch.inference_mode():
        batch.install()
        expected = torch.stack([alone(block, x[i], row_adapter) for i, row_adapter in enumerate(rows)])
        torch.testing.assert_close(block(x), expected, rtol=1e-5, atol=1e-4)
