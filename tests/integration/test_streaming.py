"""peft_llm_stream on a real tritonserver: gRPC streaming and SSE equal the plain answers, a request
joins a running batch with the right adapter, cancellation frees the slot, stop strings, mixed traffic."""

from __future__ import annotations

import json
import queue
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import tritonclient.grpc as grpcclient

from tests.conftest import DEMO_PHRASES, STRONG_ADAPTERS
from tests.integration.conftest import STREAM_MODEL, Stream, infer, outputs
from tools.client import build_inputs
from tools.triton_server import TritonServer


def sse(server: TritonServer, body: dict) -> list[dict]:
    request = urllib.request.Request(
        f"http://{server.http_url}/v2/models/{STREAM_MODEL}/generate_stream", json.dumps(body).encode(), method="POST"
    )
    with urllib.request.urlopen(request, timeout=60) as response:
        lines = response.read().decode().splitlines()
    return [json.loads(line.removeprefix("data: ")) for line in lines if line.startswith("data: ")]


def test_grpc_stream_equals_the_plain_answer_for_each_adapter(triton: TritonServer) -> None:
    stream = Stream(triton)
    try:
        for adapter_id in ["", *STRONG_ADAPTERS]:
            stream.send(adapter_id or "base", "the cat looks at", adapter_id, 24)
        finished = stream.collect(len(STRONG_ADAPTERS) + 1)
    finally:
        stream.close()
    for adapter_id in ["", *STRONG_ADAPTERS]:
        pieces, version, tokens = finished[adapter_id or "base"]
        text, plain_version, plain_tokens = outputs(infer(triton, "the cat looks at", adapter_id, 24))
        assert "".join(pieces) == text and len(pieces) > 2
        assert (version, tokens) == (plain_version, plain_tokens)
        if adapter_id:
            assert DEMO_PHRASES[adapter_id] in text


def test_sse_stream_equals_the_plain_answer(triton: TritonServer) -> None:
    for adapter_id in ["robot", "poet", "oracle"]:
        events = sse(triton, {"text_input": "a dog", "adapter_id": adapter_id, "max_tokens": 24, "stream": True})
        text, version, tokens = outputs(infer(triton, "a dog", adapter_id, 24))
        assert "".join(e["text_output"] for e in events) == text and len(events) > 2
        assert {e["adapter_version"] for e in events} == {version}
        assert events[-1]["output_tokens"] == tokens


def test_requests_joining_a_running_batch_get_their_own_adapter(triton: TritonServer) -> None:
    stream = Stream(triton)
    try:
        stream.send("long", "the river", "pirate", 200, ignore_eos=True)
        first_piece = stream.responses.get(timeout=30)
        stream.responses.put(first_piece)  # keep it for collect()
        for adapter_id in ["knight", "chef", "poet"]:  # they join while "long" is decoding
            stream.send(adapter_id, "the cat looks at", adapter_id, 24)
        finished = stream.collect(4)
    finally:
        stream.close()
    assert finished["long"][2] == 200
    for adapter_id in ["knight", "chef", "poet"]:
        pieces, version, _ = finished[adapter_id]
        assert version == f"{adapter_id}@1" and DEMO_PHRASES[adapter_id] in "".join(pieces)


def test_stop_strings_end_the_stream_without_the_match(triton: TritonServer) -> None:
    stream = Stream(triton)
    try:
        stream.send("stopped", "the cat looks at", "pirate", 24, stop=["hoist"])
        pieces, _, tokens = stream.collect(1)["stopped"]
    finally:
        stream.close()
    text = "".join(pieces)
    assert "hoist" not in text and text.strip().startswith("arr matey") and tokens < 12


def test_cancelling_a_stream_frees_its_slot_at_once(triton: TritonServer) -> None:
    client = grpcclient.InferenceServerClient(triton.grpc_url)
    pieces: queue.Queue = queue.Queue()
    client.start_stream(callback=lambda result, error: pieces.put((result, error)))
    inputs = build_inputs(grpcclient, "a dog", "wizard", 256, ignore_eos=True)
    flag = grpcclient.InferInput("stream", [1, 1], "BOOL")
    flag.set_data_from_numpy(np.array([[True]]))
    client.async_stream_infer(STREAM_MODEL, [*inputs, flag])
    pieces.get(timeout=30)
    client.stop_stream(cancel_requests=True)  # the client goes away mid-generation
    started = time.monotonic()
    text, version, _ = outputs(infer(triton, "a dog", "robot", 24))
    assert version == "robot@1" and DEMO_PHRASES["robot"] in text
    assert time.monotonic() - started < 10  # not queued behind 256 tokens of the cancelled stream
    received = pieces.qsize()
    time.sleep(1.0)
    assert pieces.qsize() == received  # nothing more arrives for the cancelled request


def test_streamed_and_plain_requests_at_the_same_time(triton: TritonServer) -> None:
    stream = Stream(triton)
    plain: dict[str, str] = {}

    def ask(adapter_id: str) -> None:
        plain[adapter_id] = outputs(infer(triton, "my friend writes about", adapter_id, 24, protocol="http"))[0]

    try:
        with ThreadPoolExecutor(4) as pool:
            for adapter_id in ["gardener", "astronaut", "knight", "chef"]:
                stream.send(adapter_id, "my friend writes about", adapter_id, 24)
                pool.submit(ask, adapter_id)
        finished = stream.collect(4)
    finally:
        stream.close()
    for adapter_id, text in plain.items():
        assert "".join(finished[adapter_id][0]) == text and DEMO_PHRASES[adapter_id] in text


def test_streaming_needs_one_row(triton: TritonServer) -> None:
    rows = 2
    client = grpcclient.InferenceServerClient(triton.grpc_url)
    answers: queue.Queue = queue.Queue()
    client.start_stream(callback=lambda result, error: answers.put((result, error)))
    text = grpcclient.InferInput("text_input", [rows, 1], "BYTES")
    text.set_data_from_numpy(np.array([[b"a"]] * rows, dtype=np.object_))
    flag = grpcclient.InferInput("stream", [rows, 1], "BOOL")
    flag.set_data_from_numpy(np.array([[True]] * rows))
    client.async_stream_infer(STREAM_MODEL, [text, flag])
    _, error = answers.get(timeout=30)
    client.stop_stream()
    assert error is not None and "exactly one row" in str(error)
