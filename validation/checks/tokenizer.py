"""Tokenizer: vocabulary, added and special tokens and the chat template of a tokenizer shipped with the
adapter, against the base model's (which the server always uses); resized embeddings."""

from __future__ import annotations

import json
from pathlib import Path

from transformers import AutoTokenizer

from validation.context import ValidationContext
from validation.report import Severity

CATEGORY = "tokenizer"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")
# Where save_pretrained puts a chat template (transformers 5: the .jinja file) when it ships alone.
TEMPLATE_FILES = ("chat_template.jinja", "chat_template.json")
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
    elif any((ctx.adapter_dir / name).is_file() for name in TEMPLATE_FILES):
        _check_chat_template(ctx, _read_template_file(ctx))
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
    _check_added_tokens(ctx, tokenizer.get_added_vocab())
    _check_chat_template(ctx, tokenizer.chat_template)


def _check_added_tokens(ctx: ValidationContext, added: dict[str, int]) -> None:
    """A token both tokenizers know must have the same id: the server encodes with the base's."""
    for token, token_id in sorted(added.items(), key=lambda item: item[1]):
        base_id = ctx.base.token_ids.get(token)
        if base_id is not None and base_id != token_id:
            ctx.add(
                Severity.ERROR,
                CATEGORY,
                f"added token {token!r} has id {token_id} in the adapter's tokenizer, {base_id} in the base's",
                "retrain the adapter with the base model's tokenizer (the server encodes with the base's ids)",
            )


def _check_chat_template(ctx: ValidationContext, template: str | dict | None) -> None:
    """The server renders ``messages`` with the base tokenizer's template, never with an adapter's."""
    if not template:
        return
    if not ctx.base.chat_template:
        ctx.add(
            Severity.WARNING,
            CATEGORY,
            "the adapter ships a chat template, the base model's tokenizer has none: chat requests (messages) "
            "are refused for this model",
            "add the template to the base model's tokenizer, or send prompts in text_input",
        )
    elif _normalised(template) != _normalised(ctx.base.chat_template):
        ctx.add(
            Severity.WARNING,
            CATEGORY,
            "the adapter's chat template differs from the base model's; the server renders messages with the "
            "base's, so chat requests to this adapter get a format it was not trained on",
            "train the adapter with the base model's chat template, or send prompts already formatted in text_input",
        )


def _normalised(template: str | dict) -> str | dict:
    return template.strip() if isinstance(template, str) else {k: v.strip() for k, v in template.items()}


def _read_template_file(ctx: ValidationContext) -> str | dict | None:
    jinja, as_json = Path(ctx.adapter_dir) / TEMPLATE_FILES[0], Path(ctx.adapter_dir) / TEMPLATE_FILES[1]
    try:
        if jinja.is_file():
            return jinja.read_text(encoding="utf-8")
        return json.loads(as_json.read_text(encoding="utf-8")).get("chat_template")
    except (OSError, UnicodeDecodeError, ValueError, AttributeError) as exc:
        ctx.add(
            Severity.ERROR,
            CATEGORY,
            f"the chat template shipped with the adapter cannot be read: {exc}",
            "re-save it with save_pretrained or remove it",
        )
        return None
