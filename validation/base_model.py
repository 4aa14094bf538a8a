"""What the validator knows about a base model, read from its config alone (weights never loaded).

The model is instantiated on the ``meta`` device, which gives every module name and parameter shape
without allocating memory; no code from the model repository runs (``trust_remote_code=False``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PretrainedConfig, PreTrainedModel

from peftserve.adapter_weights import BaseModelShape


class BaseModelUnavailable(RuntimeError):
    """The base model's config (or tokenizer) cannot be read locally."""


@dataclass
class BaseModelInfo:
    name: str
    config: PretrainedConfig
    meta_model: PreTrainedModel
    shape: BaseModelShape
    tokenizer_vocab: int | None
    special_tokens: dict[str, Any]
    chat_template: str | dict[str, str] | None = None
    token_ids: dict[str, int] = field(default_factory=dict)  # the base tokenizer's vocabulary

    @property
    def model_type(self) -> str:
        return self.config.model_type

    @property
    def architectures(self) -> list[str]:
        return list(self.config.architectures or [])

    @property
    def vocab_size(self) -> int:
        return self.config.get_text_config().vocab_size


def inspect_base_model(name_or_path: str) -> BaseModelInfo:
    try:
        config = AutoConfig.from_pretrained(name_or_path, trust_remote_code=False, local_files_only=True)
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config, trust_remote_code=False)
    except (OSError, ValueError) as exc:
        raise BaseModelUnavailable(f"cannot read base model {name_or_path!r}: {exc}") from exc
    info = BaseModelInfo(
        name=str(name_or_path),
        config=config,
        meta_model=model,
        shape=BaseModelShape.describe(model),
        tokenizer_vocab=None,
        special_tokens={},
    )
    _add_tokenizer_facts(info, name_or_path)
    return info


def _add_tokenizer_facts(info: BaseModelInfo, name_or_path: str | Path) -> None:
    try:
        tokenizer = AutoTokenizer.from_pretrained(name_or_path, trust_remote_code=False, local_files_only=True)
    except (OSError, ValueError):
        return
    info.tokenizer_vocab = len(tokenizer)
    info.special_tokens = dict(tokenizer.special_tokens_map)
    info.chat_template = tokenizer.chat_template or None
    info.token_ids = tokenizer.get_vocab()
