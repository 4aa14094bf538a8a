"""The triton-lang kernel of decode attention over the paged KV cache, reading the blocks where they are.

A decoding step has one query token per row. Gathering each row's keys and values into a dense tensor for
a standard attention kernel copies the whole cache every step (per layer: read it, write the copy, read the
copy again). Here each program reads its row's keys and values straight from the cache's block pool
through the row's block table, in tiles of ``BLOCK_N`` positions, with an online softmax (the running
maximum and sum of flash attention), so the cache is read once per step and nothing is written but the
output. One program per (row, query head); grouped-query heads share their key/value head's tiles in cache.

Semantics are those of causal attention for the last position of each row: a row of ``length`` tokens
attends to positions ``0 .. length - 1``, or, with a sliding window ``w``, to the last ``w`` of them (the
query's own position included, as transformers counts). Imported only when such a step runs; the CPU tests
run it under triton's interpreter in a child process (tests/interpreted_triton.py).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _paged_decode_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    out_ptr,
    table_ptr,
    lengths_ptr,
    scale,
    window,
    stride_qr,
    stride_qh,
    stride_ks,
    stride_kh,
    stride_vs,
    stride_vh,
    stride_or,
    stride_oh,
    stride_tr,
    GROUP: tl.constexpr,
    CACHE_BLOCK: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """``out[row, head] = softmax(q k^T * scale) v`` over the row's cached positions, one program."""
    row = tl.program_id(0).to(tl.int64)
    head = tl.program_id(1).to(tl.int64)
    kv_head = head // GROUP
    length = tl.load(lengths_ptr + row)
    start = tl.where(window > 0, tl.maximum(length - window, 0), 0)  # one type on both sides, as compiled code needs
    offs_d = tl.arange(0, BLOCK_D)
    mask_d = offs_d < HEAD_DIM
    q = tl.load(q_ptr + row * stride_qr + head * stride_qh + offs_d, mask=mask_d, other=0.0).to(tl.float32)
    q = q * scale
    running_max = tl.full((), float("-inf"), dtype=tl.float32)
    running_sum = tl.zeros((), dtype=tl.float32)
    acc = tl.zeros((BLOCK_D,), dtype=tl.float32)
    for first in range(start, length, BLOCK_N):
        positions = first + tl.arange(0, BLOCK_N)
        valid = positions < length
        block = tl.load(table_ptr + row * stride_tr + positions // CACHE_BLOCK, mask=valid, other=0).to(tl.int64)
        slots = block * CACHE_BLOCK + positions % CACHE_BLOCK
        tile = valid[:, None] & mask_d[None, :]
        k = tl.load(k_ptr + slots[:, None] * stride_ks + kv_head * stride_kh + offs_d[None, :], mask=tile, other=0.0)
        scores = tl.sum(k.to(tl.float32) * q[None, :], axis=1)
        scores = tl.where(valid, scores, float("-inf"))
        new_max = tl.maximum(running_max, tl.max(scores, axis=0))
        weights = tl.exp(scores - new_max)
        rescale = tl.exp(running_max - new_max)
        v = tl.load(v_ptr + slots[:, None] * stride_vs + kv_head * stride_vh + offs_d[None, :], mask=tile, other=0.0)
        acc = acc * rescale + tl.sum(weights[:, None] * v.to(tl.float32), axis=0)
        running_sum = running_sum * rescale + tl.sum(weights, axis=0)
        running_max = new_max
    out = acc / running_sum
    tl.store(out_ptr + row * stride_or + head * stride_oh + offs_d, out.to(out_ptr.dtype.element_ty), mask=mask_d)


def paged_decode_attention(
    query: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    block_table: torch.Tensor,
    lengths: torch.Tensor,
    *,
    cache_block: int,
    scale: float,
    window: int = 0,
) -> torch.Tensor:
    """Attention of one query token per row over its paged keys and values.

    ``query`` (rows, query_heads, head_dim); ``keys`` / ``values`` the layer's block pool (slots, kv_heads,
    head_dim), slot ``s`` in block ``s // cache_block``; ``block_table`` (rows, max_blocks) int32, the row's
    blocks in order; ``lengths`` (rows,) int32, each row's positions (at least 1). ``window`` 0: no sliding
    window. Returns (rows, query_heads, head_dim) in the query's dtype.
    """
    rows, query_heads, head_dim = query.shape
    kv_heads = keys.shape[1]
    if query_heads % kv_heads or keys.shape[-1] != head_dim or values.shape[:2] != keys.shape[:2]:
        raise ValueError(
            f"query {tuple(query.shape)} does not fit keys {tuple(keys.shape)} and values {tuple(values.shape)}"
        )
    if block_table.shape[0] != rows or lengths.shape != (rows,):
        raise ValueError(f"{rows} rows, but block table {tuple(block_table.shape)} and lengths {tuple(lengths.shape)}")
    if values.shape[-1] != head_dim:
        raise ValueError(f"values of width {values.shape[-1]}; this kernel reads keys and values of one width")
    query = query.contiguous()
    keys_stride, values_stride = keys.stride(), values.stride()
    if keys_stride[-1] != 1 or values_stride[-1] != 1:
        raise ValueError("the cache's keys and values must be contiguous in their last dimension")
    out = torch.empty_like(query)
    _paged_decode_kernel[(rows, query_heads)](
        query,
        keys,
        values,
        out,
        block_table,
        lengths,
        scale,
        window,
        query.stride(0),
        query.stride(1),
        keys_stride[0],
        keys_stride[1],
        values_stride[0],
        values_stride[1],
        out.stride(0),
        out.stride(1),
        block_table.stride(0),
        GROUP=query_heads // kv_heads,
        CACHE_BLOCK=cache_block,
        HEAD_DIM=head_dim,
        BLOCK_D=triton.next_power_of_2(head_dim),
        BLOCK_N=64,
    )
    return out
