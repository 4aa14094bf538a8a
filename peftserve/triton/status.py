"""The status request: a ``peftserve_status`` request parameter that asks for the adapter status document.

Triton 24.10's Python backend cannot add HTTP endpoints, so the status travels as an ordinary inference
request to the public model, with the request parameter ``peftserve_status: true``: it passes the same
guards as every request (the inference key when one is configured), and is answered from the engine's
``execute`` with one JSON document (:class:`~peftserve.adapter_status.ServerStatus`) in ``text_output``,
without running the model, so it answers while a swap or a long batch is in flight. ``text_input`` is
required by the contract: send an empty string; the other inputs are ignored.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import triton_python_backend_utils as pb_utils

from peftserve.adapter_status import STATUS_PARAMETER, ServerStatus
from peftserve.errors import InvalidRequestError, PeftServeError
from peftserve.requests import Completion
from peftserve.triton.io import error_response, request_parameters, success_response

logger = logging.getLogger("peftserve.triton")


def status_parameter(request) -> dict[str, object]:
    """The request's ``peftserve_status`` parameter, as ``peft_llm`` forwards it to the engine's model."""
    parameters = request_parameters(request)
    return {STATUS_PARAMETER: parameters[STATUS_PARAMETER]} if STATUS_PARAMETER in parameters else {}


def status_reply(request, status: Callable[[], ServerStatus], *, tag_errors: bool):
    """The response to a status request, or None when ``request`` is not one (an ordinary completion)."""
    value = request_parameters(request).get(STATUS_PARAMETER, False)
    if value is False:
        return None
    if value is not True:
        error = InvalidRequestError(f"request parameter {STATUS_PARAMETER} must be true or false, got {value!r}")
        return error_response(error, tag_code=tag_errors)
    text_input = pb_utils.get_input_tensor_by_name(request, "text_input")
    rows = max(1, text_input.as_numpy().size) if text_input is not None else 1
    try:
        document = status().to_json()
    except Exception as exc:  # the model's execute must go on to the other requests whatever happens here
        logger.exception("building the status document failed")
        return error_response(PeftServeError(f"cannot build the status document: {exc}"), tag_code=tag_errors)
    # Every row answers with the document, no adapter and no tokens; finish_reason travels in no tensor.
    answer = Completion(text=document, adapter_version="", output_tokens=0, finish_reason="status")
    return success_response([answer] * rows)
