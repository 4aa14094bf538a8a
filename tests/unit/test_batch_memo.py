"""Recent batches found again by the adapter of each row: the same answers, bounded memory, no stale entry."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from peftserve.adapter_weights import AdapterWeights, ModuleDelta
from peftserve.batch_memo import BatchMemo
from peftserve.batched_layers import AdapterLayers, BatchDeltas
from peftserve.shared_shrink import SiblingPart

IN, OUT = 16, 24


class Block(nn.Module):
    """Two projections of one input (siblings, which share a shrink from a batch's second pass)."""

    def __init__(self) -> None:
        super().__init__()
        self.q, self.k = nn.Linear(IN, OUT, bias=False), nn.Linear(IN, OUT, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.q(x) * self.k(x)


def lora(seed: int, rank: int = 4) -> AdapterWeights:
    generator = torch.Generator().manual_seed(seed)
    return AdapterWeights(
        "LORA",
        {
            name: ModuleDelta(torch.randn(IN, rank, generator=generator), torch.randn(rank, OUT, generator=generator))
            for name in ("q", "k")
        },
    )


def wrapped(block: Block) -> AdapterLayers:
    layers = AdapterLayers(block, probe=lambda: block(torch.zeros(1, 1, IN)))
    layers.wrap(["q", "k"])
    return layers


def alone(block: Block, x: torch.Tensor, adapter: AdapterWeights | None) -> torch.Tensor:
    def layer(name: str) -> torch.Tensor:
        out = x @ getattr(block, name).base.weight.T
        delta = adapter.modules[name] if adapter else None
        return out if delta is None else out + x @ delta.lora_a @ delta.lora_b

    return layer("q") * layer("k")


def test_a_recent_batch_is_found_again_and_still_answers_each_row_right() -> None:
    torch.manual_seed(0)
    block = Block()
    layers = wrapped(block)
    first, second = lora(1), lora(2)
    rows = [first, first, second, None]
    x = torch.randn(len(rows), 3, IN)
    expected = torch.stack([alone(block, x[i], adapter) for i, adapter in enumerate(rows)])
    batch = layers.deltas(rows)
    with torch.inference_mode():
        for _ in range(3):  # its second pass shares the siblings' shrink, and a later batch runs in between
            assert layers.deltas(list(rows)) is batch
            batch.install()
            torch.testing.assert_close(block(x), expected, rtol=1e-5, atol=1e-4)
            layers.deltas([second, first, first, None]).install()
    assert any(isinstance(group, SiblingPart) for group in layers.wrapped["k"].rows.low_rank)
    assert layers.deltas([first, second, second, None]) is not batch  # another adapter in a row: another batch


def test_an_adapter_leaving_the_cache_takes_its_batches_with_it() -> None:
    layers = wrapped(Block())
    kept, leaving = lora(1), lora(2)
    with_it, without_it = layers.deltas([kept, leaving]), layers.deltas([kept])
    profiles = layers.profiles.find([kept])
    assert profiles is not None and layers.profiles.find([kept, leaving]) is not None
    layers.forget(leaving)
    assert layers.profiles.find([kept, leaving]) is None  # nor what each module needed of it
    assert layers.deltas([kept, leaving]) is not with_it
    assert layers.deltas([kept]) is without_it
    assert layers.profiles.find([kept]) is profiles


def test_wrapping_more_layers_starts_over() -> None:
    block = Block()
    layers = AdapterLayers(block)
    layers.wrap(["q"])
    adapter = AdapterWeights("LORA", {"q": lora(1).modules["q"]})
    before = layers.deltas([adapter])
    layers.wrap(["k"])
    assert layers.deltas([adapter]) is not before


def test_a_batch_counts_the_stacked_copies_it_holds() -> None:
    layers = wrapped(Block())
    adapters = [lora(seed) for seed in range(6)]
    assert BatchDeltas(layers, [adapters[0]] * 3).held_bytes == 0  # views of the adapter's own pair
    stacked = BatchDeltas(layers, [a for a in adapters for _ in range(2)])  # six adapters in runs: stacked
    pair_bytes = (IN + OUT) * 4 * 4  # one float32 pair of rank 4
    assert stacked.held_bytes == 2 * 6 * pair_bytes  # q and k, each of six pairs once


@dataclass
class Held:
    held_bytes: int


def test_the_memo_keeps_recent_batches_within_its_count_and_bytes() -> None:
    memo: BatchMemo[Held] = BatchMemo(max_entries=3, max_bytes=100)
    adapters = [object() for _ in range(5)]
    batches = [memo.add([adapter], Held(40)) for adapter in adapters[:3]]  # 120 bytes: over, but kept
    assert len(memo) == 3
    assert memo.find([adapters[0]]) is batches[0]  # now the most recent
    memo.add([adapters[3]], Held(0))  # room for one: the least recent (adapters[1]) goes, then bytes fit
    assert len(memo) == 3 and memo.find([adapters[1]]) is None
    assert memo.find([adapters[0]]) is batches[0] and memo.find([adapters[2]]) is batches[2]
    assert (memo.hits, memo.misses) == (3, 1)
    big = memo.add([adapters[4]], Held(1000))  # the newest stays whatever its size: it is in flight
    assert memo.find([adapters[4]]) is big
    memo.add([None], Held(0))
    assert len(memo) == 1  # everything older went to bring the bytes back under the bound
