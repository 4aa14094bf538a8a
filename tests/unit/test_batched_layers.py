"""AdapterLinear called directly: every way rows are grouped equals each row computed alone.

Through the engine a failing forward pass is retried row by row, which keeps answers right and would
hide a broken grouping path as a slowdown; here each path must work in the one batched call.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from peftserve import batched_layers, lora_kernels
from peftserve.adapter_weights import AdapterWeights, ModuleDelta
from peftserve.batched_layers import (
    _MAX_SLICED_ADAPTERS,
    AdapterLayers,
    AdapterSegments,
    BatchDeltas,
    KroneckerRun,
    LowRankGroup,
    MaskedPairs,
)

IN, OUT, TOKENS = 24, 40, 3


def lora(rank: int, seed: int, **scales: torch.Tensor) -> AdapterWeights:
    generator = torch.Generator().manual_seed(seed)
    delta = ModuleDelta(
        lora_a=torch.randn(IN, rank, generator=generator), lora_b=torch.randn(rank, OUT, generator=generator), **scales
    )
    return AdapterWeights("LORA", {"proj": delta})


def ia3(seed: int) -> AdapterWeights:
    scale = torch.rand(OUT, generator=torch.Generator().manual_seed(seed)) + 0.5
    return AdapterWeights("IA3", {"proj": ModuleDelta(out_scale=scale, scales_bias=True)})


def solo(layer: nn.Linear, x: torch.Tensor, adapter: AdapterWeights | None, name: str = "proj") -> torch.Tensor:
    """One row by the definition: (W (x * in_scale) + x A B) * out_scale + bias * (out_scale if it scales the
    bias); an adapter without a part in ``name`` leaves the layer as it is."""
    delta = adapter.modules.get(name, ModuleDelta()) if adapter else ModuleDelta()
    out = (x if delta.in_scale is None else x * delta.in_scale) @ layer.weight.T
    if delta.lora_a is not None:
        out = out + x @ delta.lora_a @ delta.lora_b
    if delta.out_scale is not None:
        out = out * delta.out_scale
    bias = layer.bias * delta.out_scale if delta.scales_bias else layer.bias
    return out + bias


def run_batch(rows: list[AdapterWeights | None]) -> tuple[torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    model = nn.Sequential()
    model.add_module("proj", nn.Linear(IN, OUT))
    reference = model.proj
    layers = AdapterLayers(model)
    layers.wrap(["proj"])
    x = torch.randn(len(rows), TOKENS, IN)
    BatchDeltas(layers, rows).install()
    with torch.inference_mode():
        batched = model.proj(x)
        expected = torch.stack([solo(reference, x[i], adapter) for i, adapter in enumerate(rows)])
    return batched, expected


many = [lora(8, seed) for seed in range(_MAX_SLICED_ADAPTERS + 2)]
CASES = {
    "one adapter, every row": [many[0]] * 4,
    "one adapter, some rows": [None, many[0], many[0], None],
    "few adapters in runs": [many[0], many[0], many[1], many[2], many[2]],
    "many adapters, every row (stacked, no index)": many,
    "adapters in equal runs over every row (stacked, no index)": [many[0], many[0], many[1], many[1], many[2], many[2]],
    "adapters in equal runs beside base rows (stacked on a slice, no index)": [
        None,
        many[0],
        many[0],
        many[1],
        many[1],
        None,
    ],
    "adapters in unequal runs (stacked, padded)": [many[0], many[0], many[0], many[1], many[2], many[2]],
    "one adapter's rows apart (stacked, indexed)": [many[0], many[1], many[0], many[2]],
    "many adapters interleaved with base rows (stacked, indexed)": [None, *many[:3], None, *many[3:]],
    "many adapters in unequal runs beside base rows (padded)": [None, many[0], many[0], *many[1:], None],
    "two rank buckets": [lora(4, 10), lora(16, 11), lora(4, 10), lora(32, 12)],
    "ranks 8, 4 and 5 in one bucket over every row (stacked, zero-padded)": [
        lora(8, 30),
        lora(4, 31),
        lora(8, 32),
        lora(5, 33),
    ],
    "ranks 8 and 4 in one bucket, rows apart (padded, indexed)": [*many[:5], lora(4, 34), many[0]],
    "a packed pass: one adapter's prompt chunk beside decoding rows (peeled off the stack)": [
        *many[:3],
        *[many[3]] * 12,
        *many[4:],
        many[0],
    ],
    "two crowded adapters beside single rows (both peeled)": [*[many[0]] * 9, *many[1:4], *[many[4]] * 7, None],
    "low rank beside scales": [many[0], ia3(20), None, lora(8, 21, out_scale=torch.full((OUT,), 0.5))],
}


@pytest.fixture(params=["grouped", "masked where it fits"])
def masked_macs(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> int:
    """Every case runs grouped (no masked pairs) and with masked pairs allowed for any size."""
    limit = 0 if request.param == "grouped" else 1 << 40
    monkeypatch.setattr(batched_layers, "_OP_MACS", limit)
    return limit


@pytest.fixture(params=["index_put_", "index_add_"])
def scatter_add(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Indexed cases add their rows back both ways (these small deltas take index_put_ unless forced)."""
    if request.param == "index_add_":
        monkeypatch.setattr(lora_kernels, "_INDEX_ADD_FROM", 0)
    return request.param


