"""Serving fit: can peftserve load this adapter, what will it occupy, does it fit the serving limits."""

from __future__ import annotations

import time

import torch

from peftserve.adapter_repository import AdapterVersion
from peftserve.adapter_types import check_servable, convert_adapter
from peftserve.config import ServeConfig
from peftserve.engine import Engine
from peftserve.errors import AdapterLoadError, PeftServeError
from peftserve.generation import GenerationRow
from validation.context import ValidationContext
from validation.report import Severity

CATEGORY = "serving"
NO_EFFECT_LOGIT_DIFFERENCE = 1e-6


def check_serving(ctx: ValidationContext) -> None:
    if ctx.config is None:
        return
    try:
        check_servable(ctx.config)
    except PeftServeError as exc:
        ctx.add(
            Severity.ERROR,
            CATEGORY,
            f"peftserve cannot serve it: {exc}",
            "serve a supported type (see docs/adapters.md for the supported types) or convert the adapter",
        )
        return
    if ctx.has_errors() or ctx.base is None:
        return  # the conversion below would only repeat the errors already found
    try:
        weights = convert_adapter(ctx.config, ctx.tensors, ctx.base.shape)  # on the meta device: no memory
    except PeftServeError as exc:
        ctx.add(
            Severity.ERROR, CATEGORY, f"peftserve refuses it: {exc}", "fix what the message names and validate again"
        )
        return
    parameters = sum(t.numel() for t in weights.tensors())
    served_bytes = parameters * torch.empty(0, dtype=ctx.options.serving_dtype).element_size()
    ctx.report.facts["serving_parameters"] = parameters
    ctx.report.facts["serving_bytes"] = served_bytes
    limit = ctx.options.max_adapter_memory_mb
    if limit is not None and served_bytes > limit * 1024 * 1024:
        ctx.add(
            Severity.ERROR,
            CATEGORY,
            f"needs {served_bytes / 2**20:.1f} MiB, more than the adapter cache ({limit} MiB)",
            "raise max_adapter_memory_mb in config.pbtxt or serve a smaller rank",
        )
    ranks = [d.lora_a.shape[1] for d in weights.modules.values() if d.lora_a is not None]
    if ranks and ctx.options.max_rank is not None and max(ranks) > ctx.options.max_rank:
        ctx.add(
            Severity.ERROR,
            CATEGORY,
            f"rank {max(ranks)} exceeds the serving limit {ctx.options.max_rank}",
            "retrain with a smaller r or raise the deployment's rank limit",
        )


def check_smoke_load(ctx: ValidationContext) -> None:
    """With --load: load the real base model and the adapter, generate once, and time it."""
    if not ctx.options.load or ctx.has_errors():
        return
    engine = Engine(ServeConfig(base_model=ctx.base_model_name, adapter_repository=str(ctx.adapter_dir.parent)))
    started = time.perf_counter()
    try:  # the check a server runs before a version serves: finite logits and the shipped golden prompts
        _, weights = engine.prepare_version(AdapterVersion(ctx.adapter_dir.name, 0, ctx.adapter_dir))
    except AdapterLoadError as exc:
        ctx.add(Severity.ERROR, CATEGORY, str(exc), "fix the weights or the golden.json that ships with them")
        return
    ctx.report.facts["load_ms"] = round(1000 * (time.perf_counter() - started), 1)
    ctx.report.facts["loaded_bytes"] = weights.nbytes
    prompt_ids = engine.tokenizer(ctx.options.prompt).input_ids
    base_row = GenerationRow(prompt_ids, None, max_new_tokens=1, keep_prompt_logits=True)
    adapter_row = GenerationRow(prompt_ids, weights, max_new_tokens=16, keep_prompt_logits=True)
    base, output = engine.batcher.run_rows([base_row, adapter_row])
    difference = float((base.prompt_logits - output.prompt_logits).abs().max())
    ctx.report.facts["max_logit_change"] = round(difference, 4)
    ctx.report.facts["sample_output"] = engine.tokenizer.decode(output.token_ids, skip_special_tokens=True)
    if difference < NO_EFFECT_LOGIT_DIFFERENCE:
        ctx.add(
            Severity.WARNING,
            CATEGORY,
            "the adapter does not change the model's output",
            "it looks untrained, or its scaling is zero",
        )
