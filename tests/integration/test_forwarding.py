"""peft_llm's forwarding on a busy stub, and both models coming back after their stub process dies.

Forwarding through BLS frees every engine answer on its own thread, with the GIL:
Triton 24.10's stub frees a finished BLS response iterator, and the answers it holds, on its stub-to-parent
thread, without the GIL, if that thread's queue reaches the iterator's cleanup after the forwarding thread
let go of it: heap corruption and, sooner or later, a segfault of the forwarder (seen in CI during a model
swap; under this test's load the forwarder without ``_wait_for_stub_cleanup`` crashed after 68-100 s).
This test makes the late cleanup the rule (threads keep that queue busy with log messages, each a round
trip to the server) and watches where each answer's output array is freed: a weakref callback notes any
free off the forwarding thread, and a reporter thread writes the count into the server log.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

from peftserve.triton.stub_watch import stub_pids
from tests.integration.conftest import infer, metrics_of, outputs, private_repository, running_server
from tools.client import build_inputs
from tools.triton_server import TritonServer

SECONDS = 30
CLIENTS = 16
LOGGING_THREADS = 2
OFF_THREAD = "answers freed off their forwarding thread:"
_START_LINE = "        self.in_flight = InFlight("
_BUSY_QUEUE = f"""\
        for target in [_report_off_thread_frees] + [_keep_the_queue_busy] * {LOGGING_THREADS}:
            _threading.Thread(target=target, daemon=True).start()
"""
_ANSWER_LINE = "        if answer is None:"
_WATCH = """\
        if answer is not None and answer.output_tensors():
            _weakref.finalize(answer.output_tensors()[0].as_numpy(), _note_free, _threading.get_ident())
"""
_WATCHERS = f"""

import threading as _threading
import time as _time
import weakref as _weakref

_OFF_THREAD_FREES = []


def _note_free(owner):
    if _threading.get_ident() != owner:
        _OFF_THREAD_FREES.append(owner)


def _report_off_thread_frees():
    while True:
        _time.sleep(0.2)
        if _OFF_THREAD_FREES:
            logger.error("{OFF_THREAD} %d", len(_OFF_THREAD_FREES))


def _keep_the_queue_busy():
    while True:
        pb_utils.Logger.log_verbose("busy")
