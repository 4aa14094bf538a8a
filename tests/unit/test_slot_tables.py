"""Slot tables as a state machine (assign, release, reuse, capacity, bytes) and outputs built through them
equal to each token computed alone from its adapter's own tensors, on the torch backend and on the triton
kernels under the interpreter."""

from __future__ import annotations

import gc
import weakref
from collections.abc import Iterator

import pytest
import torch
from torch import nn

from peftserve.adapter_weights import AdapterWeights, ModuleDelta
from peftserve.errors import CacheFullError, ConfigError, UnsupportedAdapterError
from peftserve.lora_kernels import NO_SLOT, LoraKernels, TorchKernels
from peftserve.slot_tables import SlotTables, rank_bucket, slot_linear
from tests.interpreted_triton import InterpretedKernels, interpreter_process

IN, MID, OUT = 19, 27, 13  # odd sizes: no kernel block divides them


def model() -> nn.Module:
    torch.manual_seed(0)
    return nn.ModuleDict({"up": nn.Linear(IN, MID), "down": nn.Linear(MID, OUT, bias=False)})


def tables(capacity: dict[int, int] | None = None, scale_capacity: int = 3) -> SlotTables:
    return SlotTables(dict(model().items()), rank_capacity=capacity or {8: 3, 16: 2}, scale_capacity=scale_capacity)


def generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def lora_delta(features_in: int, features_out: int, rank: int, seed: int, **extra) -> ModuleDelta:
    g = generator(seed)
    a, b = torch.randn(features_in, rank, generator=g), torch.randn(rank, features_out, generator=g)
    return ModuleDelta(lora_a=a, lora_b=b, **extra)


def lora(rank: int, seed: int, *, down_rank: int | None = None) -> AdapterWeights:
    modules = {"up": lora_delta(IN, MID, rank, seed)}
    if down_rank is not None:
        modules["down"] = lora_delta(MID, OUT, down_rank, seed + 100)
    return AdapterWeights("LORA", modules)


def ia3(seed: int) -> AdapterWeights:
    """IA3: the output of ``up`` scaled with its bias, the input of ``down`` (a feed-forward module)."""
    g = generator(seed)
    return AdapterWeights(
        "IA3",
        {
            "up": ModuleDelta(out_scale=torch.rand(MID, generator=g) + 0.5, scales_bias=True),
            "down": ModuleDelta(in_scale=torch.rand(MID, generator=g) + 0.5),
        },
    )


def dora(rank: int, seed: int) -> AdapterWeights:
    """DoRA's runtime form: a low-rank pair and an output scale that leaves the bias alone."""
    scale = torch.rand(MID, generator=generator(seed + 1)) + 0.5
    return AdapterWeights("LORA", {"up": lora_delta(IN, MID, rank, seed, out_scale=scale)})


def one_token(layer: nn.Linear, x: torch.Tensor, delta: ModuleDelta | None) -> torch.Tensor:
    """The definition, from the adapter's own tensors: (W (x * in) + x A B) * out + bias * (out if IA3)."""
    delta = delta or ModuleDelta()
    out = (x if delta.in_scale is None else x * delta.in_scale) @ layer.weight.T
    if delta.lora_a is not None:
        out = out + x @ delta.lora_a @ delta.lora_b
    if delta.out_scale is not None:
        out = out * delta.out_scale
    if layer.bias is not None:
        out = out + (layer.bias * delta.out_scale if delta.scales_bias else layer.bias)
    return out


@pytest.fixture(scope="module")
def interpreted() -> Iterator[LoraKernels]:
    with interpreter_process() as process:
        yield InterpretedKernels(process)


def test_assign_release_and_reuse() -> None:
    slot_tables = tables()
    first, second, third = lora(8, 1), lora(4, 2), lora(16, 3)
    a, b = slot_tables.assign(first), slot_tables.assign(second)
    assert a.low_rank[8] != b.low_rank[8] and NO_SLOT not in (a.low_rank[8], b.low_rank[8])
    assert slot_tables.assign(first) is a  # idempotent
    assert slot_tables.assign(third).low_rank == {16: 1}

    slot_tables.release(first)
    assert slot_tables.slots_of(first) is None
    assert slot_tables.assign(lora(8, 4)).low_rank == a.low_rank  # the freed slot is reused
    slot_tables.release(first)  # releasing twice changes nothing


