"""One real tritonserver on free loopback ports for the integration tests; always torn down."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient

from tests.conftest import MODEL_REPOSITORY
from tools.client import build_inputs
from tools.triton_server import TritonServer, TritonStartError, free_port


@pytest.fixture(scope="session")
def triton(
    model_dir: Path, tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest
) -> Iterator[TritonServer]:
    log_path = tmp_path_factory.mktemp("triton") / "server.log"
    server = TritonServer(
        MODEL_REPOSITORY,
        http_port=free_port(),
        grpc_port=free_port(),
        metrics_port=free_port(),
        log_path=log_path,
        address="127.0.0.1",
    )
    try:
        server.start(timeout=240)
    except TritonStartError as exc:
        pytest.fail(f"tritonserver did not start: {exc}")
    try:
        yield server
    finally:
        server.stop()
        if request.session.testsfailed:
            print(f"\n--- tritonserver log tail ({log_path}) ---\n{server.log_tail()}")


def infer(
    server: TritonServer,
    prompt: str | bytes,
    adapter_id: str = "",
    max_tokens: int | None = None,
    *,
    protocol: str = "grpc",
):
    module = grpcclient if protocol == "grpc" else httpclient
    client = module.InferenceServerClient(server.grpc_url if protocol == "grpc" else server.http_url)
    return client.infer("peft_llm", build_inputs(module, prompt, adapter_id, max_tokens))


def outputs(result) -> tuple[str, str, int]:
    """(text_output, adapter_version, output_tokens) of a one-row result."""
    return (
        result.as_numpy("text_output")[0, 0].decode(),
        result.as_numpy("adapter_version")[0, 0].decode(),
        int(result.as_numpy("output_tokens")[0, 0]),
    )
