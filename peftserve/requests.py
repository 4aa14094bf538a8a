"""The request and answer types of the engine, free of torch and transformers.

The weightless ``peft_llm`` forwarder and the Triton tensor parsing import these without loading the
model stack; the engine, the batcher and the tools share them.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class CompletionRequest:
    """One request as the client sent it; ``None`` means the optional input was absent."""

    text: str | bytes
    adapter_id: str = ""
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    seed: int | None = None
    ignore_eos: bool | None = None  # generate exactly max_tokens (benchmarks compare equal work)
    stop: tuple[str, ...] = ()  # generation ends at the first of these; the match is not returned
    messages: str | None = None  # chat: JSON list of {role, content}, rendered with the chat template


@dataclass(frozen=True)
class Completion:
    text: str
    adapter_version: str  # "<adapter_id>@<version>", empty for the base model
    output_tokens: int
    finish_reason: str
