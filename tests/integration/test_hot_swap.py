"""Adapter and model version swaps on a real tritonserver while client threads send mixed traffic.

The server runs in explicit model-control mode on a private copy of the model repository (adapters are
copied, the base model is linked), polling adapter versions every 0.1 s.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import psutil
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

from peftserve.smoke_check import GOLDEN_FILE
from peftserve.swap_history import SwapHistory
from tests.conftest import DEMO_PHRASES, REPO_ROOT
from tests.integration.conftest import private_repository, serving
from tools.adapter_release import publish, rollback
from tools.client import build_inputs
from tools.deployment import Deployment, ReleaseError, load_deployment
from tools.model_release import rollback_model, swap_model
from tools.server_probe import adapter_status
from tools.triton_server import TritonServer, free_port

SWAPPED = "pirate"  # the adapter whose versions change; robot and chef keep serving beside it
CONTENTS = {"pirate": DEMO_PHRASES["pirate"], "robot": DEMO_PHRASES["robot"]}  # source of each version


@pytest.fixture(scope="module")
def swap_server(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[TritonServer, Deployment]]:
    workdir = tmp_path_factory.mktemp("hot_swap")
    repository = workdir / "model_repository"
    private_repository(model_dir, repository, ["pirate", "robot", "chef"], adapter_poll_seconds="0.1")
    server = TritonServer(
        repository,
        http_port=free_port(),
        grpc_port=free_port(),
        metrics_port=free_port(),
        log_path=workdir / "server.log",
        address="127.0.0.1",
        extra_args=("--model-control-mode=explicit", "--load-model=*"),
    )
    config = workdir / "serving_config.yaml"
    config.write_text(
        f"model_repository: model_repository\nservers:\n  - name: test\n    http: {server.http_url}\n"
        f"    grpc: {server.grpc_url}\n    metrics: 127.0.0.1:{server.metrics_port}\n"
        "limits: {swap_timeout_seconds: 60}\n"
    )
    for running in serving(server):
        yield running, load_deployment(config)


@dataclass
class Answer:
    sent: float
    adapter_id: str
    version: str = ""
    text: str = ""
    error: str = ""


@dataclass
class Traffic:
    """Client threads sending requests for three adapters over HTTP and gRPC until stopped."""

    server: TritonServer
    answers: list[Answer] = field(default_factory=list)
    stop: threading.Event = field(default_factory=threading.Event)

    def __enter__(self) -> Traffic:
        self.threads = [
            threading.Thread(target=self._loop, args=(adapter_id, protocol), daemon=True)
            for adapter_id, protocol in [(SWAPPED, "http"), (SWAPPED, "grpc"), ("robot", "http"), ("chef", "grpc")]
        ]
        for thread in self.threads:
            thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop.set()
        for thread in self.threads:
            thread.join(timeout=60)

    def _loop(self, adapter_id: str, protocol: str) -> None:
        module = grpcclient if protocol == "grpc" else httpclient
        client = module.InferenceServerClient(self.server.grpc_url if protocol == "grpc" else self.server.http_url)
        while not self.stop.is_set():
            answer = Answer(time.monotonic(), adapter_id)
            try:
                result = client.infer("peft_llm", build_inputs(module, "the cat looks at", adapter_id, 24))
                answer.version = result.as_numpy("adapter_version")[0, 0].decode()
                answer.text = result.as_numpy("text_output")[0, 0].decode()
            except InferenceServerException as exc:
                answer.error = str(exc)
            self.answers.append(answer)

    def failures(self) -> list[Answer]:
        return [a for a in self.answers if a.error]


def latest_version(deployment: Deployment) -> int:
    return max(v.version for v in _versions(deployment))


def _versions(deployment: Deployment):
    from peftserve.adapter_repository import AdapterRepository

    return AdapterRepository(deployment.adapter_repository).versions(SWAPPED)


def test_twenty_adapter_version_swaps_under_traffic(swap_server, model_dir: Path) -> None:
    server, deployment = swap_server
    content_of = {latest_version(deployment): "pirate"}
    switched_at: dict[int, float] = {}
    with Traffic(server) as traffic:
        time.sleep(1.0)
        for swap in range(20):
            source = "robot" if swap % 2 == 0 else "pirate"
            result = publish(deployment, SWAPPED, model_dir / "adapters" / source / "1")
            assert result.outcome == "switched", result
            content_of[result.version] = source
            switched_at[result.version] = time.monotonic()
        time.sleep(0.5)
    assert traffic.failures() == [], traffic.failures()[:3]
    swapped = [a for a in traffic.answers if a.adapter_id == SWAPPED]
    assert len(swapped) > 40
    for answer in swapped:
        version = int(answer.version.split("@")[1])
        assert CONTENTS[content_of[version]] in answer.text, f"{answer.version} answered {answer.text!r}"
        newer_reported = [v for v, at in switched_at.items() if at < answer.sent]
        if newer_reported:
            assert version >= max(newer_reported), f"sent after {max(newer_reported)} was reported, got {version}"
    for other in ("robot", "chef"):
        assert {a.version for a in traffic.answers if a.adapter_id == other} == {f"{other}@1"}
    switches = [e for e in SwapHistory(deployment.adapter_repository).read(adapter=SWAPPED) if e.event == "switched"]
    assert len(switches) >= 19 and all(len(e.sha256) == 64 for e in switches)


def test_bad_versions_are_refused_or_rolled_back_without_failed_requests(swap_server, model_dir: Path, tmp_path: Path):
    server, deployment = swap_server
    serving = latest_version(deployment)
    corrupt = tmp_path / "corrupt"
    shutil.copytree(model_dir / "adapters" / "robot" / "1", corrupt)
    (corrupt / "adapter_model.safetensors").write_bytes(b"\0" * 64)
    wrong_answers = tmp_path / "wrong_answers"
    shutil.copytree(model_dir / "adapters" / "robot" / "1", wrong_answers)
    golden = [{"prompt": "the cat looks at", "expected": "this phrase is never generated"}]
    (wrong_answers / GOLDEN_FILE).write_text(json.dumps(golden))
    with Traffic(server) as traffic:
        with pytest.raises(ReleaseError, match="incompatible"):
            publish(deployment, SWAPPED, corrupt)
        result = publish(deployment, SWAPPED, wrong_answers)  # passes validation, fails the server's smoke check
        assert result.outcome == "rolled_back" and "golden prompt" in result.detail
        assert latest_version(deployment) == serving
        status = adapter_status(deployment.servers[0], "peft_llm", {}).adapter(SWAPPED)  # what publish read
        assert (status.serving_version, status.rejected_version) == (serving, result.version)
        assert status.rejection_reason.startswith(f"smoke check of {SWAPPED}@{result.version} failed: golden prompt")
        assert result.servers == {"test": f"rejected: {status.rejection_reason}"}
        time.sleep(0.5)
    assert traffic.failures() == []
    assert {a.version for a in traffic.answers if a.adapter_id == SWAPPED} == {f"{SWAPPED}@{serving}"}
    events = [(e.event, e.outcome) for e in SwapHistory(deployment.adapter_repository).read(adapter=SWAPPED)[-4:]]
    assert events == [("published", "refused"), ("published", "ok"), ("rejected", "failed"), ("rolled_back", "failed")]


def test_rollback_on_demand(swap_server, model_dir: Path) -> None:
    _, deployment = swap_server
    before = latest_version(deployment)
    published = publish(deployment, SWAPPED, model_dir / "adapters" / "robot" / "1")
    result = rollback(deployment, SWAPPED)
    assert result.version == before and result.servers == {"test": "serving"}
    assert published.version not in [v.version for v in _versions(deployment)]


def test_two_model_version_swaps_under_traffic(swap_server) -> None:
    server, deployment = swap_server
    with Traffic(server) as traffic:
        first = swap_model(deployment)
        second = swap_model(deployment)
        time.sleep(0.5)
    assert (first.outcome, second.outcome) == ("loaded", "loaded") and second.version == first.version + 1
    assert traffic.failures() == [], traffic.failures()[:3]
    assert len(traffic.answers) > 20
    rolled_back = rollback_model(deployment)
    assert rolled_back.version == first.version


def test_model_swap_refused_when_two_copies_do_not_fit(swap_server) -> None:
    _, deployment = swap_server
    tight = deployment.model_copy(update={"limits": deployment.limits.model_copy(update={"memory_budget_mb": 1})})
    with pytest.raises(ReleaseError, match=r"needs about \d+ MiB"):
        swap_model(tight)


def stub_rss(server: TritonServer) -> int:
    stubs = [p for p in psutil.Process(server.process.pid).children(recursive=True) if "stub" in p.name()]
    return sum(p.memory_info().rss for p in stubs)


def test_hundred_swap_cycles_keep_memory_flat(swap_server, model_dir: Path) -> None:
    server, deployment = swap_server
    sources = [model_dir / "adapters" / name / "1" for name in ("robot", "pirate")]
    for cycle in range(10):  # warm up allocator pools before the baseline
        publish(deployment, SWAPPED, sources[cycle % 2])
    baseline = stub_rss(server)
    for cycle in range(100):
        assert publish(deployment, SWAPPED, sources[cycle % 2]).outcome == "switched"
    growth_mib = (stub_rss(server) - baseline) / 2**20
    assert growth_mib < 40, f"model process grew {growth_mib:.1f} MiB over 100 swaps"


def test_cli_shows_versions_history_and_metrics(swap_server) -> None:
    _, deployment = swap_server

    def tools(*args: str) -> object:
        command = [sys.executable, "-m", "tools", "--config", str(deployment.path), "--json", *args]
        completed = subprocess.run(command, capture_output=True, text=True, cwd=REPO_ROOT, timeout=120)
        assert completed.returncode == 0, completed.stderr
        return json.loads(completed.stdout)

    (health,) = tools("health")
    assert health["ready"] and health["model_ready"]
    adapters = {row["adapter"]: row for row in tools("adapters")}
    serving = adapters[SWAPPED]["test"]["serving"]
    assert serving == latest_version(deployment) and adapters[SWAPPED]["test"]["loaded_bytes"] > 0
    status = tools("status")["test"]
    (swapped,) = [entry for entry in status["adapters"] if entry["adapter"] == SWAPPED]
    assert (status["schema_version"], status["model"]) == (1, "peft_llm")
    assert (swapped["state"], swapped["serving_version"], len(swapped["sha256"])) == ("serving", serving, 64)
    history = tools("history", "--adapter", SWAPPED, "--limit", "3")
    assert len(history) == 3 and history[-1]["event"] == "switched"
    summary = tools("metrics")["test"]["adapters"][SWAPPED]
    assert summary["serving_version"] == serving and summary["switched"] >= 20


def test_status_request_over_plain_http_json(swap_server) -> None:
    """The documented form: an infer call with an empty text_input and the peftserve_status parameter."""
    server, _ = swap_server

    def status_request(value: object) -> tuple[int, dict]:
        body = {
            "inputs": [{"name": "text_input", "shape": [1, 1], "datatype": "BYTES", "data": [""]}],
            "parameters": {"peftserve_status": value},
        }
        request = urllib.request.Request(
            f"http://{server.http_url}/v2/models/peft_llm/infer", json.dumps(body).encode(), method="POST"
        )
        try:
            with urllib.request.urlopen(request, timeout=30) as response:
                return response.status, json.loads(response.read())
        except urllib.error.HTTPError as exc:
            return exc.code, json.loads(exc.read())

    httpclient.InferenceServerClient(server.http_url).infer("peft_llm", build_inputs(httpclient, "a dog", "robot", 4))
    code, answer = status_request(True)
    outputs = {output["name"]: output["data"][0] for output in answer["outputs"]}
    document = json.loads(outputs["text_output"])
    assert code == 200 and (outputs["adapter_version"], outputs["output_tokens"]) == ("", 0)
    assert document["schema_version"] == 1 and document["model_version"] >= 1
    robot = next(entry for entry in document["adapters"] if entry["adapter"] == "robot")
    assert (robot["state"], robot["serving_version"], robot["rejected_version"]) == ("serving", 1, None)
    code, answer = status_request("yes")
    assert code == 400 and "peftserve_status must be true or false, got 'yes'" in answer["error"]