def test_a_reused_slot_holds_nothing_of_its_previous_adapter() -> None:
    """Release leaves a slot's values; the next adapter there overwrites them, and resets what it lacks: the
    columns beyond its rank, the modules it does not adapt, the scales it does not have."""
    slot_tables = tables({8: 1}, scale_capacity=1)
    rank_one_up = AdapterWeights("LORA", {"up": lora_delta(IN, MID, 1, 6)})
    dora_both = AdapterWeights(
        "LORA",
        {
            "up": lora_delta(IN, MID, 8, 5, out_scale=torch.rand(MID, generator=generator(7)) + 0.5),
            "down": ModuleDelta(in_scale=torch.rand(MID, generator=generator(8)) + 0.5),
        },
    )
    up_in_scaled = AdapterWeights("IA3", {"up": ModuleDelta(in_scale=torch.rand(IN, generator=generator(9)) + 0.5)})
    layers = model()
    x = {"up": torch.randn(2, IN, generator=generator(10)), "down": torch.randn(2, MID, generator=generator(11))}
    slot_tables.assign(dora_both)
    slot_tables.release(dora_both)
    for adapter in (rank_one_up, up_in_scaled):  # each in the slots dora_both left
        slot_tables.assign(adapter)
        batch = slot_tables.indices([adapter, None], 1)
        for name, layer in layers.items():
            out = slot_linear(x[name], layer.weight, layer.bias, slot_tables.modules[name], batch, TorchKernels())
            for row, used in enumerate((adapter, None)):
                expected = one_token(layer, x[name][row], used and used.modules.get(name))
                torch.testing.assert_close(out[row], expected)
        slot_tables.release(adapter)
    assert torch.equal(slot_tables.modules["up"].out_scale[1], torch.ones(MID))  # reset by up_in_scaled


def test_the_tables_keep_no_adapter_alive_and_free_the_slots_of_dropped_ones() -> None:
    """An adapter the cache has evicted must not live on in the slot tables (on a GPU its device memory would
    stay allocated, uncounted); its slots free up, and a new object at its address names nothing."""
    slot_tables = tables({8: 2})
    kept, dropped = lora(8, 1), lora(8, 2)
    slot_tables.assign(kept)
    slot_tables.assign(dropped)
    assert slot_tables.free_slots(8) == 0
    gone = weakref.ref(dropped)
    del dropped
    gc.collect()
    assert gone() is None
    slot_tables.release_dropped()
    assert slot_tables.free_slots(8) == 1 and slot_tables.slots_of(kept) is not None
    assert slot_tables.assign(lora(8, 3)).low_rank == {8: 2}


def test_ops_in_use_change_only_when_a_module_op_gains_its_first_adapter_or_loses_its_last() -> None:
    """What a CUDA graph's skipped ops depend on (peftserve.decode_graphs): not every assignment."""
    slot_tables = tables()
    first, second, scaled = lora(8, 1), lora(4, 2), ia3(3)
    slot_tables.assign(first)
    assert slot_tables.ops_in_use_changes == 1  # up's rank-8 pair
    slot_tables.assign(second)  # the same op of the same module: nothing changes
    slot_tables.release(first)
    assert slot_tables.ops_in_use_changes == 1
    slot_tables.assign(scaled)  # up's output scale and down's input scale
    assert slot_tables.ops_in_use_changes == 3
    slot_tables.release(second)
    slot_tables.release(scaled)
    assert slot_tables.ops_in_use_changes == 6


