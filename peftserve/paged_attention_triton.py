"""The triton-lang kernels of attention over the paged KV cache, reading the blocks where they are.

Gathering each row's keys and values into a dense tensor for a standard attention kernel copies the whole
cache every step (per layer: read it, write the copy, read the copy again). Here programs read the keys and
values straight from the cache's block pool through each row's block table, in tiles of ``BLOCK_N``
positions, with an online softmax (the running maximum and sum of flash attention), so the cache is read
once per step and nothing is written but the output.

*Decoding passes* (one query token per row) are bound by reading keys and values, and laid out for it:

- one program serves every query head of one key/value head (grouped-query attention), so each key and
  value tile is read once for the whole group; the group's queries form the rows of a ``BLOCK_H`` x
  ``BLOCK_N`` score tile (padded to 16 rows: ``tl.dot`` needs 16 per side), multiplied on tensor cores;
- where rows x key/value heads are too few programs to keep the GPU's memory system busy (one long
  sequence), each row's positions are split over several programs (flash-decoding), each writing a partial
  result with its log-sum-exp, and a second kernel merges the parts exactly; otherwise the first kernel
  writes the output itself.

*Packed passes* (prompt chunks and decoding rows in one sequence): one program per query head and tile of
up to ``BLOCK_M`` consecutive new tokens of one row, attending causally to that row's blocks only, where a
dense mask would have set every token against every row's keys.

Semantics are those of causal attention: a token at position ``p`` attends to its row's positions
``0 .. p``, or, with a sliding window ``w``, to the last ``w`` of them (its own included, as transformers
counts). Imported only where such a pass runs; the CPU tests run the kernels under triton's interpreter in
a child process (tests/interpreted_triton.py) and compile them for sm_80 and sm_90 (tests/compiled_triton.py).
No block size here was tuned on a GPU.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK_H = 16  # query heads per score tile: tl.dot's minimum; groups of more heads take several programs
BLOCK_N = 64  # positions per tile
MIN_SPLIT_POSITIONS = 256  # no shorter splits: each adds a partial result and its share of the merge


@triton.jit
def _read_tile(
    k_ptr, v_ptr, table_ptr, row, kv_head, first, high, stride_tr, stride_ks, stride_kh, stride_vs, stride_vh,
    offs_d, mask_d, CACHE_BLOCK: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    """Positions ``first .. first + BLOCK_N`` of ``row`` (those below ``high`` valid): their keys and values
    for ``kv_head``, read through the row's block table (invalid ones read as zero)."""
    positions = first + tl.arange(0, BLOCK_N)
    valid = positions < high
    block = tl.load(table_ptr + row * stride_tr + positions // CACHE_BLOCK, mask=valid, other=0).to(tl.int64)
    slots = block * CACHE_BLOCK + positions % CACHE_BLOCK
    tile = valid[:, None] & mask_d[None, :]
    k = tl.load(k_ptr + slots[:, None] * stride_ks + kv_head * stride_kh + offs_d[None, :], mask=tile, other=0.0)
    v = tl.load(v_ptr + slots[:, None] * stride_vs + kv_head * stride_vh + offs_d[None, :], mask=tile, other=0.0)
    return positions, valid, k, v


@triton.jit
def _no_keys_yet(ROWS: tl.constexpr, BLOCK_D: tl.constexpr):
    """The running maximum, sum and weighted values of ``ROWS`` queries before their first tile."""
    return (
        tl.full((ROWS,), float("-inf"), dtype=tl.float32),
        tl.zeros((ROWS,), dtype=tl.float32),
        tl.zeros((ROWS, BLOCK_D), dtype=tl.float32),
    )


@triton.jit
def _softmax_step(scores, v, running_max, running_sum, acc, PRECISION: tl.constexpr):
    """Fold one tile of masked scores (-inf where not allowed) and its values into the running maximum, sum
    and weighted values. A query that has seen no key yet keeps a maximum of -inf: 0 is subtracted instead,
    so its weights are exp(-inf) = 0, not NaN."""
    new_max = tl.maximum(running_max, tl.max(scores, axis=1))
    shift = tl.where(new_max == float("-inf"), 0.0, new_max)
    weights = tl.exp(scores - shift[:, None])
    rescale = tl.exp(running_max - shift)
    acc = acc * rescale[:, None] + tl.dot(weights.to(v.dtype), v, input_precision=PRECISION)
    running_sum = running_sum * rescale + tl.sum(weights, axis=1)
    return new_max, running_sum, acc


@triton.jit
def _paged_decode_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    out_ptr,
    part_ptr,
    lse_ptr,
    table_ptr,
    lengths_ptr,
    scale,
    window,
    splits,
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
    HEAD_TILES: tl.constexpr,
    CACHE_BLOCK: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_N: tl.constexpr,
    SPLIT: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """One row, up to ``BLOCK_H`` query heads of one key/value head, one split of the row's positions."""
    row = tl.program_id(0).to(tl.int64)
    kv_head = tl.program_id(1) // HEAD_TILES
    in_group = (tl.program_id(1) % HEAD_TILES) * BLOCK_H + tl.arange(0, BLOCK_H)
    head_mask = in_group < GROUP
    heads = (kv_head * GROUP + in_group).to(tl.int64)
    split = tl.program_id(2)
    length = tl.load(lengths_ptr + row)
    start = tl.where(window > 0, tl.maximum(length - window, 0), 0)
    per_split = tl.cdiv(tl.cdiv(length - start, BLOCK_N), splits) * BLOCK_N  # whole tiles per split
    low = start + split * per_split
    high = tl.minimum(low + per_split, length)
    offs_d = tl.arange(0, BLOCK_D)
    mask_d = offs_d < HEAD_DIM
    q = tl.load(
        q_ptr + row * stride_qr + heads[:, None] * stride_qh + offs_d[None, :],
        mask=head_mask[:, None] & mask_d[None, :],
        other=0.0,
    )
    running_max, running_sum, acc = _no_keys_yet(BLOCK_H, BLOCK_D)
    for first in range(low, high, BLOCK_N):
        _, valid, k, v = _read_tile(
            k_ptr, v_ptr, table_ptr, row, kv_head, first, high, stride_tr, stride_ks, stride_kh, stride_vs, stride_vh,
            offs_d, mask_d, CACHE_BLOCK, BLOCK_N,
        )  # fmt: skip
        scores = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale
        scores = tl.where(valid[None, :], scores, float("-inf"))
        running_max, running_sum, acc = _softmax_step(scores, v, running_max, running_sum, acc, PRECISION)
    filled = running_sum > 0  # a split past a short row's end saw no position
    result = acc / tl.where(filled, running_sum, 1.0)[:, None]
    store_mask = head_mask[:, None] & mask_d[None, :]
    if SPLIT:
        query_heads = (tl.num_programs(1) // HEAD_TILES) * GROUP
        part = ((row * query_heads + heads) * splits + split).to(tl.int64)  # (rows, query_heads, splits) layout
        tl.store(part_ptr + part[:, None] * HEAD_DIM + offs_d[None, :], result, mask=store_mask)
        log_sum = tl.where(filled, running_max + tl.log(tl.where(filled, running_sum, 1.0)), float("-inf"))
        tl.store(lse_ptr + part, log_sum, mask=head_mask)
    else:
        out = out_ptr + row * stride_or + heads[:, None] * stride_oh + offs_d[None, :]
        tl.store(out, result.to(out_ptr.dtype.element_ty), mask=store_mask)


@triton.jit
def _merge_splits_kernel(
    part_ptr,
    lse_ptr,
    out_ptr,
    splits,
    stride_or,
    stride_oh,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_S: tl.constexpr,
):
    """One (row, query head): the splits' partial results weighted by their share of the softmax."""
    row = tl.program_id(0).to(tl.int64)
    head = tl.program_id(1).to(tl.int64)
    first = (row * tl.num_programs(1) + head) * splits
    offs_s = tl.arange(0, BLOCK_S)
    mask_s = offs_s < splits
    offs_d = tl.arange(0, BLOCK_D)
    mask_d = offs_d < HEAD_DIM
    lse = tl.load(lse_ptr + first + offs_s, mask=mask_s, other=float("-inf"))
    weights = tl.exp(lse - tl.max(lse, axis=0))  # a row's first split always saw a position: the max is finite
    parts = tl.load(
        part_ptr + (first + offs_s)[:, None] * HEAD_DIM + offs_d[None, :],
        mask=mask_s[:, None] & mask_d[None, :],
        other=0.0,
    )
    result = tl.sum(weights[:, None] * parts, axis=0) / tl.sum(weights, axis=0)
    tl.store(out_ptr + row * stride_or + head * stride_oh + offs_d, result.to(out_ptr.dtype.element_ty), mask=mask_d)


@triton.jit
def _paged_packed_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    out_ptr,
    table_ptr,
    tiles_ptr,
    scale,
    window,
    stride_qt,
    stride_qh,
    stride_ks,
    stride_kh,
    stride_vs,
    stride_vh,
    stride_ot,
    stride_oh,
    stride_tr,
    GROUP: tl.constexpr,
    CACHE_BLOCK: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """One query head over one tile of up to ``BLOCK_M`` consecutive new tokens of one row, causal."""
    tile = tl.program_id(0)
    head = tl.program_id(1).to(tl.int64)
    kv_head = head // GROUP
    row = tl.load(tiles_ptr + tile * 4).to(tl.int64)
    first_token = tl.load(tiles_ptr + tile * 4 + 1)
    count = tl.load(tiles_ptr + tile * 4 + 2)
    first_position = tl.load(tiles_ptr + tile * 4 + 3)
    offs_m = tl.arange(0, BLOCK_M)
    mask_m = offs_m < count
    tokens = (first_token + offs_m).to(tl.int64)
    query_positions = first_position + offs_m
    offs_d = tl.arange(0, BLOCK_D)
    mask_d = offs_d < HEAD_DIM
    q = tl.load(
        q_ptr + tokens[:, None] * stride_qt + head * stride_qh + offs_d[None, :],
        mask=mask_m[:, None] & mask_d[None, :],
        other=0.0,
    )
    low = tl.where(window > 0, tl.maximum(first_position - window + 1, 0), 0)
    high = first_position + count  # past the tile's last position: later keys are masked for all of it
    running_max, running_sum, acc = _no_keys_yet(BLOCK_M, BLOCK_D)
    for first in range(low, high, BLOCK_N):
        positions, valid, k, v = _read_tile(
            k_ptr, v_ptr, table_ptr, row, kv_head, first, high, stride_tr, stride_ks, stride_kh, stride_vs, stride_vh,
            offs_d, mask_d, CACHE_BLOCK, BLOCK_N,
        )  # fmt: skip
        scores = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale
        before = query_positions[:, None] - positions[None, :]  # a query's window may start after this tile
        allowed = valid[None, :] & (before >= 0) & ((window <= 0) | (before < window))
        scores = tl.where(allowed, scores, float("-inf"))
        running_max, running_sum, acc = _softmax_step(scores, v, running_max, running_sum, acc, PRECISION)
    result = acc / tl.where(running_sum > 0, running_sum, 1.0)[:, None]
    out = out_ptr + tokens[:, None] * stride_ot + head * stride_oh + offs_d[None, :]
    tl.store(out, result.to(out_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_d[None, :])


def choose_splits(rows: int, kv_heads: int, longest: int, device: torch.device) -> int:
    """Splits per row: enough programs to give every streaming multiprocessor two, none shorter than
    :data:`MIN_SPLIT_POSITIONS` positions (one where rows x heads already fill the device)."""
    if device.type != "cuda":
        return 1
    programs = 2 * torch.cuda.get_device_properties(device).multi_processor_count
    return max(1, min(triton.cdiv(programs, rows * kv_heads), longest // MIN_SPLIT_POSITIONS))


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
    splits: int = 1,
) -> torch.Tensor:
    """Attention of one query token per row over its paged keys and values.

    ``query`` (rows, query_heads, head_dim); ``keys`` / ``values`` the layer's block pool (slots, kv_heads,
    head_dim), slot ``s`` in block ``s // cache_block``; ``block_table`` (rows, max_blocks) int32, the row's
    blocks in order; ``lengths`` (rows,) int32, each row's positions (at least 1). ``window`` 0: no sliding
    window. ``splits``: programs per row and key/value head (see :func:`choose_splits`). Returns (rows,
    query_heads, head_dim) in the query's dtype.
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
    if keys.stride(-1) != 1 or values.stride(-1) != 1:
        raise ValueError("the cache's keys and values must be contiguous in their last dimension")
    if splits < 1:
        raise ValueError(f"splits must be at least 1, got {splits}")
    query = query.contiguous()
    out = torch.empty_like(query)
    group = query_heads // kv_heads
    head_tiles = triton.cdiv(group, BLOCK_H)
    block_d = max(16, triton.next_power_of_2(head_dim))
    part = lse = out  # unread and unwritten with a single split
    if splits > 1:
        part = torch.empty(rows, query_heads, splits, head_dim, dtype=torch.float32, device=query.device)
        lse = torch.empty(rows, query_heads, splits, dtype=torch.float32, device=query.device)
    _paged_decode_kernel[(rows, kv_heads * head_tiles, splits)](
        query,
        keys,
        values,
        out,
        part,
        lse,
        block_table,
        lengths,
        scale,
        window,
        splits,
        query.stride(0),
        query.stride(1),
        *keys.stride()[:2],
        *values.stride()[:2],
        *out.stride()[:2],
        block_table.stride(0),
        GROUP=group,
        HEAD_TILES=head_tiles,
        CACHE_BLOCK=cache_block,
        HEAD_DIM=head_dim,
        BLOCK_D=block_d,
        BLOCK_H=BLOCK_H,
        BLOCK_N=BLOCK_N,
        SPLIT=splits > 1,
        # fp32 stays fp32: TF32 would move logits past the engine's exactness tolerance.
        PRECISION="ieee" if query.dtype == torch.float32 else "tf32",
    )
    if splits > 1:
        _merge_splits_kernel[(rows, query_heads)](
            part,
            lse,
            out,
            splits,
            out.stride(0),
            out.stride(1),
            HEAD_DIM=head_dim,
            BLOCK_D=block_d,
            BLOCK_S=triton.next_power_of_2(splits),
        )
    return out


def paged_packed_attention(
    query: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    block_table: torch.Tensor,
    tiles: torch.Tensor,
    *,
    cache_block: int,
    block_m: int,
    scale: float,
    window: int = 0,
) -> torch.Tensor:
    """Causal attention of a packed pass's new tokens over their own rows' paged keys and values (the new
    ones already written). ``query`` (tokens, query_heads, head_dim), any strides with a unit last one;
    ``tiles`` from :func:`peftserve.paged_attention.packed_tiles` with the same ``block_m``; the rest as
    :func:`paged_decode_attention`. Returns (tokens, query_heads, head_dim) in the query's dtype."""
    tokens, query_heads, head_dim = query.shape
    kv_heads = keys.shape[1]
    if query_heads % kv_heads or keys.shape[-1] != head_dim or values.shape != keys.shape:
        raise ValueError(
            f"query {tuple(query.shape)} does not fit keys {tuple(keys.shape)} and values {tuple(values.shape)}"
        )
    if tiles.dim() != 2 or tiles.shape[1] != 4 or block_m < 16:
        raise ValueError(f"tiles must be (n, 4) (packed_tiles), block_m at least 16; got {tuple(tiles.shape)}")
    if query.stride(-1) != 1 or keys.stride(-1) != 1 or values.stride(-1) != 1:
        raise ValueError("queries, keys and values must be contiguous in their last dimension")
    out = torch.empty(tokens, query_heads, head_dim, dtype=query.dtype, device=query.device)
    _paged_packed_kernel[(tiles.shape[0], query_heads)](
        query,
        keys,
        values,
        out,
        block_table,
        tiles,
        scale,
        window,
        query.stride(0),
        query.stride(1),
        *keys.stride()[:2],
        *values.stride()[:2],
        *out.stride()[:2],
        block_table.stride(0),
        GROUP=query_heads // kv_heads,
        CACHE_BLOCK=cache_block,
        HEAD_DIM=head_dim,
        BLOCK_D=max(16, triton.next_power_of_2(head_dim)),
        BLOCK_M=block_m,
        BLOCK_N=BLOCK_N,
        PRECISION="ieee" if query.dtype == torch.float32 else "tf32",
    )
    return out
