"""Decoding steps that read the paged KV cache in place, through transformers' attention interface.

By default every layer of every step gathers each row's keys and values out of the block pool into a
dense tensor for sdpa (:meth:`PagedKVCache.update`): per step, a copy of the whole cache. On a GPU at 32
rows of ~768 tokens of a Llama-3-8B that is ~3 GiB written and read again per step, on top of the ~3 GiB
the attention itself must read. With in-place reads a decoding step's layer writes its new keys and values
into their slots and hands the block tables to the attention function registered here under
:data:`ATTENTION_NAME`, which runs a kernel that reads the blocks where they are
(:mod:`peftserve.paged_attention_triton`). Every other pass (prompt chunks, packed passes) still gets the
gathered keys and a 4-D mask and goes to transformers' sdpa unchanged.

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
class InPlaceRead:
    """What one layer's ``update`` hands its attention function: the layer's block pool and the tables."""

    key_states: torch.Tensor  # the new keys the layer passed to ``update``: identifies the hand-over
    keys: torch.Tensor  # (slots, kv_heads, head_dim), the layer's whole pool
    values: torch.Tensor
    tables: DecodeTables


_handed = threading.local()


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
    """transformers' attention-function signature: in-place reads for a handed-over decoding layer, sdpa
    for everything else. Returns ``(rows, query_length, heads, head_dim)`` as sdpa does."""
    read = _take(key)
    if read is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    unsupported = {name for name in ("softcap", "s_aux") if kwargs.get(name) is not None}
    if unsupported or query.shape[2] != 1:
        raise NotImplementedError(f"in-place paged attention takes one query token and no {sorted(unsupported)}")
    from peftserve.paged_attention_triton import choose_splits, paged_decode_attention  # triton: only here

    rows, heads, _, head_dim = query.shape
    scale, tables = kwargs.get("scaling"), read.tables
    window = int(kwargs.get("sliding_window") or 0)
    longest = min(tables.longest, window) if window else tables.longest
    out = paged_decode_attention(
        query[:, :, 0],
        read.keys,
        read.values,
        tables.block_table,
        tables.lengths,
        cache_block=tables.cache_block,
        scale=head_dim**-0.5 if scale is None else float(scale),
        window=window,
        splits=choose_splits(rows, read.keys.shape[1], longest, query.device),
    )
    return out.view(rows, 1, heads, head_dim), None


def register() -> None:
    """Make :data:`ATTENTION_NAME` an attention implementation models can be set to (idempotent); its masks
    are sdpa's, for the passes it hands to sdpa."""
    AttentionInterface.register(ATTENTION_NAME, paged_attention)
    AttentionMaskInterface.register(ATTENTION_NAME, sdpa_mask)
