"""Triton glue for peft_llm_stream: the engine, its continuous batcher and the adapter watcher live here.

Each request becomes one :class:`Work` in the batcher; with ``stream`` true its text arrives as a
response per piece and a final response, otherwise as one final response. A client that cancels (or
disconnects) is noticed at the next decoding step and its row leaves the batch.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import replace

import triton_python_backend_utils as pb_utils

from peftserve.adapter_status import server_status
from peftserve.continuous import Work, run_torch_single_threaded
from peftserve.engine import Engine
from peftserve.errors import InvalidRequestError, PeftServeError
from peftserve.gc_pauses import GcPauses
from peftserve.hot_swap import AdapterWatcher
from peftserve.metrics import UNKNOWN_LABEL
from peftserve.requests import Completion
from peftserve.triton.io import (
    error_response,
    is_forwarded,
    parse_request,
    piece_response,
    success_response,
    wants_stream,
)
from peftserve.triton.metrics import TritonMetrics
from peftserve.triton.response_loop import ResponseLoop
from peftserve.triton.startup import freeze_startup_objects, start_model
from peftserve.triton.status import status_reply
from peftserve.triton.stub_watch import watch_through_triton

logger = logging.getLogger("peftserve.triton")
FINAL = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL


class TritonPythonModel:
    def initialize(self, args: dict) -> None:
        config = start_model(args)  # peft_llm's settings (this model's engine_config parameter)
        device = f"cuda:{args['model_instance_device_id']}" if args["model_instance_kind"] == "GPU" else "cpu"
        logger.info("loading %s on %s", config.base_model, device)
        self.gc_pauses = GcPauses()
        self.responses = ResponseLoop(final_flag=FINAL, every_poll=self._every_poll)
        self.metrics = TritonMetrics(config.served_model, run=self.responses.call)
        run_torch_single_threaded()  # before any torch work here: this thread hands requests over
        engine = Engine(config, device=device, metrics=self.metrics)
        logger.info("loaded %s on %s as %s", config.base_model, device, engine.model.dtype)
        self.batcher = engine.batcher
        self.watcher = AdapterWatcher(engine, interval=config.adapter_poll_seconds)
        self.watcher.start()
        # The public model may die with its stub (Triton neither restarts it nor reports it unready).
        self.forwarder_watch = watch_through_triton(config.served_model, args["model_repository"])
        freeze_startup_objects()
        self.gc_pauses.start()  # serving's pauses, not start-up's
        version = int(args["model_version"])
        self.status = lambda: server_status(engine, model=config.served_model, model_version=version)

    def execute(self, requests: list) -> None:
        """Hand every row to the batcher and return at once; responses go out from its loop thread."""
        for request in requests:
            sender = request.get_response_sender()
            tag = is_forwarded(request)
            status = status_reply(request, self.status, tag_errors=tag)  # answered here, the model never runs
            if status is not None:
                self.responses.send(sender, status, FINAL)
                continue
            try:
                rows, stream = parse_request(request), wants_stream(request)
                if stream and len(rows) != 1:
                    raise InvalidRequestError(f"stream=true needs exactly one row per request, got {len(rows)}")
            except Exception as exc:  # one malformed request must not fail the others
                if not isinstance(exc, PeftServeError):
                    logger.exception("cannot parse request")
                error = exc if isinstance(exc, PeftServeError) else PeftServeError(f"cannot parse request: {exc}")
                self.metrics.request_done(UNKNOWN_LABEL, error_code=error.triton_code, seconds=0.0, tokens=0)
                self.responses.send(sender, error_response(error, tag_code=tag), FINAL)
                continue
            gather = _Gather(self.responses, sender, len(rows), stream=stream, tag_errors=tag)
            cancelled = self.responses.watch(sender)
            works = [Work(row, on_done=gather.callback(i), is_cancelled=cancelled.is_set) for i, row in enumerate(rows)]
            if stream:
                works[0].on_text = _streamer(self.responses, sender, works[0])
            self.batcher.submit(*works)

    def _every_poll(self) -> None:
        """On the response thread: metrics gathered since the last poll."""
        for generation, seconds in self.gc_pauses.drain():
            self.metrics.gc_pause(generation, seconds=seconds)
        self.metrics.publish_inflight()

    def finalize(self) -> None:
        self.gc_pauses.stop()
        self.forwarder_watch.stop()
        self.watcher.stop()
        self.batcher.close()
        self.responses.close()


def _streamer(responses: ResponseLoop, sender, work: Work):
    def send_piece(piece: str) -> None:
        responses.send(sender, piece_response(piece, work.version.label if work.version else ""))

    return send_piece


class _Gather:
    """Collects the answers of one request's rows and sends the final response once all are in.

    A streamed request has one row, whose final response carries the last piece (possibly empty) and
    the token count; its earlier pieces went out as they came.
    """

    def __init__(self, responses: ResponseLoop, sender, rows: int, *, stream: bool, tag_errors: bool) -> None:
        self.responses = responses
        self.sender = sender
        self.stream = stream
        self.tag_errors = tag_errors
        self.answers: list[Completion | PeftServeError | None] = [None] * rows
        self.missing = rows
        self._lock = threading.Lock()  # answers come from the batcher's loop and from submit (refusals)

    def callback(self, index: int):
        def done(answer: Completion | PeftServeError) -> None:
            with self._lock:
                self.answers[index] = answer
                self.missing -= 1
                if self.missing:
                    return
            self._send()

        return done

    def _send(self) -> None:
        failure = next((a for a in self.answers if isinstance(a, PeftServeError)), None)
        if failure is not None:
            self.responses.send(self.sender, error_response(failure, tag_code=self.tag_errors), FINAL)
            return
        answers = [replace(a, text="") for a in self.answers] if self.stream else self.answers  # text already sent
        self.responses.send(self.sender, success_response(answers), FINAL)
