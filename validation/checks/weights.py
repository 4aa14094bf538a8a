"""Weights: finite values, not all zero, no exploding norms, floating-point dtypes."""

from __future__ import annotations

import torch

from validation.context import ValidationContext
from validation.report import Severity

CATEGORY = "weights"
EXPLODING_ABS_VALUE = 1e3


def check_weights(ctx: ValidationContext) -> None:
    if ctx.weights_path is None:
        return
    tensors = ctx.tensors
    if not tensors:
        ctx.add(Severity.ERROR, CATEGORY, "the weights file holds no tensors", "re-save the adapter")
        return
    dtypes = sorted({str(t.dtype).removeprefix("torch.") for t in tensors.values()})
    ctx.report.facts["dtypes"] = ", ".join(dtypes)
    ctx.report.facts["parameters"] = sum(t.numel() for t in tensors.values())
    non_finite = [name for name, t in tensors.items() if t.is_floating_point() and not torch.isfinite(t).all()]
    if non_finite:
        ctx.add(
            Severity.ERROR,
            CATEGORY,
            f"{len(non_finite)} tensors hold NaN or Inf, e.g. {non_finite[0]}",
            "training diverged; retrain with a lower learning rate or check mixed precision",
        )
    not_float = [name for name, t in tensors.items() if not t.is_floating_point()]
    if not_float:
        ctx.add(
            Severity.ERROR,
            CATEGORY,
            f"{len(not_float)} tensors are not floating point, e.g. {not_float[0]}",
            "adapter weights must be float32, float16 or bfloat16; re-save them",
        )
    if any(t.dtype == torch.float64 for t in tensors.values()):
        ctx.add(
            Severity.WARNING,
            CATEGORY,
            "float64 tensors: twice the memory of float32 for no gain",
            "save the adapter in float32, float16 or bfloat16",
        )
    _check_magnitudes(ctx, {n: t for n, t in tensors.items() if t.is_floating_point() and n not in non_finite})


def _check_magnitudes(ctx: ValidationContext, tensors: dict[str, torch.Tensor]) -> None:
    if tensors and all(not t.any() for t in tensors.values()):
        ctx.add(
            Severity.WARNING,
            CATEGORY,
            "every tensor is all zeros: the adapter changes nothing",
            "the adapter looks untrained; check that training saved the trained weights",
        )
        return
    up_projections = [t for name, t in tensors.items() if name.endswith("lora_B.weight")]
    if up_projections and all(not t.any() for t in up_projections):
        ctx.add(
            Severity.WARNING,
            CATEGORY,
            "every lora_B is all zeros: this LoRA adapter changes nothing",
            "LoRA starts with B = 0; the adapter looks untrained",
        )
    exploding = [name for name, t in tensors.items() if t.numel() and t.abs().max() > EXPLODING_ABS_VALUE]
    if exploding:
        ctx.add(
            Severity.WARNING,
            CATEGORY,
            f"{len(exploding)} tensors hold values above {EXPLODING_ABS_VALUE:g}, e.g. {exploding[0]}",
            "exploding weights; outputs may be garbage or overflow in float16",
        )
