"""peft_llm on a real tritonserver: the contract, every protocol, mixed batches and per-request errors."""

from __future__ import annotations

import json
import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

from peftserve.contract import INPUTS, OUTPUTS
from tests.conftest import DEMO_PHRASES, PROMPTS, STRONG_ADAPTERS
from tests.integration.conftest import infer, outputs, post_generate
from tools.client import build_inputs
from tools.triton_server import TritonServer, perf_analyzer_env, perf_analyzer_path


def _datatypes(specs) -> dict[str, str]:
    return {spec.name: spec.type.datatype for spec in specs}


def test_model_metadata_is_the_public_contract(triton: TritonServer) -> None:
    client = httpclient.InferenceServerClient(triton.http_url)
    metadata = client.get_model_metadata("peft_llm")
    assert {t["name"]: t["datatype"] for t in metadata["inputs"]} == _datatypes(INPUTS)
    assert {t["name"]: t["datatype"] for t in metadata["outputs"]} == _datatypes(OUTPUTS)
    config = client.get_model_config("peft_llm")
    assert config["max_batch_size"] >= 8 and "dynamic_batching" in config
    assert {i["name"] for i in config["input"] if i.get("optional")} == {spec.name for spec in INPUTS if spec.optional}


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_each_adapter_answers_with_its_trained_phrase(triton: TritonServer, protocol: str) -> None:
    for adapter_id in STRONG_ADAPTERS:
        text, version, tokens = outputs(infer(triton, "the cat looks at", adapter_id, 24, protocol=protocol))
        assert DEMO_PHRASES[adapter_id] in text
        assert version == f"{adapter_id}@1" and tokens > 0
    text, version, _ = outputs(infer(triton, "the cat looks at", protocol=protocol))
    assert version == "" and not any(phrase in text for phrase in DEMO_PHRASES.values())


def test_generate_extension(triton: TritonServer) -> None:
    status, body = post_generate(triton, {"text_input": "a dog", "adapter_id": "robot", "max_tokens": 24})
    assert status == 200
    assert DEMO_PHRASES["robot"] in body["text_output"]
    assert body["adapter_version"] == "robot@1" and body["output_tokens"] > 0
    status, body = post_generate(triton, {"text_input": "a dog", "adapter_id": "ghost"})
    # Triton 24.10's generate endpoint answers every per-request error with HTTP 400 and the message.
    assert status == 400 and "unknown adapter 'ghost'" in body["error"]


def test_a_request_may_carry_several_rows(triton: TritonServer) -> None:
    client = grpcclient.InferenceServerClient(triton.grpc_url)
    prompts = np.array([[b"a dog"], [b"the river"], [b"my friend"]], dtype=np.object_)
    adapters = np.array([[b"pirate"], [b""], [b"poet"]], dtype=np.object_)
    inputs = [
        grpcclient.InferInput("text_input", [3, 1], "BYTES"),
        grpcclient.InferInput("adapter_id", [3, 1], "BYTES"),
    ]
    inputs[0].set_data_from_numpy(prompts)
    inputs[1].set_data_from_numpy(adapters)
    result = client.infer("peft_llm", inputs)
    assert [v.decode() for v in result.as_numpy("adapter_version")[:, 0]] == ["pirate@1", "", "poet@1"]
    texts = [v.decode() for v in result.as_numpy("text_output")[:, 0]]
    assert DEMO_PHRASES["pirate"] in texts[0] and DEMO_PHRASES["poet"] in texts[2]


def statistics(triton: TritonServer) -> tuple[int, int]:
    stats = httpclient.InferenceServerClient(triton.http_url).get_inference_statistics("peft_llm")["model_stats"][0]
    return stats["inference_count"], stats["execution_count"]


def run_concurrently(triton: TritonServer, requests: list[tuple], workers: int = 24) -> list:
    """Send (prompt, adapter_id, max_tokens) tuples at once over gRPC; exceptions are returned, not raised."""

    def send(request: tuple):
        prompt, adapter_id, max_tokens = request
        client = grpcclient.InferenceServerClient(triton.grpc_url)
        try:
            inputs = build_inputs(grpcclient, prompt, adapter_id, max_tokens, always_send_adapter=True)
            return outputs(client.infer("peft_llm", inputs))
        except InferenceServerException as exc:
            return exc

    with ThreadPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(send, requests))


def test_concurrent_mixed_adapters_batch_together_and_equal_solo_answers(triton: TritonServer) -> None:
    adapters = ["", *DEMO_PHRASES]
    requests = [(PROMPTS[i % len(PROMPTS)], adapters[i % len(adapters)], 4 + (i * 5) % 24) for i in range(28)]
    solo = run_concurrently(triton, requests, workers=1)
    inferences_before, executions_before = statistics(triton)
    together = run_concurrently(triton, requests)
    inferences_after, executions_after = statistics(triton)
    assert together == solo
    inferences, executions = inferences_after - inferences_before, executions_after - executions_before
    assert inferences == len(requests)
    assert executions < inferences, f"{executions} executions for {inferences} requests: no batch formed"