def test_a_full_bucket_refuses_with_a_clear_error_and_changes_nothing() -> None:
    slot_tables = tables({8: 1, 16: 1})
    held = lora(16, 1)  # the tables hold adapters weakly
    slot_tables.assign(held)
    before = slot_tables.modules["up"].a[8].clone()
    needs_both = lora(8, 2, down_rank=16)
    with pytest.raises(CacheFullError, match="all 1 slots of the rank bucket 16 are assigned"):
        slot_tables.assign(needs_both)
    assert slot_tables.slots_of(needs_both) is None
    assert torch.equal(slot_tables.modules["up"].a[8], before)
    assert slot_tables.assign(lora(8, 3)).low_rank == {8: 1}  # bucket 8 was not taken by the refusal

    scales = tables(scale_capacity=1)
    held_scales = ia3(4)
    scales.assign(held_scales)
    with pytest.raises(CacheFullError, match="scale tables"):
        scales.assign(dora(8, 5))


BAD_ADAPTERS = {
    "rank without bucket": (
        lambda: lora(20, 1),
        UnsupportedAdapterError,
        r"need rank buckets \[32\]; the slot tables have \[8, 16\]",
    ),
    "unknown module": (
        lambda: AdapterWeights("LORA", {"lm_head": lora_delta(IN, MID, 8, 1)}),
        UnsupportedAdapterError,
        r"modules \['lm_head'\]",
    ),
}


@pytest.mark.parametrize("case", BAD_ADAPTERS.values(), ids=BAD_ADAPTERS.keys())
def test_adapters_that_do_not_fit_are_refused(case) -> None:
    make, error, message = case
    with pytest.raises(error, match=message):
        tables().assign(make())


@pytest.mark.parametrize("capacity", [{12: 2}, {4: 1}, {8: 0}])
def test_bad_capacities_are_refused(capacity: dict[int, int]) -> None:
    with pytest.raises(ConfigError, match="rank buckets are powers of two from 8 with 1 or more slots"):
        tables(capacity)
    with pytest.raises(ConfigError, match="rank bucket 8 exists already"):
        tables({8: 1}).add_bucket(8, 2)


def test_bytes_are_every_stack_and_fixed_at_construction() -> None:
    slot_tables = tables({8: 3, 16: 2}, scale_capacity=3)
    element = torch.empty(0).element_size()
    expected = 0
    for features_in, features_out in ((IN, MID), (MID, OUT)):
        expected += (3 + 1) * 8 * (features_in + features_out) * element  # bucket 8, NO_SLOT included
        expected += (2 + 1) * 16 * (features_in + features_out) * element
        expected += (3 + 1) * (features_in + features_out) * element + (3 + 1)  # scale tables, bias flags
    assert slot_tables.nbytes == expected
    slot_tables.assign(dora(8, 1))
    assert slot_tables.nbytes == expected


def test_modules_and_buckets_added_later_get_their_stacks() -> None:
    layers = model()
    slot_tables = SlotTables({"up": layers["up"]}, rank_capacity={8: 2}, scale_capacity=1)
    first = slot_tables.assign(lora(8, 1))
    before = slot_tables.nbytes
    slot_tables.add_modules({"down": layers["down"]})
    slot_tables.add_bucket(32, 1)
    element = torch.empty(0).element_size()
    added = (2 + 1) * 8 * (MID + OUT) * element + 2 * (MID + OUT) * element + 2  # down: bucket 8 and scales
    added += (1 + 1) * 32 * (IN + MID + MID + OUT) * element  # bucket 32 in both modules
    assert slot_tables.nbytes == before + added
    assert not slot_tables.modules["down"].a[8][first.low_rank[8]].any()
    assert slot_tables.assign(lora(20, 2, down_rank=30)).low_rank == {32: 1}


def test_stacks_prepared_before_a_bucket_changed_get_it_when_taken_in() -> None:
    layers = model()
    slot_tables = SlotTables({"up": layers["up"]}, rank_capacity={8: 1}, scale_capacity=1)
    prepared = slot_tables.new_stacks({"up": layers["up"], "down": layers["down"]})
    assert list(prepared) == ["down"] and "down" not in slot_tables.modules  # allocated, not taken in yet
    slot_tables.grow_bucket(8, 3)  # meanwhile, a batch grew a bucket and added one
    slot_tables.add_bucket(16, 1)
    slot_tables.add_modules({"down": layers["down"]}, prepared)
    down = slot_tables.modules["down"]
    assert down.in_scale is prepared["down"].in_scale  # what was prepared is what serves
    assert {bucket: len(stack) for bucket, stack in down.a.items()} == {8: 4, 16: 2}
    assert slot_tables.assign(lora(8, 1, down_rank=16)).low_rank == {8: 1, 16: 1}


