"""Architecture: which base the adapter was made for, whether peftserve's support matrix covers the base,
whether the layers the adapter targets are ones the engine can wrap, and whether every tensor fits.

PEFT itself builds the expected adapter on a ``meta``-device copy of the base (no weights, no memory);
its state dict gives the exact keys and shapes the adapter must hold, for every PEFT type.
"""

from __future__ import annotations

from collections import Counter
from pathlib import PurePath
from typing import Any

import torch
from peft import PeftConfig, PeftType, get_peft_model, get_peft_model_state_dict
from transformers import AutoModelForCausalLM

from peftserve.adapter_types import targeted_module
from peftserve.adapter_weights import is_linear_like
from peftserve.architectures import TESTED_FAMILIES
from validation.checks.schema import PROMPT_LEARNING
from validation.context import ValidationContext
from validation.report import Severity

CATEGORY = "architecture"
_SHOWN = 5


def check_architecture(ctx: ValidationContext) -> None:
    if ctx.config is None or ctx.peft_type not in {member.value for member in PeftType}:
        return  # the files or config check already reported why
    base = ctx.base
    if base is None:
        return
    _check_identity(ctx, ctx.config)
    _check_support(ctx)
    if ctx.peft_type in PROMPT_LEARNING:
        _check_prompt_learning_dimensions(ctx, ctx.config)
    expected = _expected_shapes(ctx, ctx.config)
    if expected is None or not ctx.tensor_shapes:
        return
    _compare(ctx, expected, ctx.tensor_shapes)


def _check_identity(ctx: ValidationContext, config: dict[str, Any]) -> None:
    base = ctx.base
    trained_on = config.get("base_model_name_or_path")
    if not trained_on:
        ctx.add(Severity.INFO, CATEGORY, "adapter_config.json does not name its base model")
    elif PurePath(str(trained_on)).name.lower() != PurePath(base.name).name.lower():
        ctx.add(
            Severity.WARNING,
            CATEGORY,
            f"adapter was trained on {trained_on!r}, validated against {base.name!r}",
            "make sure both are the same model; shapes matching does not prove it",
        )
    base_class = (config.get("auto_mapping") or {}).get("base_model_class")
    if base_class and base.architectures and base_class not in base.architectures:
        ctx.add(
            Severity.WARNING,
            CATEGORY,
            f"adapter was made for a {base_class}, the base model is a {', '.join(base.architectures)}",
            "check the adapter was trained on this model family",
        )


def _check_support(ctx: ValidationContext) -> None:
    """The family against the support matrix (docs/models.md), the layers the engine recognises, and the adapter's
    target layers that it cannot wrap (PEFT adapts embeddings and convolutions too; peftserve does not)."""
    model = ctx.base.meta_model
    model_type = ctx.base.config.get_text_config().model_type
    family = TESTED_FAMILIES.get(ctx.base.model_type) or TESTED_FAMILIES.get(model_type)
    ctx.report.facts["architecture"] = f"{model_type} ({family or 'not in the support matrix'})"
    ctx.report.facts["attn_implementation"] = model.config._attn_implementation
    kinds = Counter(type(module).__name__ for module in model.modules() if is_linear_like(module))
    ctx.report.facts["linear_layers"] = ", ".join(f"{count} {kind}" for kind, count in sorted(kinds.items()))
    if family is None:
        ctx.add(
            Severity.WARNING,
            CATEGORY,
            f"the {model_type} family is not in peftserve's support matrix: serving it is not verified against PEFT",
            "check with --load, or add the family to tools/support_matrix.py (docs/models.md: Supported architectures)",
        )
    modules = dict(model.named_modules())
    refused = sorted(
        {
            f"{name} ({type(modules[name]).__name__})"
            for name in filter(None, map(targeted_module, ctx.tensor_shapes))
            if name in modules and not is_linear_like(modules[name])
        }
    )
    if refused:
        ctx.add(
            Severity.ERROR,
            CATEGORY,
            f"{len(refused)} targeted layers are not linear layers peftserve can adapt, "
            f"e.g. {', '.join(refused[:_SHOWN])}",
            "peftserve adapts nn.Linear layers (and subclasses computing the same) and Conv1D: retrain without these",
        )