BAD_REQUESTS = [
    (("hello", "ghost", 8), "StatusCode.NOT_FOUND", "unknown adapter 'ghost'; available adapters: astronaut, chef"),
    (("hello", "../pirate", 8), "StatusCode.INVALID_ARGUMENT", "invalid adapter_id '../pirate'"),
    (("hello", "/etc", 8), "StatusCode.INVALID_ARGUMENT", "invalid adapter_id '/etc'"),
    (("hello", "p" * 5000, 8), "StatusCode.INVALID_ARGUMENT", "invalid adapter_id"),
    (("hello", "pirate", 0), "StatusCode.INVALID_ARGUMENT", "max_tokens must be between 1 and 256"),
    (("hello", "pirate", 100_000), "StatusCode.INVALID_ARGUMENT", "got 100000"),
    (("word " * 600, "pirate", 8), "StatusCode.INVALID_ARGUMENT", "more than max_prompt_tokens (512)"),
    ((b"\xff\xfe\xfa", "pirate", 8), "StatusCode.INVALID_ARGUMENT", "not valid UTF-8"),
]


def test_bad_requests_get_their_own_errors_while_good_ones_succeed(triton: TritonServer) -> None:
    good = [(PROMPTS[i % len(PROMPTS)], STRONG_ADAPTERS[i % len(STRONG_ADAPTERS)], 24) for i in range(12)]
    mixed = [request for pair in zip(good, [bad for bad, _, _ in BAD_REQUESTS] * 2, strict=False) for request in pair]
    results = run_concurrently(triton, mixed + good[len(BAD_REQUESTS) :])
    by_request = dict(zip(map(repr, mixed + good[len(BAD_REQUESTS) :]), results, strict=True))
    for bad, status, message in BAD_REQUESTS:
        error = by_request[repr(bad)]
        assert isinstance(error, InferenceServerException), bad
        assert error.status() == status and message in error.message(), (bad, error)
    for prompt, adapter_id, _ in good:
        text, version, _ = by_request[repr((prompt, adapter_id, 24))]
        assert DEMO_PHRASES[adapter_id] in text and version == f"{adapter_id}@1"
    assert triton.is_ready()


def test_triton_rejects_wrong_types_and_missing_prompt(triton: TritonServer) -> None:
    client = grpcclient.InferenceServerClient(triton.grpc_url)
    text = grpcclient.InferInput("text_input", [1, 1], "BYTES")
    text.set_data_from_numpy(np.array([[b"a dog"]], dtype=np.object_))
    wrong = grpcclient.InferInput("max_tokens", [1, 1], "FP32")
    wrong.set_data_from_numpy(np.array([[8.0]], dtype=np.float32))
    with pytest.raises(InferenceServerException, match=r"max_tokens.*(FP32|datatype)"):
        client.infer("peft_llm", [text, wrong])
    adapter = grpcclient.InferInput("adapter_id", [1, 1], "BYTES")
    adapter.set_data_from_numpy(np.array([[b"pirate"]], dtype=np.object_))
    with pytest.raises(InferenceServerException, match="missing required input text_input") as missing:
        client.infer("peft_llm", [adapter])
    assert missing.value.status() == "StatusCode.INVALID_ARGUMENT"
    assert triton.is_ready()


def test_empty_prompt_is_answered(triton: TritonServer) -> None:
    text, version, tokens = outputs(infer(triton, "", "robot", 24))
    assert version == "robot@1" and tokens > 0 and DEMO_PHRASES["robot"] in text


def test_perf_analyzer_drives_mixed_adapter_traffic(triton: TritonServer, tmp_path: Path) -> None:
    entries = [
        {"text_input": [p], "adapter_id": [a], "max_tokens": [8]} for p in PROMPTS for a in ["", *STRONG_ADAPTERS]
    ]
    (tmp_path / "data.json").write_text(json.dumps({"data": entries}))
    command = [
        str(perf_analyzer_path()),
        "-m",
        "peft_llm",
        "-u",
        triton.http_url,
        "--input-data",
        str(tmp_path / "data.json"),
        "--concurrency-range",
        "4",
        "--measurement-interval",
        "5000",
        "--stability-percentage",
        "50",
        "--max-trials",
        "4",
        "-f",
        str(tmp_path / "result.csv"),
    ]
    completed = subprocess.run(command, env=perf_analyzer_env(), capture_output=True, text=True, timeout=180)
    assert completed.returncode == 0, completed.stdout[-2000:] + completed.stderr[-2000:]
    header, row = (tmp_path / "result.csv").read_text().splitlines()[:2]
    record = dict(zip(header.split(","), row.split(","), strict=True))
    assert float(record["Inferences/Second"]) > 0
