"""Triton glue for peft_llm: the non-decoupled face of the engine that lives in peft_llm_stream.

HTTP and gRPC infer, the generate endpoint and perf_analyzer need a non-decoupled model, and a decoupled
one (which streaming needs) cannot answer HTTP infer in Triton 24.10. So this model holds no weights:
each request is forwarded whole through BLS to peft_llm_stream (streaming off), on a thread of its own so
that the requests of one Triton batch run concurrently in the engine's continuous batch, and the answer
goes back through the request's response sender. Error codes pass through unchanged (tagged in the
message across the BLS hop, which loses them in 24.10).
"""

from __future__ import annotations

import functools
import logging
import threading

import triton_python_backend_utils as pb_utils

from peftserve.contract import OUTPUT_NAMES
from peftserve.triton.in_flight import InFlight
from peftserve.triton.io import FORWARDED_PARAMETER, untag_error
from peftserve.triton.startup import start_model
from peftserve.triton.status import status_parameter
from peftserve.triton.stub_watch import watch_through_triton

logger = logging.getLogger("peftserve.triton")
FINAL = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL
ENGINE_DIED = "the engine's model process died while this request was in it; it is being loaded again: retry"


class TritonPythonModel:
    def initialize(self, args: dict) -> None:
        config = start_model(args)
        self.in_flight = InFlight(config.forwarding_threads)
        self.forward = functools.partial(_forward, engine_model=config.engine_model, in_flight=self.in_flight)
        # The engine's model may die with its stub (Triton neither restarts it nor reports it unready, and
        # never ends the BLS calls in it): its requests are answered with an error, then it is loaded again.
        self.engine_watch = watch_through_triton(
            config.engine_model, args["model_repository"], on_death=lambda model: self.in_flight.fail_all(ENGINE_DIED)
        )

    def execute(self, requests: list) -> None:
        for request in requests:
            sender = request.get_response_sender()
            key = self.in_flight.enter(fail=functools.partial(_fail, sender))
            # A daemon thread: one blocked for good in a dead engine must not hold up the stub's exit.
            threading.Thread(target=self.forward, args=(request, sender, key), name="bls-forward", daemon=True).start()

    def finalize(self) -> None:
        self.engine_watch.stop()
        self.in_flight.wait_idle(timeout=60)


def _forward(request, sender, key: int, *, engine_model: str, in_flight: InFlight) -> None:
    """Forward on a thread of its own (BLS calls block until the engine answers) and reply from it, while
    ``request`` is still alive: every pb_utils object of one forward lives and dies on one thread, unless
    the engine died under it (then :meth:`InFlight.fail_all` has answered)."""
    try:
        forwarded = pb_utils.InferenceRequest(
            model_name=engine_model,
            inputs=request.inputs(),
            requested_output_names=list(OUTPUT_NAMES),
            parameters={FORWARDED_PARAMETER: True, **status_parameter(request)},
        )
        answers = forwarded.exec(decoupled=True)  # referenced until the stub's cleanup: see below
        answer = None
        for response in answers:
            if response.has_error() or response.output_tensors():
                answer = response
        if not in_flight.while_open(key, lambda: _wait_for_stub_cleanup(request)):
            return  # the engine died under this forward, which is answered and gone
        if answer is None:
            raise RuntimeError(f"{engine_model} sent no answer")
        if answer.has_error():
            reply = pb_utils.InferenceResponse(output_tensors=[], error=untag_error(answer.error().message()))
        else:
            tensors = [pb_utils.Tensor(t.name(), t.as_numpy()) for t in answer.output_tensors()]
            reply = pb_utils.InferenceResponse(output_tensors=tensors)
    except Exception as exc:  # the client must get an answer whatever went wrong here
        logger.exception("forwarding to %s failed", engine_model)
        reply = pb_utils.InferenceResponse(
            output_tensors=[], error=pb_utils.TritonError(f"forwarding failed: {exc}", pb_utils.TritonError.INTERNAL)
        )
    if in_flight.leave(key):
        sender.send(reply, flags=FINAL)


def _fail(sender, message: str) -> None:
    error = pb_utils.TritonError(message, pb_utils.TritonError.UNAVAILABLE)
    sender.send(pb_utils.InferenceResponse(output_tensors=[], error=error), flags=FINAL)


def _wait_for_stub_cleanup(request) -> None:
    """Return once the stub has forgotten the finished response iterator, so that its responses die here.

    Triton 24.10's stub keeps each BLS decoupled response iterator in a map that its stub-to-parent thread
    empties when the iterator's cleanup message comes up in that thread's queue. Should that happen after
    this thread dropped its references, the iterator and its responses (whose tensors hold numpy arrays)
    are freed on that C++ thread without the GIL: heap corruption, and a segfault later in any thread.
    A cancellation check is a round trip through the same first-in-first-out queue, queued after the
    iterator's cleanup (sent when the last response was read), so when it returns the map no longer holds
    the iterator and the references dropped on this thread are the last ones.
    """
    request.is_cancelled()
