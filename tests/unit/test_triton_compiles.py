"""Every triton-lang kernel compiles to a cubin for A100 (sm_80) and H100/H200 (sm_90), here, without a GPU.

The arguments are captured from our own launchers called the way the engine calls them on a GPU (bf16
model, fp32 for the exact path), so a kernel that the interpreter runs but the compiler refuses fails
here rather than on the first GPU it meets (tests/compiled_triton.py says how).
"""

from __future__ import annotations

import pytest
import torch
from triton.compiler.errors import CompilationError

from peftserve import lora_triton, paged_attention_triton
from peftserve.lora_kernels import TokenSlots
from peftserve.paged_attention import packed_tiles
from tests.compiled_triton import capture_launch, compile_for

CAPABILITIES = [80, 90]


def _paged_decode(dtype: torch.dtype, window: int, splits: int = 1):
    rows, heads, kv_heads, head_dim, block = 3, 32, 8, 128, 16
    pool = torch.zeros(64 * block, kv_heads, head_dim, dtype=dtype)
    table = torch.zeros(rows, 4, dtype=torch.int32)
    return lambda: paged_attention_triton.paged_decode_attention(
        torch.zeros(rows, heads, head_dim, dtype=dtype), pool, pool, table, torch.ones(rows, dtype=torch.int32),
        cache_block=block, scale=head_dim**-0.5, window=window, splits=splits,
    )  # fmt: skip


def _paged_packed(dtype: torch.dtype, block_m: int):
    heads, kv_heads, head_dim, block = 32, 8, 128, 16
    pool = torch.zeros(64 * block, kv_heads, head_dim, dtype=dtype)
    tiles = packed_tiles([(0, 1, 30), (1, 100, 0)], block_m, torch.device("cpu"))
    query = torch.zeros(1, heads, 101, head_dim, dtype=dtype)[0].transpose(0, 1)  # as the attention layer has it
    return lambda: paged_attention_triton.paged_packed_attention(
        query, pool, pool, torch.zeros(2, 8, dtype=torch.int32), tiles, cache_block=block, block_m=block_m,
        scale=head_dim**-0.5, window=0,
    )  # fmt: skip


def _slots() -> TokenSlots:
    return TokenSlots.build(torch.tensor([1, 0, 2, 1, 3], dtype=torch.int32), 4)


def _shrink(dtype: torch.dtype):
    return lambda: lora_triton.TritonKernels().shrink(torch.zeros(5, 4096, dtype=dtype),
                                                      torch.zeros(4, 4096, 16, dtype=dtype), _slots())  # fmt: skip


def _expand(dtype: torch.dtype):
    out = torch.zeros(5, 14336, dtype=dtype)
    return lambda: lora_triton.TritonKernels().expand(out, torch.zeros(5, 16, dtype=dtype),
                                                      torch.zeros(4, 16, 14336, dtype=dtype), _slots())  # fmt: skip


def _scale(dtype: torch.dtype, with_bias: bool):
    x, table = torch.zeros(5, 4096, dtype=dtype), torch.ones(4, 4096, dtype=dtype)
    bias = torch.zeros(4096, dtype=dtype) if with_bias else None
    flags = torch.tensor([False, True, False, True]) if with_bias else None
    return lambda: lora_triton.TritonKernels().scale(x, table, _slots(), bias=bias, bias_scaled=flags)


LAUNCHES = {
    "paged-decode-bf16": (paged_attention_triton._paged_decode_kernel, _paged_decode(torch.bfloat16, 0)),
    "paged-decode-fp16-window": (paged_attention_triton._paged_decode_kernel, _paged_decode(torch.float16, 4096)),
    "paged-decode-fp32": (paged_attention_triton._paged_decode_kernel, _paged_decode(torch.float32, 0)),
    "paged-decode-split-bf16": (paged_attention_triton._paged_decode_kernel, _paged_decode(torch.bfloat16, 0, 4)),
    "merge-splits-bf16": (paged_attention_triton._merge_splits_kernel, _paged_decode(torch.bfloat16, 0, 4)),
    "paged-packed-bf16": (paged_attention_triton._paged_packed_kernel, _paged_packed(torch.bfloat16, 64)),
    "paged-packed-fp32-short-tiles": (paged_attention_triton._paged_packed_kernel, _paged_packed(torch.float32, 16)),
    "shrink-bf16": (lora_triton._segmented_matmul_kernel, _shrink(torch.bfloat16)),
    "shrink-fp32": (lora_triton._segmented_matmul_kernel, _shrink(torch.float32)),
    "expand-bf16": (lora_triton._segmented_matmul_kernel, _expand(torch.bfloat16)),
    "scale-bf16": (lora_triton._scale_kernel, _scale(torch.bfloat16, False)),
    "scale-bf16-bias": (lora_triton._scale_kernel, _scale(torch.bfloat16, True)),
}


@pytest.mark.parametrize("capability", CAPABILITIES)
@pytest.mark.parametrize("launch", LAUNCHES.values(), ids=LAUNCHES.keys())
def test_kernel_compiles_to_a_cubin(launch, capability: int) -> None:
    kernel, launcher = launch
    skipped = (
        (paged_attention_triton._paged_decode_kernel,) if kernel is paged_attention_triton._merge_splits_kernel else ()
    )
    compiled = compile_for(kernel, capture_launch(kernel, launcher, skipped=skipped), capability)
    assert len(compiled.asm["cubin"]) > 1000
    assert f".target sm_{capability}" in compiled.asm["ptx"]


def test_a_kernel_the_compiler_refuses_fails_here() -> None:
    """The harness is not a formality: a kernel with a type error the interpreter would run is refused."""
    import triton
    import triton.language as tl

    @triton.jit
    def mixed_branches(out_ptr, flag):
        value = tl.zeros((16,), dtype=tl.float32)
        if flag > 0:
            value = tl.zeros((32,), dtype=tl.float32)  # another shape on one branch only
        tl.store(out_ptr + tl.arange(0, 16), value)

    with pytest.raises(CompilationError, match="redefines"):
        compile_for(mixed_branches, {"out_ptr": torch.zeros(16), "flag": 3}, 90)
