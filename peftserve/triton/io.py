"""Triton requests in, Triton responses out: the tensors of the public contract and their errors.

A request may carry several rows (its batch dimension); every optional input then has as many rows.
"""

from __future__ import annotations

import json
import re

import numpy as np
import triton_python_backend_utils as pb_utils

from peftserve.errors import InvalidRequestError, PeftServeError
from peftserve.requests import Completion, CompletionRequest

# Optional inputs: request field name and the Python type one element converts to.
OPTIONAL_INPUTS = {
    "adapter_id": str,
    "max_tokens": int,
    "temperature": float,
    "top_p": float,
    "top_k": int,
    "seed": int,
    "ignore_eos": bool,
    "messages": str,
}
OUTPUT_NAMES = ["text_output", "adapter_version", "output_tokens"]


def parse_request(request) -> list[CompletionRequest]:
    text_tensor = pb_utils.get_input_tensor_by_name(request, "text_input")
    if text_tensor is None:  # Triton 24.10 passes requests without this required input through
        raise InvalidRequestError("missing required input text_input (TYPE_STRING, the prompt)")
    texts = text_tensor.as_numpy().reshape(-1)
    options: dict[str, list] = {}
    for name, convert in OPTIONAL_INPUTS.items():
        tensor = pb_utils.get_input_tensor_by_name(request, name)
        if tensor is None:
            continue
        values = tensor.as_numpy().reshape(-1)
        if len(values) != len(texts):
            raise InvalidRequestError(f"input {name} has {len(values)} elements, text_input has {len(texts)}")
        options[name] = [_convert(name, value, convert) for value in values]
    stops = _stop_strings(request, len(texts))
    return [
        CompletionRequest(text=bytes(text), stop=stops[i], **{name: values[i] for name, values in options.items()})
        for i, text in enumerate(texts)
    ]


def wants_stream(request) -> bool:
    """The optional ``stream`` input of peft_llm_stream (one value for the whole request)."""
    tensor = pb_utils.get_input_tensor_by_name(request, "stream")
    return tensor is not None and bool(tensor.as_numpy().reshape(-1)[0])


def _stop_strings(request, rows: int) -> list[tuple[str, ...]]:
    """The optional ``stop`` input: shape (rows, n), empty strings ignored."""
    tensor = pb_utils.get_input_tensor_by_name(request, "stop")
    if tensor is None or tensor.as_numpy().size == 0:
        return [()] * rows
    values = tensor.as_numpy().reshape(rows, -1)
    return [tuple(s for s in (_convert("stop", v, str) for v in row) if s) for row in values]


def _convert(name: str, value, convert):
    if convert is str:
        try:
            return bytes(value).decode("utf-8")
        except UnicodeDecodeError as exc:
            raise InvalidRequestError(f"input {name} is not valid UTF-8") from exc
    return convert(value)


def _column(values, dtype) -> np.ndarray:
    return np.array(values, dtype=dtype).reshape(-1, 1)


def success_response(answers: list[Completion]):
    return pb_utils.InferenceResponse(
        output_tensors=[
            pb_utils.Tensor("text_output", _column([a.text.encode("utf-8") for a in answers], np.object_)),
            pb_utils.Tensor("adapter_version", _column([a.adapter_version.encode() for a in answers], np.object_)),
            pb_utils.Tensor("output_tokens", _column([a.output_tokens for a in answers], np.int32)),
        ]
    )


def piece_response(piece: str, adapter_version: str):
    """One streamed piece of text (not final)."""
    return pb_utils.InferenceResponse(
        output_tensors=[
            pb_utils.Tensor("text_output", _column([piece.encode("utf-8")], np.object_)),
            pb_utils.Tensor("adapter_version", _column([adapter_version.encode()], np.object_)),
        ]
    )


# BLS in Triton 24.10 hands the caller every error as INTERNAL; forwarded requests carry their code in the
# message as "[CODE] message", which the forwarding model turns back into the code.
FORWARDED_PARAMETER = "peftserve_forwarded"
_TAGGED = re.compile(r"\[([A-Z_]+)\] (.*)", re.S)


def error_response(error: PeftServeError, *, tag_code: bool = False):
    code = getattr(pb_utils.TritonError, error.triton_code, pb_utils.TritonError.INTERNAL)
    message = f"[{error.triton_code}] {error}" if tag_code else str(error)
    return pb_utils.InferenceResponse(output_tensors=[], error=pb_utils.TritonError(message, code))


def untag_error(message: str):
    """The TritonError a forwarded request's tagged error message stands for."""
    match = _TAGGED.fullmatch(message)
    if match is None:
        return pb_utils.TritonError(message, pb_utils.TritonError.INTERNAL)
    return pb_utils.TritonError(match[2], getattr(pb_utils.TritonError, match[1], pb_utils.TritonError.INTERNAL))


def is_forwarded(request) -> bool:
    try:
        return bool(json.loads(request.parameters() or "{}").get(FORWARDED_PARAMETER))
    except (ValueError, AttributeError):
        return False
