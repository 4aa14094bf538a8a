"""The triton-lang backend of :mod:`peftserve.lora_kernels` (imported only when a CUDA tensor needs it).

One segmented matmul kernel serves both low-rank ops: programs are laid out per slot (axis 1) and per
block of that slot's tokens and output columns (axis 0); each gathers its tokens through the slot-sorted
order of :class:`~peftserve.lora_kernels.TokenSlots` and multiplies them by the slot's matrix, so a
matrix is read once per block of tokens that use it (SGMV) and a decode batch of one token per adapter
is a gathered matrix-vector product (BGMV). NO_SLOT gets no programs at all.

``@triton.jit`` decides at decoration time whether a kernel is compiled or interpreted
(``TRITON_INTERPRET=1``, triton 3.7), and so does triton's own library when it is first imported: the CPU
tests run this module in a child process started with the variable set (tests/interpreted_triton.py).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from peftserve.lora_kernels import TokenSlots, check_expand, check_low_rank, check_scale


@triton.jit
def _segmented_matmul_kernel(
    x_ptr,
    w_ptr,
    out_ptr,
    order_ptr,
    starts_ptr,
    counts_ptr,
    K,
    N,
    stride_xt,
    stride_xk,
    stride_ws,
    stride_wk,
    stride_wn,
    stride_ot,
    stride_on,
    ACCUMULATE: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """``out[t] (+)= x[t] @ w[slot]`` for the tokens of one slot, one (BLOCK_M, BLOCK_N) tile."""
    slot = (tl.program_id(1) + 1).to(tl.int64)  # slot 0 is NO_SLOT: never launched
    count = tl.load(counts_ptr + slot)
    blocks_n = tl.cdiv(N, BLOCK_N)
    block_m = tl.program_id(0) // blocks_n
    block_n = tl.program_id(0) % blocks_n
    if block_m * BLOCK_M >= count:  # this slot has fewer tokens than the batch has blocks
        return
    offs_m = block_m * BLOCK_M + tl.arange(0, BLOCK_M)
    mask_m = offs_m < count
    tokens = tl.load(order_ptr + tl.load(starts_ptr + slot) + offs_m, mask=mask_m, other=0).to(tl.int64)
    offs_n = block_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask_k = offs_k < K
        x = tl.load(
            x_ptr + tokens[:, None] * stride_xt + offs_k[None, :] * stride_xk,
            mask=mask_m[:, None] & mask_k[None, :],
            other=0.0,
        )
        w = tl.load(
            w_ptr + slot * stride_ws + offs_k[:, None] * stride_wk + offs_n[None, :] * stride_wn,
            mask=mask_k[:, None] & mask_n[None, :],
            other=0.0,
        )
        acc = tl.dot(x, w, acc, input_precision=PRECISION)
    out_ptrs = out_ptr + tokens[:, None] * stride_ot + offs_n[None, :] * stride_on
    mask = mask_m[:, None] & mask_n[None, :]
    if ACCUMULATE:  # each token belongs to one slot, so no other program writes this tile
        acc += tl.load(out_ptrs, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _scale_kernel(
    x_ptr,
    table_ptr,
    slots_ptr,
    out_ptr,
    bias_ptr,
    flags_ptr,
    N,
    stride_xt,
    stride_ts,
    stride_ot,
    HAS_BIAS: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """``out[t] = x[t] * table[slot[t]]``, the bias inside or outside the scaling per slot."""
    token = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = offs < N
    slot = tl.load(slots_ptr + token).to(tl.int64)
    x = tl.load(x_ptr + token * stride_xt + offs, mask=mask, other=0.0).to(tl.float32)
    scale = tl.load(table_ptr + slot * stride_ts + offs, mask=mask, other=1.0).to(tl.float32)
    if HAS_BIAS:
        bias = tl.load(bias_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        inside = tl.load(flags_ptr + slot).to(tl.float32)
        result = (x + inside * bias) * scale + (1.0 - inside) * bias
    else:
        result = x * scale
    tl.store(out_ptr + token * stride_ot + offs, result.to(out_ptr.dtype.element_ty), mask=mask)


def _block(size: int, low: int, high: int) -> int:
    """The power of two covering ``size``, clamped to [low, high] (tl.dot needs 16 or more per side)."""
    return max(low, min(high, triton.next_power_of_2(size)))


def _segmented_matmul(
    x: torch.Tensor, w: torch.Tensor, out: torch.Tensor, slots: TokenSlots, *, accumulate: bool
) -> None:
    tokens, (k, n) = x.shape[0], w.shape[1:]
    if tokens == 0 or slots.num_slots < 2:
        return
    block_m = 16 if tokens < 128 else 64
    block_n, block_k = _block(n, 16, 64), _block(k, 16, 64)
    grid = (triton.cdiv(tokens, block_m) * triton.cdiv(n, block_n), slots.num_slots - 1)
    _segmented_matmul_kernel[grid](
        x,
        w,
        out,
        slots.order,
        slots.starts,
        slots.counts,
        k,
        n,
        x.stride(0),
        x.stride(1),
        w.stride(0),
        w.stride(1),
        w.stride(2),
        out.stride(0),
        out.stride(1),
        ACCUMULATE=accumulate,
        # fp32 stays fp32: TF32 would move logits past the engine's exactness tolerance.
        PRECISION="ieee" if x.dtype == torch.float32 else "tf32",
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        BLOCK_K=block_k,
    )


class TritonKernels:
    """The triton-lang backend; same semantics as :class:`peftserve.lora_kernels.LoraKernels` says."""

    def shrink(self, x: torch.Tensor, a: torch.Tensor, slots: TokenSlots) -> torch.Tensor:
        check_low_rank(x, a, slots, "shrink")
        y = x.new_zeros(x.shape[0], a.shape[2])
        _segmented_matmul(x, a, y, slots, accumulate=False)
        return y

    def expand(self, out: torch.Tensor, y: torch.Tensor, b: torch.Tensor, slots: TokenSlots) -> None:
        check_expand(out, y, b, slots)
        _segmented_matmul(y, b, out, slots, accumulate=True)

    def scale(
        self,
        x: torch.Tensor,
        table: torch.Tensor,
        slots: TokenSlots,
        *,
        out: torch.Tensor | None = None,
        bias: torch.Tensor | None = None,
        bias_scaled: torch.Tensor | None = None,
    ) -> torch.Tensor:
        check_scale(x, table, slots, bias, bias_scaled)
        if out is None:
            out = torch.empty_like(x, memory_format=torch.contiguous_format)
        # The kernel walks features with unit stride.
        for name, tensor in (("x", x), ("table", table), ("out", out)):
            if tensor.stride(1) != 1:
                raise ValueError(f"scale: {name} must be contiguous along features, strides {tensor.stride()}")
        tokens, features = x.shape
        if tokens == 0:
            return out
        block_n = _block(features, 16, 1024)
        has_bias = bias is not None
        _scale_kernel[(tokens, triton.cdiv(features, block_n))](
            x,
            table,
            slots.slots,
            out,
            bias if has_bias else x,  # unread without HAS_BIAS
            bias_scaled if has_bias else x,
            features,
            x.stride(0),
            table.stride(0),
            out.stride(0),
            HAS_BIAS=has_bias,
            BLOCK_N=block_n,
        )
        return out
