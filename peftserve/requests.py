"""The request and answer types of the engine, free of torch and transformers.

Both are derived from the contract (:mod:`peftserve.contract`): a request has one field per input row
tensor (``text`` for ``text_input``), an answer one per output (``text`` for ``text_output``) plus its
finish reason, so a tensor added to the table is a field here at once. The weightless ``peft_llm``
forwarder and the Triton tensor parsing import these without loading the model stack; the engine, the
batcher and the tools share them.
"""

from __future__ import annotations

from dataclasses import field, make_dataclass

from peftserve.contract import INPUTS, OUTPUTS, TensorSpec


def _fields(specs: tuple[TensorSpec, ...]) -> list[tuple]:
    """Required tensors first, as positional fields in table order; then the optional ones with their defaults."""
    required = [(spec.attribute, spec.annotation) for spec in specs if not spec.optional]
    optional = [
        (spec.attribute, spec.annotation, field(default=spec.default))
        for spec in specs
        if spec.optional and spec.attribute
    ]
    return required + optional


CompletionRequest = make_dataclass("CompletionRequest", _fields(INPUTS), frozen=True)
CompletionRequest.__module__ = __name__
CompletionRequest.__doc__ = """One request row as the client sent it: one field per input of the contract.

An absent optional input has its contract default (``None`` where absence has a meaning of its own, e.g.
``max_tokens`` takes the ``default_max_tokens`` setting, ``seed`` a fresh draw). ``text`` is the prompt as
sent (bytes from Triton), decoded by the engine."""

Completion = make_dataclass("Completion", [*_fields(OUTPUTS), ("finish_reason", str)], frozen=True)
Completion.__module__ = __name__
Completion.__doc__ = """One answer row: one field per output of the contract, and why generation ended ("stop" or
"length")."""
