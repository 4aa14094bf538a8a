"""Triton glue for peft_llm: parse requests, call the peftserve engine, build responses.

Everything else lives in the ``peftserve`` package so it can be tested without Triton. A request may
carry several rows (its batch dimension); each Triton request gets exactly one response, an error one if
any of its rows is bad, and a bad request never fails the others in its batch.
"""

from __future__ import annotations

import functools
import json
import logging
from pathlib import Path

import numpy as np
import triton_python_backend_utils as pb_utils
from triton_metrics import TritonMetrics

from peftserve.config import from_parameters
from peftserve.engine import Completion, CompletionRequest, Engine
from peftserve.errors import InvalidRequestError, PeftServeError
from peftserve.hot_swap import AdapterWatcher
from peftserve.metrics import UNKNOWN_LABEL
from peftserve.scheduler import Scheduler, Submission

logger = logging.getLogger("peftserve.triton")

# Optional inputs: request field name and the Python type one element converts to.
_OPTIONAL_INPUTS = {
    "adapter_id": str,
    "max_tokens": int,
    "temperature": float,
    "top_p": float,
    "top_k": int,
    "seed": int,
    "ignore_eos": bool,
}


class TritonPythonModel:
    def initialize(self, args: dict) -> None:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
        model_config = json.loads(args["model_config"])
        config = from_parameters(model_config.get("parameters", {}), model_dir=Path(args["model_repository"]))
        device = f"cuda:{args['model_instance_device_id']}" if args["model_instance_kind"] == "GPU" else "cpu"
        logger.info("loading %s on %s", config.base_model, device)
        self.metrics = TritonMetrics(args["model_name"])
        engine = Engine(config, device=device, metrics=self.metrics)
        self.scheduler = Scheduler(engine)
        self.watcher = AdapterWatcher(engine, interval=config.adapter_poll_seconds)
        self.watcher.start()

    def execute(self, requests: list) -> None:
        """Every request is answered through its response sender (allowed for non-decoupled models since
        Triton 24.06): ready requests before this returns, requests waiting on an adapter load later, from
        the scheduler's loader thread, so a load never holds up the requests behind it."""
        submissions = []
        for request in requests:
            sender = request.get_response_sender()
            try:
                rows = _parse_request(request)
            except Exception as exc:  # one malformed request must not fail the batch
                if not isinstance(exc, PeftServeError):
                    logger.exception("cannot parse request")
                error = exc if isinstance(exc, PeftServeError) else PeftServeError(f"cannot parse request: {exc}")
                self.metrics.request_done(UNKNOWN_LABEL, error_code=error.triton_code, seconds=0.0, tokens=0)
                _send(sender, _error_response(error))
                continue
            submissions.append(Submission(rows, functools.partial(_answer, sender)))
        self.scheduler.submit(submissions)

    def finalize(self) -> None:
        self.watcher.stop()
        self.scheduler.close()


def _answer(sender, answers: list[Completion | PeftServeError]) -> None:
    failure = next((a for a in answers if isinstance(a, PeftServeError)), None)
    _send(sender, _error_response(failure) if failure else _success_response(answers))


def _send(sender, response) -> None:
    sender.send(response, flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)


def _parse_request(request) -> list[CompletionRequest]:
    text_tensor = pb_utils.get_input_tensor_by_name(request, "text_input")
    if text_tensor is None:  # Triton 24.10 passes requests without this required input through
        raise InvalidRequestError("missing required input text_input (TYPE_STRING, the prompt)")
    texts = text_tensor.as_numpy().reshape(-1)
    options: dict[str, list] = {}
    for name, convert in _OPTIONAL_INPUTS.items():
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


def _stop_strings(request, rows: int) -> list[tuple[str, ...]]:
    """The optional ``stop`` input: shape (rows, n), empty strings ignored."""
    tensor = pb_utils.get_input_tensor_by_name(request, "stop")
    if tensor is None:
        return [()] * rows
    values = tensor.as_numpy().reshape(rows, -1) if tensor.as_numpy().size else [[]] * rows
    return [tuple(s for s in (_convert("stop", v, str) for v in row) if s) for row in values]


def _convert(name: str, value, convert):
    if convert is str:
        try:
            return bytes(value).decode("utf-8")
        except UnicodeDecodeError as exc:
            raise InvalidRequestError(f"input {name} is not valid UTF-8") from exc
    return convert(value)


def _success_response(answers: list[Completion]):
    def column(values, dtype):
        return np.array(values, dtype=dtype).reshape(-1, 1)

    return pb_utils.InferenceResponse(
        output_tensors=[
            pb_utils.Tensor("text_output", column([a.text.encode("utf-8") for a in answers], np.object_)),
            pb_utils.Tensor("adapter_version", column([a.adapter_version.encode() for a in answers], np.object_)),
            pb_utils.Tensor("output_tokens", column([a.output_tokens for a in answers], np.int32)),
        ]
    )


def _error_response(error: PeftServeError):
    code = getattr(pb_utils.TritonError, error.triton_code, pb_utils.TritonError.INTERNAL)
    return pb_utils.InferenceResponse(output_tensors=[], error=pb_utils.TritonError(str(error), code))
