"""The guards on a real tritonserver: API keys, per-adapter limits, input limits, untrusted adapter files.

The server runs on a private repository whose adapters include attacks (a symlink out of the repository,
a pickle that would run code, a weights file linked from elsewhere), with a management key, an inference
key and a rate limit on one adapter, all set the way an operator sets them (serving_config.yaml).
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
import statistics
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

from tests.conftest import DEMO_PHRASES
from tests.integration.conftest import metrics_of, private_repository, serving
from tools.client import build_inputs
from tools.deployment import Deployment, load_deployment
from tools.server_probe import StatusUnavailable, adapter_status
from tools.triton_server import TritonServer, free_port

ADMIN_KEY, CLIENT_KEY = "admin-secret-for-tests", "client-secret-for-tests"
PIRATE_RATE = 4  # requests per second, burst 4


class CodeRunningPickle:
    """Unpickling this creates a file: proof that pickle weights would run attacker code."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def make_repository(model_dir: Path, root: Path, outside: Path, marker: Path) -> None:
    overrides = json.dumps({"pirate": {"rate_per_second": PIRATE_RATE, "burst": PIRATE_RATE}}).replace('"', '\\"')
    model = private_repository(
        model_dir,
        root,
        ["pirate", "robot", "knight"],
        adapter_limit_overrides=overrides,
        adapter_poll_seconds="0.2",
    )
    adapters = model / "adapters"
    shutil.copytree(model_dir / "adapters" / "chef" / "1", outside / "chef" / "1")
    (adapters / "escape").symlink_to(outside / "chef")  # a whole adapter linked from outside
    pickled = adapters / "pickled" / "1"
    pickled.mkdir(parents=True)
    shutil.copy(model_dir / "adapters" / "chef" / "1" / "adapter_config.json", pickled)
    (pickled / "adapter_model.bin").write_bytes(pickle.dumps(CodeRunningPickle(marker)))
    linked = adapters / "linked" / "1"
    linked.mkdir(parents=True)
    shutil.copy(model_dir / "adapters" / "chef" / "1" / "adapter_config.json", linked)
    (linked / "adapter_model.safetensors").symlink_to(outside / "chef" / "1" / "adapter_model.safetensors")


@pytest.fixture(scope="module")
def guarded(
    model_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[TritonServer, Deployment, Path]]:
    workdir = tmp_path_factory.mktemp("security")
    marker = workdir / "pickle-ran"
    make_repository(model_dir, workdir / "model_repository", workdir / "outside", marker)
    config = workdir / "serving_config.yaml"
    ports = {name: free_port() for name in ("http", "grpc", "metrics")}
    config.write_text(
        f"""model_repository: model_repository
servers:
  - name: guarded
    http: "127.0.0.1:{ports["http"]}"
    grpc: "127.0.0.1:{ports["grpc"]}"
    metrics: "127.0.0.1:{ports["metrics"]}"
credentials:
  management: {{header: x-admin-key, value_env: TEST_ADMIN_KEY}}
  inference: {{header: x-api-key, value_env: TEST_CLIENT_KEY}}
"""
    )
    os.environ.update(TEST_ADMIN_KEY=ADMIN_KEY, TEST_CLIENT_KEY=CLIENT_KEY)
    deployment = load_deployment(config)
    server = TritonServer(
        deployment.model_repository,
        http_port=ports["http"],
        grpc_port=ports["grpc"],
        metrics_port=ports["metrics"],
        log_path=workdir / "server.log",
        address="127.0.0.1",
        extra_args=("--model-control-mode=explicit", "--load-model=*", *deployment.credentials.triton_args()),
    )
    for running in serving(server):
        yield running, deployment, marker


def infer(server: TritonServer, adapter_id: str, prompt: str = "the cat looks at", **kwargs) -> tuple[str, str]:
    client = httpclient.InferenceServerClient(server.http_url)
    headers = kwargs.pop("headers", {"x-api-key": CLIENT_KEY})
    result = client.infer("peft_llm", build_inputs(httpclient, prompt, adapter_id, 24, **kwargs), headers=headers)
    return result.as_numpy("text_output")[0, 0].decode(), result.as_numpy("adapter_version")[0, 0].decode()


def http_status(server: TritonServer, path: str, body: dict, headers: dict[str, str]) -> int:
    request = urllib.request.Request(
        f"http://{server.http_url}{path}", json.dumps(body).encode(), headers, method="POST"
    )
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status
    except urllib.error.HTTPError as exc:
        return exc.code


def test_management_api_requires_the_key(guarded) -> None:
    server, deployment, _ = guarded
    assert http_status(server, "/v2/repository/index", {}, {}) == 403
    assert http_status(server, "/v2/repository/models/peft_llm/unload", {}, {"x-admin-key": "wrong"}) == 403
    assert http_status(server, "/v2/repository/index", {}, deployment.management_headers()) == 200
    grpc = grpcclient.InferenceServerClient(server.grpc_url)
    with pytest.raises(InferenceServerException, match="restricted"):
        grpc.unload_model("peft_llm")
    index = grpc.get_model_repository_index(headers=deployment.management_headers("grpc"), as_json=True)
    assert {model["name"] for model in index["models"]} == {"peft_llm", "peft_llm_stream"}
    assert grpc.is_model_ready("peft_llm")


