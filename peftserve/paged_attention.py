"""Forward passes that read the paged KV cache in place, through transformers' attention interface.

By default every layer of every pass gathers each row's keys and values out of the block pool into a
dense tensor for sdpa (:meth:`PagedKVCache.update`): per step, a copy of the whole cache, and for a packed
pass a mask of every new token against every row's keys. On a GPU at 32 rows of ~768 tokens of a
Llama-3-8B that copy is ~3 GiB written and read again per step, on top of the ~3 GiB the attention itself
must read. With in-place reads (``kv_reads``) a layer writes its new keys and values into their slots and
hands the block tables to the attention function registered here under :data:`ATTENTION_NAME`, which runs
a kernel that reads the blocks where they are (:mod:`peftserve.paged_attention_triton`): one for decoding
passes (a query token per row), one for packed passes (prompt chunks and decoding rows, causal per row).
Those passes build no mask either: the kernels know each token's row and position. A pass the kernels do
not serve (a right-aligned prefill pass, where packing is off) gets the gathered keys, its mask, and sdpa.

The hand-over goes through a per-thread slot rather than the model's keyword arguments: not every
architecture passes those down to its attention function, while every one calls the cache's ``update``
right before it. The attention function checks that the keys it was given are the very tensor the cache
saw, so a model that transformed them in between fails the engine's startup check (which then keeps
gathered reads) instead of attending to the wrong keys.

Only for models whose attention implementation is sdpa: other implementations' masks and kernels differ.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Any

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

ATTENTION_NAME = "peftserve_paged"


@dataclass(frozen=True)
class DecodeTables:
    """Where each row of a decoding pass reads: its blocks in order and its length (new token included)."""

    block_table: torch.Tensor  # (rows, max_blocks) int32
    lengths: torch.Tensor  # (rows,) int32
    cache_block: int  # tokens per block
    longest: int  # the largest of ``lengths``, known on the host (reading it back would sync the device)


@dataclass(frozen=True)
class PackedTables:
    """Where each token of a packed pass reads: its row's blocks, through tiles of consecutive tokens of one
    row (:func:`packed_tiles`)."""

    block_table: torch.Tensor  # (rows, max_blocks) int32
    tiles: torch.Tensor  # (tiles, 4) int32: row, first token, tokens, position of the first
    block_m: int  # tokens per tile
    cache_block: int


@dataclass(frozen=True)
class InPlaceRead:
    """What one layer's ``update`` hands its attention function: the layer's block pool and the tables."""

    key_states: torch.Tensor  # the new keys the layer passed to ``update``: identifies the hand-over
    keys: torch.Tensor  # (slots, kv_heads, head_dim), the layer's whole pool
    values: torch.Tensor
    tables: DecodeTables | PackedTables


_handed = threading.local()


def reading_in_place(on: bool) -> None:
    """Called by the cache when it plans a pass: whether the pass's layers will hand their reads over (its
    masks are then not built)."""
    _handed.in_place = on


def hand_over(read: InPlaceRead | None) -> None:
    """Called by the cache's ``update`` of every layer (None where it returned gathered keys, so nothing
    stale from a failed pass outlives it); the next attention call on this thread takes it."""
    _handed.read = read


def _take(key: torch.Tensor) -> InPlaceRead | None:
    read = getattr(_handed, "read", None)
    _handed.read = None
    if read is None:
        return None
    if read.key_states is not key:
        raise RuntimeError("the attention layer was given other keys than it wrote to the cache")
    return read


def paged_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """transformers' attention-function signature: a kernel over the pool for a handed-over layer, sdpa for
    everything else. Returns ``(rows, query_length, heads, head_dim)`` as sdpa does."""
    read = _take(key)
    if read is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    unsupported = sorted(name for name in ("softcap", "s_aux") if kwargs.get(name) is not None)
    if unsupported:
        raise NotImplementedError(f"in-place paged attention takes no {unsupported}")
    from peftserve import paged_attention_triton as kernels  # triton: imported only where this runs

    rows, heads, query_length, head_dim = query.shape
    scale = kwargs.get("scaling")
    scale = head_dim**-0.5 if scale is None else float(scale)
    window = int(kwargs.get("sliding_window") or 0)
    tables = read.tables
    if isinstance(tables, PackedTables):
        out = kernels.paged_packed_attention(
            query[0].transpose(0, 1), read.keys, read.values, tables.block_table, tables.tiles,
            cache_block=tables.cache_block, block_m=tables.block_m, scale=scale, window=window,
        )  # fmt: skip
        return out[None], None
    if query_length != 1:
        raise NotImplementedError(f"a decoding pass has one query token per row, not {query_length}")
    longest = min(tables.longest, window) if window else tables.longest
    out = kernels.paged_decode_attention(
        query[:, :, 0], read.keys, read.values, tables.block_table, tables.lengths,
        cache_block=tables.cache_block, scale=scale, window=window,
        splits=kernels.choose_splits(rows, read.keys.shape[1], longest, query.device),
    )  # fmt: skip
    return out.view(rows, 1, heads, head_dim), None


def packed_tiles(runs: list[tuple[int, int, int]], block_m: int, device: torch.device) -> torch.Tensor:
    """The query tiles of a packed pass: ``runs`` = (row, tokens, position of its first token) per row, in
    the pass's order; each row's tokens are cut into tiles of up to ``block_m``. Returns (tiles, 4) int32:
    row, first token in the pass, tokens in the tile, position of the first."""
    tiles, offset = [], 0
    for row, tokens, first_position in runs:
        for start in range(0, tokens, block_m):
            tiles.append((row, offset + start, min(block_m, tokens - start), first_position + start))
        offset += tokens
    return torch.tensor(tiles, dtype=torch.int32).to(device)


def paged_mask(*args: Any, **kwargs: Any) -> torch.Tensor | None:
    """transformers' mask-function signature: none for a pass read in place, sdpa's for the others."""
    if getattr(_handed, "in_place", False):
        return None
    return sdpa_mask(*args, **kwargs)


def register() -> None:
    """Make :data:`ATTENTION_NAME` an attention implementation models can be set to (idempotent)."""
    AttentionInterface.register(ATTENTION_NAME, paged_attention)
    AttentionMaskInterface.register(ATTENTION_NAME, paged_mask)