"""


@pytest.fixture(scope="module")
def busy_forwarder(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[TritonServer]:
    workdir = tmp_path_factory.mktemp("forwarding")
    repository = workdir / "model_repository"
    private_repository(model_dir, repository, ["pirate", "robot", "chef"])
    forwarder = repository / "peft_llm" / "1" / "model.py"
    source = forwarder.read_text()
    for line in (_START_LINE, _ANSWER_LINE):
        assert source.count(line) == 1, f"the forwarder has no single line {line.strip()!r} to instrument"
    source = source.replace(_START_LINE, _BUSY_QUEUE + _START_LINE).replace(_ANSWER_LINE, _WATCH + _ANSWER_LINE)
    forwarder.write_text(source + _WATCHERS)
    yield from running_server(repository, workdir / "server.log")


def test_answers_are_freed_on_their_forwarding_thread_while_the_stub_is_busy(busy_forwarder: TritonServer) -> None:
    failures: list[str] = []
    answered = [0] * CLIENTS
    stop = threading.Event()

    def client_loop(number: int) -> None:
        client = httpclient.InferenceServerClient(busy_forwarder.http_url)
        adapter_id = ["pirate", "robot", "chef", ""][number % 4]
        while not stop.is_set():
            try:
                result = client.infer("peft_llm", build_inputs(httpclient, "the cat", adapter_id, 2))
                assert result.as_numpy("text_output")[0, 0], "an empty answer"
                answered[number] += 1
            except InferenceServerException as exc:
                failures.append(str(exc))
                stop.set()

    clients = [threading.Thread(target=client_loop, args=(n,), daemon=True) for n in range(CLIENTS)]
    for thread in clients:
        thread.start()
    deadline = time.monotonic() + SECONDS
    while time.monotonic() < deadline and not stop.is_set():
        time.sleep(0.5)
    stop.set()
    for thread in clients:
        thread.join(timeout=60)
    assert failures == [], failures[:3]
    assert all(answered), f"a client got no answer in {SECONDS} s: {answered}"
    log = busy_forwarder.log_path.read_text(errors="replace")
    assert OFF_THREAD not in log and "Segmentation fault" not in log, busy_forwarder.log_tail()


@pytest.fixture(scope="module")
def watched_server(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[TritonServer]:
    workdir = tmp_path_factory.mktemp("stub_watch")
    private_repository(model_dir, workdir / "model_repository", ["pirate"])
    explicit = ("--model-control-mode=explicit", "--load-model=*")
    yield from running_server(workdir / "model_repository", workdir / "server.log", extra_args=explicit)


@pytest.mark.parametrize("model", ["peft_llm", "peft_llm_stream"])
def test_a_model_whose_stub_died_serves_again(watched_server: TritonServer, model: str) -> None:
    """Killed with SIGKILL, a model's stub is found gone by the other model's watch, which loads it again."""
    expected = outputs(infer(watched_server, "the cat", "pirate", 6))
    server_pid = str(watched_server.process.pid).encode()
    (stub,) = stub_pids(model, server_pid=server_pid)
    os.kill(stub, signal.SIGKILL)
    failures, deadline = [], time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            answer = outputs(infer(watched_server, "the cat", "pirate", 6))
            if failures:
                break
        except InferenceServerException as exc:
            failures.append(str(exc))
        time.sleep(0.5)
    assert failures, "no request failed after the kill: the test did not kill the stub it meant to"
    assert answer == expected, f"{model} never served again within 120 s: {failures[-1]}"
    assert stub_pids(model, server_pid=server_pid) - {stub}
    assert f"{model} has no stub process but Triton calls it ready" in watched_server.log_path.read_text()


def test_requests_in_the_engine_when_its_stub_dies_are_answered_at_once(
    watched_server: TritonServer,
) -> None:
    """Triton never ends a BLS call into a dead stub: without the forwarder's own answer these requests
    waited until their client's deadline (measured: 90 s). Then the engine, loaded again, serves again."""
    server_pid = str(watched_server.process.pid).encode()
    results: dict[int, object] = {}

    def long_request(number: int) -> None:
        client = grpcclient.InferenceServerClient(watched_server.grpc_url)
        inputs = build_inputs(grpcclient, "the cat looks at", "pirate", 200, ignore_eos=True)
        started = time.monotonic()
        try:
            client.infer("peft_llm", inputs, client_timeout=60)
            results[number] = "answered"
        except InferenceServerException as exc:
            results[number] = (exc.status(), str(exc), time.monotonic() - started)

    requests = [threading.Thread(target=long_request, args=(n,)) for n in range(8)]
    for thread in requests:
        thread.start()
    # Killed once all eight are inside the engine (a fixed wait raced them: the demo decodes 200 tokens in
    # well under half a second); the in-flight gauge is published every 20 ms.
    deadline = time.monotonic() + 30
    in_flight = "peftserve_requests_in_flight"
    while metrics_of(watched_server).total(in_flight, model="peft_llm", adapter="pirate") < len(requests):
        assert time.monotonic() < deadline, "the requests never reached the engine"
        time.sleep(0.01)
    (stub,) = stub_pids("peft_llm_stream", server_pid=server_pid)
    os.kill(stub, signal.SIGKILL)
    for thread in requests:
        thread.join(timeout=90)
    failed = [r for r in results.values() if r != "answered"]
    assert len(results) == 8 and failed, f"no request was in the engine when it died: {results}"
    for status, message, seconds in failed:
        assert status == "StatusCode.UNAVAILABLE" and "died" in message and seconds < 30, (status, message, seconds)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            infer(watched_server, "the cat", "pirate", 4)
            break
        except InferenceServerException:
            time.sleep(0.5)
    with ThreadPoolExecutor(max_workers=16) as pool:
        answers = list(pool.map(lambda n: outputs(infer(watched_server, "the cat", "pirate", 2)), range(16)))
    assert len(set(answers)) == 1
