"""The public contract of the Triton models: every input and output tensor, declared once.

Everything else derives from this table: the ``input``/``output`` blocks of both ``config.pbtxt`` files and
``docs/reference/contract.md`` (written by ``python -m tools.reference_docs``, checked by a unit test), the
request and answer types (:mod:`peftserve.requests`) and the tensor parsing (:mod:`peftserve.triton.io`).
Tensor names and types are public API: add tensors, never rename one or change its type.

Free of torch and transformers: the weightless ``peft_llm`` forwarder imports it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

# The model clients call (non-decoupled; it forwards every request) and the model that holds the engine.
FORWARDER_MODEL = "peft_llm"
ENGINE_MODEL = "peft_llm_stream"


@dataclass(frozen=True)
class TritonType:
    """One Triton data type under its three names, and the Python type one element becomes."""

    config_name: str  # data_type in config.pbtxt
    datatype: str  # in model metadata and in a client's InferInput
    python: type
    numpy: Any


TRITON_TYPES = {
    t.config_name: t
    for t in (
        TritonType("TYPE_STRING", "BYTES", str, np.object_),
        TritonType("TYPE_BOOL", "BOOL", bool, np.bool_),
        TritonType("TYPE_INT32", "INT32", int, np.int32),
        TritonType("TYPE_INT64", "INT64", int, np.int64),
        TritonType("TYPE_FP32", "FP32", float, np.float32),
    )
}


@dataclass(frozen=True)
class TensorSpec:
    """One tensor of the contract. ``dims`` excludes the batch dimension: ``(1,)`` is one value per row,
    ``(-1,)`` a list per row (padded with empty strings)."""

    name: str
    data_type: str
    dims: tuple[int, ...]
    meaning: str
    optional: bool = False
    default: Any = None  # the request field's value when the input is absent
    absent: str = ""  # what absence means, where the default value alone does not say it
    field: str | None = ""  # the request or answer attribute ("": the tensor's name; None: not per row)
    decode: bool = True  # strings: decoded from UTF-8 by the parser (False: handed on as bytes)

    def __post_init__(self) -> None:
        """An entry the parser and the config files cannot express stops the import, naming the tensor."""
        if self.data_type not in TRITON_TYPES:
            raise ValueError(f"tensor {self.name}: data_type {self.data_type} is not one of {sorted(TRITON_TYPES)}")
        if self.dims not in ((1,), (-1,)):
            raise ValueError(f"tensor {self.name}: dims {list(self.dims)} are neither [1] nor [-1]")

    @property
    def type(self) -> TritonType:
        return TRITON_TYPES[self.data_type]

    @property
    def attribute(self) -> str | None:
        """The request or answer attribute that holds the tensor's value per row (None: not a row value)."""
        return self.name if self.field == "" else self.field

    @property
    def is_list(self) -> bool:
        return self.dims == (-1,)

    @property
    def annotation(self) -> Any:
        """The Python type of its request or answer attribute."""
        element: Any = self.type.python
        if element is str and not self.decode:
            element = str | bytes
        if self.is_list:
            return tuple[element, ...]
        return element | None if self.optional and self.default is None else element


def _optional(name: str, data_type: str, meaning: str, default: Any = None, *, absent: str = "", dims=(1,)):
    return TensorSpec(name, data_type, tuple(dims), meaning, optional=True, default=default, absent=absent)


INPUTS: tuple[TensorSpec, ...] = (
    TensorSpec(
        "text_input",
        "TYPE_STRING",
        (1,),
        "the prompt (UTF-8); empty when `messages` is sent",
        field="text",
        decode=False,  # the engine decodes it and names the byte that is not UTF-8
    ),
    _optional(
        "adapter_id",
        "TYPE_STRING",
        "the adapter for this request (a plain name of at most 64 characters); empty: the base model",
        "",
        absent="base model",
    ),
    _optional(
        "max_tokens",
        "TYPE_INT32",
        "new tokens to generate, at most the `max_tokens_limit` setting",
        absent="the `default_max_tokens` setting",
    ),
    _optional("temperature", "TYPE_FP32", "sampling temperature, 0 to 100; 0: greedy", 0.0),
    _optional(
        "top_p", "TYPE_FP32", "nucleus sampling: smallest set of tokens whose probability reaches it, (0, 1]", 1.0
    ),
    _optional("top_k", "TYPE_INT32", "sample among the k most likely tokens; 0: no limit", 0),
    _optional(
        "seed",
        "TYPE_INT64",
        "reproducible sampling: the same seed gives the same text in any batch",
        absent="a fresh draw per request",
    ),
    _optional(
        "ignore_eos",
        "TYPE_BOOL",
        "generate exactly `max_tokens`, past end-of-sequence (benchmarks comparing equal work)",
        False,
    ),
    _optional(
        "stop",
        "TYPE_STRING",
        "stop strings: generation ends at the first match, which is not returned (at most the `max_stop_strings` "
        "setting, each at most `max_stop_string_bytes`); empty strings are padding",
        (),
        absent="none",
        dims=(-1,),
    ),
    _optional(
        "messages",
        "TYPE_STRING",
        'chat: JSON list of `{"role": "system"|"user"|"assistant", "content": "..."}`, rendered with the base '
        "tokenizer's chat template; `text_input` must then be empty",
        absent="`text_input` is the prompt",
    ),
)

# Only the decoupled engine model can answer in pieces; one value for the whole request, not per row.
STREAM = TensorSpec(
    "stream",
    "TYPE_BOOL",
    (1,),
    "send each piece of text as a response as soon as it is safe to send, then a final response; needs exactly "
    "one row per request",
    optional=True,
    default=False,
    field=None,
)

OUTPUTS: tuple[TensorSpec, ...] = (
    TensorSpec("text_output", "TYPE_STRING", (1,), "generated text only, without the prompt", field="text"),
    TensorSpec(
        "adapter_version", "TYPE_STRING", (1,), "`<adapter_id>@<version>` that served the row; empty for the base model"
    ),
    TensorSpec(
        "output_tokens",
        "TYPE_INT32",
        (1,),
        "tokens generated for `text_output` (an end-of-sequence token is not counted); absent from streamed pieces "
        "before the final response",
    ),
)

INPUT_SPECS: dict[str, TensorSpec] = {spec.name: spec for spec in (*INPUTS, STREAM)}
MODEL_INPUTS: dict[str, tuple[TensorSpec, ...]] = {FORWARDER_MODEL: INPUTS, ENGINE_MODEL: (*INPUTS, STREAM)}
MODEL_OUTPUTS: dict[str, tuple[TensorSpec, ...]] = {FORWARDER_MODEL: OUTPUTS, ENGINE_MODEL: OUTPUTS}
OUTPUT_NAMES: tuple[str, ...] = tuple(spec.name for spec in OUTPUTS)
