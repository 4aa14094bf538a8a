"""Model version swaps the Triton way: stage ``<model>/<N+1>/``, load it while N serves, probe, keep or roll back.

For a new base model or new model code. The model swapped is the one that holds the engine
(``peft_llm_stream``; ``peft_llm`` forwards to it and needs no reload). The server runs with
``--model-control-mode=explicit``; a load of a model whose newest version changed brings the new version
up beside the old one and unloads the old one once the new one is ready, so clients see no gap, but for
that while the host holds two copies of the base model: the swap is refused up front when the
deployment's memory budget cannot hold both. The load call goes over gRPC: over HTTP, Triton 24.10 held
some in-flight HTTP responses until a load finished.
"""

from __future__ import annotations

import os
import queue
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import tritonclient.grpc as grpcclient
from huggingface_hub import snapshot_download
from tqdm import tqdm
from tritonclient.utils import InferenceServerException

from peftserve.swap_history import HistoryEvent, SwapHistory
from tools.adapter_release import retire_directory
from tools.client import build_inputs
from tools.deployment import Deployment, ReleaseError

MODEL_EVENT_ADAPTER = "(model)"  # the history's adapter field for model version events
_MIB = 1024 * 1024


@dataclass
class ModelSwapResult:
    model: str
    version: int
    outcome: str  # loaded, rolled_back
    needed_mb: float
    seconds: float = 0.0
    detail: str = ""

    def to_dict(self) -> dict:
        return asdict(self)


def model_versions(model_dir: Path) -> list[int]:
    return sorted(int(p.name) for p in model_dir.iterdir() if p.is_dir() and p.name.isdigit())


def swap_memory_mb(deployment: Deployment) -> float:
    """Memory a swap holds at its peak: two model instances, each with the base weights, a full adapter
    cache and a full host tier of adapters (weights counted at their size on disk)."""
    config = deployment.serve_config
    base = Path(config.base_model)
    if not base.is_dir():
        base = Path(snapshot_download(config.base_model, local_files_only=True))
    weights = sum(p.stat().st_size for p in base.rglob("*") if p.suffix in {".safetensors", ".bin"})
    adapters = config.max_adapter_memory_bytes + config.host_adapter_cache_bytes
    return round(2 * (weights + adapters) / _MIB, 1)


def swap_model(deployment: Deployment, *, source: Path | None = None, timeout: float | None = None) -> ModelSwapResult:
    """Publish ``source`` (default: a copy of the newest version) as version N+1 and load it."""
    needed = swap_memory_mb(deployment)
    budget = deployment.limits.memory_budget_mb
    if needed > budget:
        raise ReleaseError(
            f"a model version swap needs about {needed:.0f} MiB (two copies of the base model and adapter "
            f"caches while both versions are loaded); the deployment's memory_budget_mb is {budget:.0f}. Raise the "
            "budget, or stop traffic and restart the server with the new version instead"
        )
    started = time.monotonic()
    model_dir = deployment.model_repository / deployment.engine_model
    current = model_versions(model_dir)[-1]
    version = current + 1
    staging = Path(tempfile.mkdtemp(prefix=".staging-", dir=model_dir))
    try:
        shutil.copytree(source or model_dir / str(current), staging, dirs_exist_ok=True, ignore=_ignore_caches)
        os.rename(staging, model_dir / str(version))
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    history = SwapHistory(deployment.adapter_repository)
    result = ModelSwapResult(deployment.engine_model, version, "loaded", needed)
    try:
        _load_and_probe(deployment, version, timeout)
    except ReleaseError as exc:
        retire_directory(model_dir / str(version), str(version))
        _load_and_probe(deployment, current, timeout)
        result.outcome, result.detail = "rolled_back", f"version {version} failed ({exc}); version {current} serves"
    history.record(
        HistoryEvent(
            "model_loaded" if result.outcome == "loaded" else "model_rolled_back",
            MODEL_EVENT_ADAPTER,
            version,
            "ok" if result.outcome == "loaded" else "failed",
            detail=result.detail or f"{deployment.engine_model} {current} -> {version}",
            source="tools",
        )
    )
    result.seconds = round(time.monotonic() - started, 2)
    return result


def rollback_model(deployment: Deployment, *, timeout: float | None = None) -> ModelSwapResult:
    """Retire the newest model version and load the one before it."""
    model_dir = deployment.model_repository / deployment.engine_model
    versions = model_versions(model_dir)
    if len(versions) < 2:
        raise ReleaseError(f"{model_dir} has versions {versions}: nothing to roll back to")
    started = time.monotonic()
    retire_directory(model_dir / str(versions[-1]), str(versions[-1]))
    _load_and_probe(deployment, versions[-2], timeout)
    SwapHistory(deployment.adapter_repository).record(
        HistoryEvent("model_rolled_back", MODEL_EVENT_ADAPTER, versions[-2], "ok", detail="on demand", source="tools")
    )
    return ModelSwapResult(
        deployment.engine_model, versions[-2], "rolled_back", 0.0, round(time.monotonic() - started, 2)
    )


def _load_and_probe(deployment: Deployment, version: int, timeout: float | None) -> None:
    """Ask every server to load the engine model, then check a request is answered by ``version``."""
    management, inference = deployment.management_headers("grpc"), deployment.inference_headers("grpc")
    model = deployment.engine_model
    for server in tqdm(deployment.servers, desc=f"loading {model} version {version}", unit="server"):
        client = grpcclient.InferenceServerClient(server.grpc)
        try:
            client.load_model(model, headers=management, client_timeout=timeout or None)
            served_by = _probe_version(client, model, inference, timeout or 60.0)
            _wait_for_old_versions_to_unload(client, model, str(version), management, timeout or 60.0)
        except InferenceServerException as exc:
            raise ReleaseError(f"{server.name}: {exc.message() or exc}") from exc
        finally:
            client.close()
        if served_by != str(version):
            raise ReleaseError(f"{server.name}: the probe was answered by version {served_by}, expected {version}")


def _probe_version(client: grpcclient.InferenceServerClient, model: str, headers: dict, timeout: float) -> str:
    """The version of ``model`` (decoupled: gRPC streaming) that answers a one-token base-model request."""
    answers: queue.Queue = queue.Queue()
    client.start_stream(callback=lambda result, error: answers.put((result, error)), headers=headers)
    try:
        client.async_stream_infer(model, build_inputs(grpcclient, "probe", "", 1))
        result, error = answers.get(timeout=timeout)
    finally:
        client.stop_stream()
    if error is not None:
        raise error
    return result.get_response().model_version


def _wait_for_old_versions_to_unload(
    client: grpcclient.InferenceServerClient, model: str, keep: str, headers: dict, timeout: float
) -> None:
    """A swap ends when the old version is gone: the next swap must not overlap its unloading (a crash of
    Triton 24.10's Python backend was seen when a load began while a decoupled version still unloaded)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        index = client.get_model_repository_index(headers=headers, as_json=True).get("models", [])
        others = [
            m for m in index if m["name"] == model and m.get("version") != keep and m.get("state") != "UNAVAILABLE"
        ]
        if not others:
            return
        time.sleep(0.2)
    raise ReleaseError(f"{model}: older versions still loaded {timeout:.0f} s after version {keep} took over")


def _ignore_caches(directory: str, names: list[str]) -> list[str]:
    return [name for name in names if name == "__pycache__"]
