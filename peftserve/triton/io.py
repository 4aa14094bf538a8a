"""Triton requests in, Triton responses out: the tensors of the public contract and their errors.

A request may carry several rows (its batch dimension); every optional input then has as many rows.
"""

from __future__ import annotations

import json
import re

import numpy as np
import triton_python_backend_utils as pb_utils

from peftserve.contract import INPUTS, OUTPUTS, STREAM, TensorSpec
from peftserve.errors import InvalidRequestError, PeftServeError
from peftserve.requests import Completion, CompletionRequest

# The row tensors of a request, by CompletionRequest field; the first (required) one sets the row count.
_ROW_INPUTS = [spec for spec in INPUTS if spec.attribute]


def parse_request(request) -> list[CompletionRequest]:
    """One CompletionRequest per row; absent optional inputs keep their contract defaults."""
    columns: dict[str, list] = {}
    rows: int | None = None
    for spec in _ROW_INPUTS:
        tensor = pb_utils.get_input_tensor_by_name(request, spec.name)
        if tensor is None:
            if not spec.optional:  # Triton 24.10 passes requests without a required input through
                raise InvalidRequestError(f"missing required input {spec.name} ({spec.data_type}, {spec.meaning})")
            continue
        values = tensor.as_numpy()
        rows = values.reshape(-1).size if rows is None else rows
        columns[spec.attribute] = _column_values(spec, values, rows)
    return [CompletionRequest(**{name: values[i] for name, values in columns.items()}) for i in range(rows or 0)]


def _column_values(spec: TensorSpec, values, rows: int) -> list:
    """The input's value for each row: one element, or a tuple of the non-empty ones for a list input."""
    if spec.is_list:
        if values.size == 0:
            return [spec.default] * rows
        if values.size % rows:
            raise InvalidRequestError(f"input {spec.name} has {values.size} elements, not a list per row of {rows}")
        return [tuple(v for v in (_convert(spec, v) for v in row) if v) for row in values.reshape(rows, -1)]
    values = values.reshape(-1)
    if len(values) != rows:
        raise InvalidRequestError(f"input {spec.name} has {len(values)} elements, {_ROW_INPUTS[0].name} has {rows}")
    return [_convert(spec, value) for value in values]


def wants_stream(request) -> bool:
    """The optional ``stream`` input of peft_llm_stream (one value for the whole request)."""
    tensor = pb_utils.get_input_tensor_by_name(request, STREAM.name)
    return STREAM.default if tensor is None else bool(tensor.as_numpy().reshape(-1)[0])


def _convert(spec: TensorSpec, value):
    python = spec.type.python
    if python is not str:
        return python(value)
    if not spec.decode:
        return bytes(value)
    try:
        return bytes(value).decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InvalidRequestError(f"input {spec.name} is not valid UTF-8") from exc


def _output_tensor(spec: TensorSpec, values: list):
    if spec.type.python is str:
        values = [value.encode("utf-8") for value in values]
    return pb_utils.Tensor(spec.name, np.array(values, dtype=spec.type.numpy).reshape(-1, 1))


def success_response(answers: list[Completion]):
    """The final response of a request: every output of the contract, one row per answer."""
    return pb_utils.InferenceResponse(
        output_tensors=[_output_tensor(spec, [getattr(a, spec.attribute) for a in answers]) for spec in OUTPUTS]
    )


def piece_response(piece: str, adapter_version: str):
    """One streamed piece of text (not final): the outputs known before the row ends."""
    known = {"text_output": piece, "adapter_version": adapter_version}
    return pb_utils.InferenceResponse(
        output_tensors=[_output_tensor(spec, [known[spec.name]]) for spec in OUTPUTS if spec.name in known]
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


def request_parameters(request) -> dict[str, object]:
    """The request's parameters (Triton hands them over as JSON); empty when absent or not an object."""
    try:
        parameters = json.loads(request.parameters() or "{}")
    except (ValueError, AttributeError):
        return {}
    return parameters if isinstance(parameters, dict) else {}


def is_forwarded(request) -> bool:
    return bool(request_parameters(request).get(FORWARDED_PARAMETER))