@pytest.mark.parametrize("rows", CASES.values(), ids=CASES.keys())
def test_every_grouping_equals_each_row_alone(
    rows: list[AdapterWeights | None], masked_macs: int, scatter_add: str
) -> None:
    batched, expected = run_batch(rows)
    torch.testing.assert_close(batched, expected, rtol=1e-5, atol=1e-4)


def lokr(seed: int) -> AdapterWeights:
    """A LoKr delta ``kron(W1 (5, 4), W2 (8, 6))`` on the (24 -> 40) layer, as a pair and as its factors."""
    generator = torch.Generator().manual_seed(seed)
    w1, w2 = torch.randn(5, 4, generator=generator), torch.randn(8, 6, generator=generator)
    delta = torch.kron(w1, w2)  # (out, in)
    pair_a, pair_b = torch.eye(IN), delta.t().contiguous()  # an exact pair of rank IN, only for the reference
    return AdapterWeights("LOKR", {"proj": ModuleDelta(lora_a=pair_a, lora_b=pair_b, kronecker=(w1, w2.t()))})


KRONECKER_CASES = {
    "alone": [lokr(50)] * 3,
    "beside other adapters and base rows": [None, lokr(50), lokr(50), many[0], lokr(51), many[1], None],
}


@pytest.mark.parametrize("rows", KRONECKER_CASES.values(), ids=KRONECKER_CASES.keys())
def test_lokr_rows_through_their_kronecker_factors_equal_each_row_alone(
    rows: list[AdapterWeights | None], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(batched_layers, "_STRUCTURED_MIN_READ", 0)
    assert any(isinstance(group, KroneckerRun) for group in low_rank_groups(rows))
    batched, expected = run_batch(rows)
    torch.testing.assert_close(batched, expected, rtol=1e-5, atol=1e-4)


def test_a_small_lokr_pair_stays_a_pair() -> None:
    assert not any(isinstance(group, KroneckerRun) for group in low_rank_groups([lokr(50)] * 2))


def low_rank_groups(rows: list[AdapterWeights | None]) -> list:
    model = nn.Sequential()
    model.add_module("proj", nn.Linear(IN, OUT))
    layers = AdapterLayers(model)
    layers.wrap(["proj"])
    return BatchDeltas(layers, rows).per_module["proj"].low_rank


def test_masked_pairs_take_interleaved_rows_of_a_few_small_adapters() -> None:
    (masked,) = low_rank_groups([many[0], many[1], None, many[0], many[2]])
    assert isinstance(masked, MaskedPairs) and masked.a.shape == (IN, 24) and masked.mask.shape == (5, 1, 24)
    assert masked.mask[2].sum() == 0 and masked.mask[3].sum() == 8


def test_rows_already_in_their_stacked_layout_stay_stacked() -> None:
    (stacked,) = low_rank_groups([many[0], many[0], many[1], many[1]])
    assert isinstance(stacked, AdapterSegments) and stacked.take is None and stacked.span is None
    (on_a_slice,) = low_rank_groups([None, many[0], many[0], many[1], many[1], None])
    assert isinstance(on_a_slice, AdapterSegments) and on_a_slice.take is None and on_a_slice.span == slice(1, 5)


def test_masked_pairs_only_where_the_ops_saved_outweigh_the_columns_wasted(monkeypatch: pytest.MonkeyPatch) -> None:
    rows = [many[0], many[1], None, many[0], many[2]]  # grouped: four runs of rank 8, two ops each
    wasted = (len(rows) * 24 - 4 * 8) * (IN + OUT)  # every row computes 24 columns, four rows need 8 each
    saved_ops = 4 * 2 - 3
    monkeypatch.setattr(batched_layers, "_OP_MACS", -(-wasted // saved_ops))
    assert isinstance(low_rank_groups(rows)[0], MaskedPairs)
    monkeypatch.setattr(batched_layers, "_OP_MACS", -(-wasted // saved_ops) - 1)
    groups = low_rank_groups(rows)
    assert len(groups) == 4 and not any(isinstance(group, MaskedPairs) for group in groups)


def test_a_high_rank_adapter_stays_out_of_the_masked_pairs(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(batched_layers, "_OP_MACS", 1 << 40)
    high = lora(batched_layers._MASKED_MAX_RANK, 40)  # beside the others' 24 columns, over the cap
    groups = low_rank_groups([many[0], many[1], high, many[0], many[2], high])
    masked = [group for group in groups if isinstance(group, MaskedPairs)]
    assert len(masked) == 1 and masked[0].a.shape[1] == 24 and len(groups) == 3  # the high-rank rows: two runs


def test_a_crowded_adapter_is_sliced_instead_of_padding_the_stack(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(batched_layers, "_OP_MACS", 0)
    rows = [*many[:3], *[many[3]] * 12, *many[4:]]
    groups = low_rank_groups(rows)
    stacked = [group for group in groups if isinstance(group, AdapterSegments)]
    assert len(stacked) == 1 and stacked[0].a.shape[0] == len(many) - 1  # every adapter but the crowded one
    assert stacked[0].take is None or stacked[0].take.numel() < 2 * len(rows)
    (chunk,) = [group for group in groups if isinstance(group, LowRankGroup)]
    assert chunk.rows == slice(3, 15)


def test_every_modules_scaling_vectors_come_from_one_gather_and_each_row_gets_its_own() -> None:
    """IA3 input and output scales, output scales beside a pair (DoRA's form) and bias scales of two layers
    of different widths: one table for the whole batch, read by row once, each module viewing its columns;
    every row still equals its adapter's layers computed alone."""
    torch.manual_seed(0)
    model = nn.Sequential()
    model.add_module("up", nn.Linear(IN, OUT))
    model.add_module("down", nn.Linear(OUT, IN))
    generator = torch.Generator().manual_seed(7)

    def vector(width: int) -> torch.Tensor:
        return torch.rand(width, generator=generator) + 0.5

    scaled_input = AdapterWeights("IA3", {"down": ModuleDelta(in_scale=vector(OUT))})
    scaled_output = AdapterWeights(
        "IA3",
        {
            "up": ModuleDelta(out_scale=vector(OUT), scales_bias=True),
            "down": ModuleDelta(out_scale=vector(IN), scales_bias=True),
        },
    )
    pair = lora(4, 3).modules["proj"]
    dora_like = AdapterWeights(
        "LORA", {"up": ModuleDelta(lora_a=pair.lora_a, lora_b=pair.lora_b, out_scale=vector(OUT))}
    )
    rows = [scaled_input, None, scaled_output, dora_like, scaled_output]
    reference = {name: module for name, module in model.named_children()}
    layers = AdapterLayers(model)
    layers.wrap(["up", "down"])
    deltas = BatchDeltas(layers, rows)
    vectors = [
        vector
        for module in deltas.per_module.values()
        for vector in (module.in_scale, module.out_scale, module.bias_scale)
        if vector is not None
    ]
    assert len(vectors) == 5 and len({vector.untyped_storage().data_ptr() for vector in vectors}) == 1

    x = torch.randn(len(rows), TOKENS, IN)
    deltas.install()
    with torch.inference_mode():
        batched = model(x)
        expected = torch.stack(
            [solo(reference["down"], solo(reference["up"], x[i], a, "up"), a, "down") for i, a in enumerate(rows)]
        )
    torch.testing.assert_close(batched, expected, rtol=1e-5, atol=1e-4)
