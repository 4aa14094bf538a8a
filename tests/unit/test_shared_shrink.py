"""Sibling layers (one input, like q/k/v) sharing one low-rank shrink: every row equals the row alone."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from peftserve import batched_layers
from peftserve.adapter_weights import AdapterWeights, ModuleDelta
from peftserve.batched_layers import AdapterLayers, BatchDeltas
from peftserve.shared_shrink import SiblingPart

IN, OUT = 16, 24
SIBLINGS = ("q", "k", "v")


class Block(nn.Module):
    """Three projections of one input (siblings), then one of their sum (not a sibling)."""

    def __init__(self) -> None:
        super().__init__()
        self.q, self.k, self.v = (nn.Linear(IN, OUT, bias=False) for _ in range(3))
        self.o = nn.Linear(OUT, IN, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.o(self.q(x) + self.k(x) + self.v(x))


def adapter(seed: int, rank: int, modules: tuple[str, ...] = (*SIBLINGS, "o"), **scales) -> AdapterWeights:
    generator = torch.Generator().manual_seed(seed)
    parts = {}
    for name in modules:
        fan_in, fan_out = (OUT, IN) if name == "o" else (IN, OUT)
        parts[name] = ModuleDelta(
            lora_a=torch.randn(fan_in, rank, generator=generator),
            lora_b=torch.randn(rank, fan_out, generator=generator),
            **scales,
        )
    return AdapterWeights("LORA", parts)


def layers_for(block: Block) -> AdapterLayers:
    layers = AdapterLayers(block, probe=lambda: block(torch.zeros(1, 1, IN)))
    layers.wrap(["q", "k", "v", "o"])
    return layers


def alone(block: Block, x: torch.Tensor, row_adapter: AdapterWeights | None) -> torch.Tensor:
    """One row by the definition: each layer ``W x + x A B`` with the row's own pair."""

    def layer(name: str, inputs: torch.Tensor) -> torch.Tensor:
        out = inputs @ getattr(block, name).base.weight.T
        delta = row_adapter.modules.get(name) if row_adapter else None
        return out if delta is None else out + inputs @ delta.lora_a @ delta.lora_b

    return layer("o", layer("q", x) + layer("k", x) + layer("v", x))


many = [adapter(seed, 4) for seed in range(6)]
CASES = {
    "one adapter, every row": [many[0]] * 4,
    "one adapter over some rows, beside base rows": [None, many[0], many[0], None],
    "a few adapters interleaved (masked pairs)": [many[0], many[1], many[0], many[2], None],
    "many adapters in equal runs (stacked in place)": [many[0], many[0], many[1], many[1], many[2], many[2]],
    "many adapters, rows apart (stacked, indexed: each layer alone)": [*many, many[0], many[3]],
    "an adapter on q and v only, beside one on all": [adapter(7, 4, ("q", "v")), many[0], many[0]],
    "ranks 4 and 8": [many[0], adapter(8, 8), many[1], adapter(8, 8)],
}


@pytest.mark.parametrize("masked", [False, True], ids=["grouped", "masked where it fits"])
@pytest.mark.parametrize("rows", CASES.values(), ids=CASES.keys())
def test_siblings_sharing_a_shrink_equal_each_row_alone(
    rows: list[AdapterWeights | None], masked: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(batched_layers, "_OP_MACS", 1 << 40 if masked else 0)
    torch.manual_seed(0)
    block = Block()
    layers = layers_for(block)
    assert layers.siblings == [list(SIBLINGS)]
    x = torch.randn(len(rows), 3, IN)
    with torch.inference_mode():
        expected = torch.stack([alone(block, x[i], row_adapter) for i, row_adapter in enumerate(rows)])
        batch = BatchDeltas(layers, rows)
        batch.share_siblings()
        batch.install()
        batched = block(x)
    torch.testing.assert_close(batched, expected, rtol=1e-5, atol=1e-4)
    assert not any(isinstance(group, SiblingPart) for group in batch.per_module["o"].low_rank)


def test_the_shrink_runs_once_for_all_siblings(monkeypatch: pytest.MonkeyPatch) -> None:
    block = Block()
    layers = layers_for(block)
    batch = BatchDeltas(layers, [many[0], many[1], many[0]])
    batch.install()
    assert not any(isinstance(group, SiblingPart) for group in layers.wrapped["q"].rows.low_rank)
    batch.share_siblings()  # the batch's second pass: its layers now share
    for name in SIBLINGS:
        (group,) = layers.wrapped[name].rows.low_rank
        assert isinstance(group, SiblingPart)
    shrinks = []
    matmul = torch.matmul
    monkeypatch.setattr(torch, "matmul", lambda *args: shrinks.append(args[1].shape) or matmul(*args))
    with torch.inference_mode():
        block(torch.randn(3, 2, IN))
        packed = torch.randn(1, 3, IN)  # a packed pass: each layer sees a reshaped view of its input
        block(packed)
    assert shrinks.count((IN, 3 * 2 * 4)) == 2  # q, k and v: one shrink of 3 x two adapters' rank 4 per pass


def test_siblings_are_what_the_probe_calls_on_one_tensor() -> None:
    class Shared(nn.Module):
        """a and b read one input, c reads another; d is called twice (shared weights)."""

        def __init__(self) -> None:
            super().__init__()
            self.a, self.b, self.c, self.d = (nn.Linear(IN, IN) for _ in range(4))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = self.a(x) + self.b(x)
            return self.d(self.d(y) + self.c(y + 1))

    model = Shared()
    layers = AdapterLayers(model, probe=lambda: model(torch.zeros(1, IN)))
    layers.wrap(["a", "b", "c", "d"])
    assert layers.siblings == [["a", "b"]]
    assert not any(layer._forward_pre_hooks for layer in layers.wrapped.values())  # the trace ended with the probe


def test_a_probe_that_fails_leaves_every_layer_alone_and_answers_right() -> None:
    block = Block()

    def probe() -> None:
        raise RuntimeError("this model needs more inputs")

    layers = AdapterLayers(block, probe=probe)
    layers.wrap(["q", "k", "v", "o"])
    assert layers.siblings == []
    rows = [many[0], many[1], many[0]]
    x = torch.randn(3, 2, IN)
    with torch.inference_mode():
        expected = torch.stack([alone(block, x[i], row) for i, row in enumerate(rows)])
        batch = BatchDeltas(layers, rows)
        batch.share_siblings()
        batch.install()
        torch.testing.assert_close(block(x), expected, rtol=1e-5, atol=1e-4)


def test_wrapping_more_layers_mid_batch_learns_siblings_and_keeps_the_batch() -> None:
    block = Block()
    layers = AdapterLayers(block, probe=lambda: block(torch.zeros(1, 1, IN)))
    layers.wrap(["q", "o"])
    rows = [adapter(9, 4, ("q", "o")), None]
    BatchDeltas(layers, rows).install()  # the engine leaves a batch installed between passes
    installed = layers.wrapped["q"].rows
    layers.wrap(["k", "v"])  # a new adapter targets more layers: their siblings were learned at the start
    assert layers.siblings == [list(SIBLINGS)]
    assert layers.wrapped["q"].rows is installed