def test_ranks_share_buckets_and_one_adapter_can_span_two() -> None:
    assert [rank_bucket(rank) for rank in (1, 3, 8, 9, 16, 17, 64)] == [8, 8, 8, 16, 16, 32, 64]
    slot_tables = tables()
    spanning = slot_tables.assign(lora(3, 1, down_rank=12))
    assert set(spanning.low_rank) == {8, 16}
    up, down = slot_tables.modules["up"], slot_tables.modules["down"]
    assert not up.a[16][spanning.low_rank[16]].any()  # its other module's bucket is untouched here
    torch.testing.assert_close(
        down.a[16][spanning.low_rank[16], :, :12], lora(3, 1, down_rank=12).modules["down"].lora_a
    )
    assert not down.a[16][spanning.low_rank[16], :, 12:].any()  # zero padding


def test_indices_give_each_token_its_rows_slot() -> None:
    slot_tables = tables()
    first, second = lora(8, 1), ia3(2)
    a, b = slot_tables.assign(first), slot_tables.assign(second)
    batch = slot_tables.indices([first, None, second], [2, 1, 3])
    assert batch.low_rank[8].slots.tolist() == [a.low_rank[8]] * 2 + [NO_SLOT] * 4
    assert 16 not in batch.low_rank  # no row uses bucket 16
    assert batch.scale.slots.tolist() == [NO_SLOT] * 3 + [b.scale] * 3
    assert slot_tables.indices([first, first], 2).low_rank[8].tokens == 4
    with pytest.raises(KeyError, match="assign it first"):
        slot_tables.indices([lora(8, 3)], 1)


def run_through_tables(kernels: LoraKernels, rows: list[AdapterWeights | None], lengths: list[int]):
    """Every module's output per token through the tables, and the definition for the same tokens."""
    layers = model()
    slot_tables = SlotTables(dict(layers.items()), rank_capacity={8: 3, 16: 2, 32: 1}, scale_capacity=3)
    # A released adapter leaves no trace: its slot is reused below by one of lower rank.
    stale = lora(8, 99, down_rank=8)
    slot_tables.assign(stale)
    slot_tables.release(stale)
    for adapter in rows:
        if adapter is not None:
            slot_tables.assign(adapter)
    batch = slot_tables.indices(rows, lengths)
    token_rows = [row for row, length in enumerate(lengths) for _ in range(length)]
    results = {}
    for name, features_in in (("up", IN), ("down", MID)):
        layer = layers[name]
        x = torch.randn(len(token_rows), features_in, generator=generator(7))
        with torch.no_grad():
            got = slot_linear(x, layer.weight, layer.bias, slot_tables.modules[name], batch, kernels)
            expected = torch.stack(
                [
                    one_token(layer, x[token], rows[row].modules.get(name) if rows[row] else None)
                    for token, row in enumerate(token_rows)
                ]
            )
        results[name] = (got, expected)
    return results


BATCHES = {
    "one LoRA token": ([lora(3, 1)], [1]),
    "LoRA, IA3, DoRA and the base model, packed": (
        [lora(5, 1, down_rank=8), ia3(2), None, dora(8, 3), lora(12, 4), lora(32, 5, down_rank=2)],
        [3, 2, 1, 4, 1, 2],
    ),
    "base model only": ([None, None], [2, 1]),
}


@pytest.mark.parametrize("batch", BATCHES.values(), ids=BATCHES.keys())
def test_outputs_through_the_tables_equal_each_token_alone(batch) -> None:
    for got, expected in run_through_tables(TorchKernels(), *batch).values():
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("batch", BATCHES.values(), ids=BATCHES.keys())
def test_outputs_through_the_interpreted_kernels_equal_each_token_alone(interpreted: LoraKernels, batch) -> None:
    for got, expected in run_through_tables(interpreted, *batch).values():
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
