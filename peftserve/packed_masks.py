"""The attention masks of a packed forward pass, in the form the model's attention layers take them.

A packed pass puts every row's new tokens in one sequence (see :meth:`PagedKVCache.plan_packed`), so the
model cannot build its masks from a 2-D padding mask as it does for rows: it gets them prepared, 4-D, and
transformers uses a 4-D mask as it is. Which masks a model needs comes from its config:

- ``layer_types`` naming one kind per layer (Gemma 2/3, Qwen2, GPT-OSS...): a mask per kind, passed as the
  ``{kind: mask}`` mapping those models accept;
- otherwise one mask, sliding when the config sets ``sliding_window`` (Mistral), causal otherwise (Llama).

Kinds this module does not know (chunked, linear attention) and attention implementations that take no
dense mask (flash, flex) get no packed pass: :func:`packed_mask_builder` returns None and the engine keeps
prefill and decoding in separate passes. Whatever the config says, the engine checks a packed pass against
separate ones on the real model before using it (``ModelRunner.check_packing``).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from transformers import PretrainedConfig

from peftserve.kv_cache import PackedLayout
from peftserve.paged_attention import ATTENTION_NAME as PAGED_ATTENTION

MaskArgument = torch.Tensor | dict[str, torch.Tensor]
MaskBuilder = Callable[[PackedLayout], MaskArgument]

_DENSE_MASK_IMPLEMENTATIONS = {"sdpa", "eager", PAGED_ATTENTION}  # the paged one hands such passes to sdpa


def packed_mask_builder(config: PretrainedConfig, dtype: torch.dtype) -> MaskBuilder | None:
    """How to build a packed pass's ``attention_mask`` for models of ``config``; None if not supported."""
    implementation = getattr(config, "_attn_implementation", None) or "eager"
    if implementation not in _DENSE_MASK_IMPLEMENTATIONS:
        return None
    window = _sliding_window(config)
    kinds = set(getattr(config, "layer_types", None) or ())
    if kinds - {"full_attention", "sliding_attention"}:
        return None
    if "sliding_attention" in kinds and window is None:
        return None
    as_mask = _as_float_mask(dtype) if implementation == "eager" else _as_bool_mask

    if len(kinds) > 1:

        def mapping(layout: PackedLayout) -> MaskArgument:
            return {"full_attention": as_mask(layout.allowed()), "sliding_attention": as_mask(layout.allowed(window))}

        return mapping
    sliding = kinds == {"sliding_attention"} or (not kinds and window is not None)

    def single(layout: PackedLayout) -> MaskArgument:
        return as_mask(layout.allowed(window if sliding else None))

    return single


def _sliding_window(config: PretrainedConfig) -> int | None:
    """The window, where the config turns it on (Qwen2 carries one with ``use_sliding_window: false``)."""
    window = getattr(config, "sliding_window", None)
    if not window or getattr(config, "use_sliding_window", True) is False:
        return None
    return int(window)


def _as_bool_mask(allowed: torch.Tensor) -> torch.Tensor:
    return allowed


def _as_float_mask(dtype: torch.dtype) -> Callable[[torch.Tensor], torch.Tensor]:
    """Eager attention adds its mask to the scores: 0 where allowed, the dtype's minimum elsewhere."""

    def convert(allowed: torch.Tensor) -> torch.Tensor:
        return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill(
            ~allowed, torch.finfo(dtype).min
        )

    return convert