def _check_prompt_learning_dimensions(ctx: ValidationContext, config: dict[str, Any]) -> None:
    shape = ctx.base.shape
    expected = {"num_layers": shape.num_layers}
    if ctx.peft_type == "PREFIX_TUNING":
        expected |= {"token_dim": shape.num_kv_heads * shape.head_dim, "num_attention_heads": shape.num_kv_heads}
    else:
        expected |= {"token_dim": shape.hidden_size}
    hint = "this prompt-learning adapter was made for a model of another size"
    attention_heads = ctx.base.config.get_text_config().num_attention_heads
    multi_query = shape.num_kv_heads == 1 < attention_heads
    if ctx.peft_type == "PREFIX_TUNING" and multi_query and config.get("num_attention_heads") == attention_heads:
        hint = (
            f"PEFT sized this prefix for all {attention_heads} attention heads, but this model caches "
            f"{shape.num_kv_heads} key/value heads (multi-query attention): PEFT cannot run it either; "
            "prefix tuning does not work on this model"
        )
    for field, value in expected.items():
        if config.get(field) is not None and config[field] != value:
            ctx.add(
                Severity.ERROR, CATEGORY, f"{field} = {config[field]} in the adapter, the base model has {value}", hint
            )


def _skeleton_config(config: dict[str, Any], peft_type: str) -> PeftConfig:
    # Dropouts never change shapes; zeroing them lets shapes be checked even when a dropout is invalid.
    dropouts = {
        key: 0.0 for key in ("lora_dropout", "rank_dropout", "module_dropout", "encoder_dropout") if key in config
    }
    values = dict(config, inference_mode=True, **dropouts)
    if peft_type in PROMPT_LEARNING:
        # Let PEFT derive the sizes from this base, so a mismatch shows in the shapes.
        values |= {
            "num_layers": None,
            "token_dim": None,
            "num_attention_heads": None,
            "num_transformer_submodules": None,
        }
        if values.get("prompt_tuning_init") == "TEXT":
            values |= {"prompt_tuning_init": "RANDOM", "tokenizer_name_or_path": None}
    return PeftConfig.from_peft_type(**values)


def _expected_shapes(ctx: ValidationContext, config: dict[str, Any]) -> dict[str, tuple[int, ...]] | None:
    try:
        peft_config = _skeleton_config(config, ctx.peft_type)
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(ctx.base.config, trust_remote_code=False)
            peft_model = get_peft_model(model, peft_config)
        return {key: tuple(t.shape) for key, t in get_peft_model_state_dict(peft_model).items()}
    except Exception as exc:  # noqa: BLE001 - PEFT raises several types; each is a finding
        message = str(exc).splitlines()[0]
        if "not found in the base model" in message or "Target module" in message:
            modules = sorted({name.rsplit(".", 1)[-1] for name in ctx.base.shape.linear_shapes})
            ctx.add(
                Severity.ERROR,
                CATEGORY,
                f"target_modules do not match the base model: {message}",
                f"linear modules of this base: {', '.join(modules)}",
            )
        elif not ctx.has_errors("config"):  # with config errors, those already explain the failure
            ctx.add(
                Severity.ERROR,
                CATEGORY,
                f"PEFT cannot apply this adapter to the base model: {message}",
                "check the adapter was made for this base model and a PEFT version that knows its options",
            )
        return None


def _compare(ctx: ValidationContext, expected: dict[str, tuple], found: dict[str, tuple]) -> None:
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected))
    if missing:
        ctx.add(
            Severity.ERROR,
            CATEGORY,
            f"{len(missing)} tensors missing, e.g. {', '.join(missing[:_SHOWN])}",
            "the weights file does not match adapter_config.json (target_modules, rank or type)",
        )
    if unexpected:
        ctx.add(
            Severity.ERROR,
            CATEGORY,
            f"{len(unexpected)} tensors the config does not explain, e.g. {', '.join(unexpected[:_SHOWN])}",
            "they target modules this base lacks, or the config was edited after saving",
        )
    mismatched = [(k, found[k], expected[k]) for k in sorted(set(found) & set(expected)) if found[k] != expected[k]]
    for key, got, want in mismatched[:_SHOWN]:
        ctx.add(
            Severity.ERROR,
            CATEGORY,
            f"tensor {key} has shape {got}, this base model needs {want}",
            "made for a model of other sizes, or adapter_config.json (r, target_modules) does not match these weights",
        )
    if len(mismatched) > _SHOWN:
        ctx.add(
            Severity.ERROR,
            CATEGORY,
            f"{len(mismatched) - _SHOWN} more tensors have shapes that do not fit",
            "see the tensors above: the same cause usually explains all of them",
        )
    ctx.report.facts["tensors"] = len(found)
