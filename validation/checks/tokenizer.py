"""Tokenizer: vocabulary and special tokens of a tokenizer shipped with the adapter, resized embeddings."""

from __future__ import annotations

from transformers import AutoTokenizer

from validation.context import ValidationContext
from validation.report import Severity

CATEGORY = "tokenizer"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")
EMBEDDING_SUFFIXES = ("embed_tokens.weight", "lm_head.weight", "wte.weight", "lora_embedding_A", "lora_embedding_B")


def check_tokenizer(ctx: ValidationContext) -> None:
    base = ctx.base
    if base is None:
        return
    if base.tokenizer_vocab is not None and base.tokenizer_vocab > base.vocab_size:
        ctx.add(
            Severity.WARNING,
            CATEGORY,
            f"the base tokenizer has {base.tokenizer_vocab} tokens, its embeddings only {base.vocab_size}",
            "tokens beyond the embeddings cannot be generated; resize the base model's embeddings",
        )
    _check_embedding_sizes(ctx)
    if any((ctx.adapter_dir / name).is_file() for name in TOKENIZER_FILES):
        _check_shipped_tokenizer(ctx)
    if (ctx.config or {}).get("trainable_token_indices"):
        ctx.add(
            Severity.WARNING,
            CATEGORY,
            "trainable_token_indices changes embedding rows of the base model",
            "the server applies adapters per request and does not swap embedding rows",
        )


def _check_embedding_sizes(ctx: ValidationContext) -> None:
    vocab = ctx.base.vocab_size
    for key, shape in ctx.tensor_shapes.items():
        if not key.endswith(EMBEDDING_SUFFIXES):
            continue
        rows = shape[1] if "lora_embedding_A" in key else shape[0]
        if rows != vocab:
            ctx.add(
                Severity.ERROR,
                CATEGORY,
                f"{key} has {rows} vocabulary rows, the base model has {vocab} (resized embeddings)",
                "resize the base model's embeddings to the adapter's tokenizer, or retrain without added tokens",
            )


def _check_shipped_tokenizer(ctx: ValidationContext) -> None:
    try:
        tokenizer = AutoTokenizer.from_pretrained(ctx.adapter_dir, trust_remote_code=False, local_files_only=True)
    except (OSError, ValueError) as exc:
        ctx.add(
            Severity.ERROR,
            CATEGORY,
            f"the tokenizer shipped with the adapter cannot be read: {exc}",
            "re-save it with save_pretrained or remove it",
        )
        return
    base = ctx.base
    if base.tokenizer_vocab is not None and len(tokenizer) != base.tokenizer_vocab:
        added = len(tokenizer) - base.tokenizer_vocab
        severity = Severity.ERROR if len(tokenizer) > base.vocab_size else Severity.WARNING
        ctx.add(
            severity,
            CATEGORY,
            f"the adapter's tokenizer has {len(tokenizer)} tokens, the base's {base.tokenizer_vocab} ({added:+d})",
            "serve with the tokenizer the adapter was trained with, and embeddings of that size",
        )
    differing = {
        name: (value, base.special_tokens.get(name))
        for name, value in tokenizer.special_tokens_map.items()
        if name in base.special_tokens and base.special_tokens[name] != value
    }
    for name, (ours, theirs) in differing.items():
        ctx.add(
            Severity.WARNING,
            CATEGORY,
            f"special token {name} is {ours!r} in the adapter, {theirs!r} in the base",
            "the server uses the base tokenizer; generation may not stop where the adapter expects",
        )