def test_inference_requires_the_client_key_on_every_protocol(guarded) -> None:
    server, deployment, _ = guarded
    with pytest.raises(InferenceServerException, match="restricted"):
        infer(server, "pirate", headers={})
    assert http_status(server, "/v2/models/peft_llm/generate", {"text_input": "a dog"}, {}) == 403
    grpc = grpcclient.InferenceServerClient(server.grpc_url)
    with pytest.raises(InferenceServerException, match="restricted"):
        grpc.infer("peft_llm", build_inputs(grpcclient, "a dog", "robot", 8))
    result = grpc.infer(
        "peft_llm", build_inputs(grpcclient, "a dog", "robot", 24), headers=deployment.inference_headers("grpc")
    )
    assert DEMO_PHRASES["robot"] in result.as_numpy("text_output")[0, 0].decode()
    assert http_status(server, "/v2/health/ready", {}, {}) in (200, 405)  # health stays open for probes
    server_entry = deployment.servers[0]
    with pytest.raises(StatusUnavailable, match="restricted"):  # the status request is an inference request
        adapter_status(server_entry, "peft_llm", {})
    assert adapter_status(server_entry, "peft_llm", deployment.inference_headers()).model == "peft_llm"


def test_flood_on_one_adapter_is_refused_while_another_is_served_normally(guarded) -> None:
    server, _, _ = guarded
    baseline = []
    for _ in range(5):
        started = time.monotonic()
        infer(server, "robot")
        baseline.append(time.monotonic() - started)
    stop, flood_errors, flood_ok = threading.Event(), [], []

    def flood() -> None:
        while not stop.is_set():
            try:
                infer(server, "pirate")
                flood_ok.append(1)
            except InferenceServerException as exc:
                flood_errors.append(str(exc))

    threads = [threading.Thread(target=flood, daemon=True) for _ in range(12)]
    for thread in threads:
        thread.start()
    during = []
    try:
        time.sleep(0.5)
        for _ in range(10):
            started = time.monotonic()
            text, version = infer(server, "robot")
            during.append(time.monotonic() - started)
            assert version == "robot@1" and DEMO_PHRASES["robot"] in text
    finally:
        stop.set()
        for thread in threads:
            thread.join(timeout=30)
    assert flood_errors and all("over limit: adapter 'pirate' exceeds its request rate" in e for e in flood_errors)
    assert len(flood_ok) <= PIRATE_RATE * (sum(during) + 2) + PIRATE_RATE  # the rate held
    # "Normal latency": not queued behind the flood (a loose bound: 2 shared cores run flood and server).
    assert statistics.median(during) < 5 * statistics.median(baseline) + 0.5
    metrics = metrics_of(server)
    assert metrics.by_label("peftserve_over_limit_total", "adapter").get("pirate", 0) >= len(flood_errors)


def test_input_limits_over_triton(guarded) -> None:
    server, _, _ = guarded
    cases = [
        ({"stop": ["a", "b", "c", "d", "e"]}, "at most 4 allowed (max_stop_strings)"),
        ({"stop": ["x" * 300]}, "max_stop_string_bytes"),
    ]
    for kwargs, message in cases:
        with pytest.raises(InferenceServerException, match=message.replace("(", r"\(").replace(")", r"\)")):
            infer(server, "robot", **kwargs)
    with pytest.raises(InferenceServerException, match="max_prompt_bytes"):
        infer(server, "robot", prompt="x" * 70000)
    text, _ = infer(server, "robot", stop=["systems"])
    assert "systems" not in text and text.strip().startswith("beep boop")


@pytest.mark.parametrize(
    ("adapter_id", "message"),
    [
        ("../pirate", "invalid adapter_id"),
        ("pirate/../../secret", "invalid adapter_id"),
        ("escape", "resolves outside the adapter repository"),
        ("pickled", "only pickle weights"),
        ("linked", "is a symlink"),
    ],
)
def test_repository_attacks_are_refused_and_nothing_is_loaded(guarded, adapter_id: str, message: str) -> None:
    server, _, marker = guarded
    with pytest.raises(InferenceServerException, match=message):
        infer(server, adapter_id)
    loaded = metrics_of(server).by_label("peftserve_adapter_loaded_bytes", "adapter")
    assert not loaded.get(adapter_id) and not marker.exists()


def test_adapter_files_changed_in_place_are_detected(guarded, model_dir: Path) -> None:
    server, deployment, _ = guarded
    assert infer(server, "knight")[1] == "knight@1"
    time.sleep(0.5)  # the watcher records the files it accepted
    weights = deployment.adapter_repository / "knight" / "1" / "adapter_model.safetensors"
    shutil.copyfile(model_dir / "adapters" / "pirate" / "1" / "adapter_model.safetensors", weights)
    deadline = time.monotonic() + 10
    events: dict[str, float] = {}
    while time.monotonic() < deadline and not events.get("knight"):
        events = metrics_of(server).by_label("peftserve_adapter_version_events_total", "adapter", event="files_changed")
        time.sleep(0.2)
    assert events.get("knight", 0) >= 1
    text, version = infer(server, "knight")  # the copy checked at load keeps serving, never the changed files
    assert version == "knight@1" and DEMO_PHRASES["knight"] in text
