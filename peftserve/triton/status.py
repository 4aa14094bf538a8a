"""The status request: a ``peftserve_status`` request parameter that asks for the adapter status document.

Triton 24.10's Python backend cannot add HTTP endpoints, so the status travels as an ordinary inference
request to the public model, with the request parameter ``peftserve_status: true``: it passes the same
guards as every request (the inference key when one is configured), and is answered from the engine's
``execute`` with one JSON document (:class:`~peftserve.adapter_status.ServerStatus`) in ``text_output``,
without running the model, so it answers while a swap or a long batch is in flight. ``text_input`` is
required by the contract: send an empty string; the other inputs are ignored.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable

import numpy as np
import triton_python_backend_utils as pb_utils

from peftserve.adapter_status import STATUS_PARAMETER, ServerStatus
from peftserve.errors import InvalidRequestError, PeftServeError
from peftserve.triton.io import error_response

logger = logging.getLogger("peftserve.triton")


def status_parameter(request) -> dict[str, object]:
    """The request's ``peftserve_status`` parameter, as ``peft_llm`` forwards it to the engine's model."""
    parameters = _parameters(request)
    return {STATUS_PARAMETER: parameters[STATUS_PARAMETER]} if STATUS_PARAMETER in parameters else {}


def status_reply(request, status: Callable[[], ServerStatus], *, tag_errors: bool):
    """The response to a status request, or None when ``request`` is not one (an ordinary completion)."""
    value = _parameters(request).get(STATUS_PARAMETER, False)
    if value is False:
        return None
    if value is not True:
        error = InvalidRequestError(f"request parameter {STATUS_PARAMETER} must be true or false, got {value!r}")
        return error_response(error, tag_code=tag_errors)
    text_input = pb_utils.get_input_tensor_by_name(request, "text_input")
    rows = max(1, text_input.as_numpy().size) if text_input is not None else 1
    try:
        document = status().to_json().encode()
    except Exception as exc:  # the model's execute must go on to the other requests whatever happens here
        logger.exception("building the status document failed")
        return error_response(PeftServeError(f"cannot build the status document: {exc}"), tag_code=tag_errors)
    return pb_utils.InferenceResponse(
        output_tensors=[
            pb_utils.Tensor("text_output", np.full((rows, 1), document, dtype=np.object_)),
            pb_utils.Tensor("adapter_version", np.full((rows, 1), b"", dtype=np.object_)),
            pb_utils.Tensor("output_tokens", np.zeros((rows, 1), dtype=np.int32)),
        ]
    )


def _parameters(request) -> dict[str, object]:
    try:
        parameters = json.loads(request.parameters() or "{}")
    except (ValueError, AttributeError):
        return {}
    return parameters if isinstance(parameters, dict) else {}
