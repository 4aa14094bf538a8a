"""Lay a CPU model's linear weights out the way the CPU's matrix multiply reads them fastest.

``nn.Linear`` stores its weight as ``(out, in)`` rows and computes ``x @ weight.T``. On a CPU, torch hands
that to MKL's sgemm as a transposed operand, and for the row counts of decoding (a few to a few dozen rows)
MKL is much slower on it than on the same matrix stored ``(in, out)``: measured here on 2 threads, a
``(1408, 512)`` layer at 16 rows took 381 against 152 µs, a 32,000-word head 9.7 against 5.0 ms, a
SmolLM2-135M ``(576, 1536)`` layer 524 against 190 µs; across 1 to 128 rows the sum was 15-20% lower
(``docs/benchmarks.md``). So each float32 weight keeps its shape and values and is stored column-major
(``weight.t().contiguous().t()``): every caller, transformers' own modules included, still sees an
``(out, in)`` tensor, and ``F.linear`` now passes MKL the untransposed ``(in, out)`` matrix. The copy is
made one weight at a time and replaces the old storage, so memory does not grow.

Only on a CPU and only float32: a GPU's cuBLAS reads both layouts alike, and half precision on a CPU goes
through oneDNN, which this was not measured on. A weight tied to the input embeddings is laid out too: an
embedding lookup then gathers strided rows (5 ms for a 1,024-token prompt on SmolLM2's 49,152-word table,
against the seconds that prompt's prefill takes), while the head it feeds runs at every decoding step.
"""

from __future__ import annotations

import torch
from torch import nn


def lay_out_for_cpu_matmul(model: nn.Module) -> int:
    """Store every float32 ``nn.Linear`` weight of ``model`` column-major, in place; returns how many moved."""
    moved = 0
    for module in model.modules():
        if not isinstance(module, nn.Linear):
            continue
        weight = module.weight
        if weight.device.type != "cpu" or weight.dtype != torch.float32 or is_column_major(weight):
            continue
        weight.data = weight.data.t().contiguous().t()  # .data: no autograd record, the Parameter stays
        moved += 1
    return moved


def is_column_major(weight: torch.Tensor) -> bool:
    """Whether a 2-D weight is stored ``(in, out)``: its transpose is contiguous."""
    return weight.dim() == 2 and weight.t().is_contiguous()
