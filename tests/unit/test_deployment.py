"""serving_config.yaml: defaults, clear errors, keys from the environment, Triton's restricted-API options."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.conftest import REPO_ROOT
from tools.deployment import DeploymentError, load_deployment


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "serving_config.yaml"
    path.write_text(text)
    return path


def test_the_committed_config_is_valid_and_points_at_the_model() -> None:
    deployment = load_deployment(REPO_ROOT / "serving_config.yaml")
    assert deployment.model_dir == REPO_ROOT / "model_repository" / "peft_llm"
    assert deployment.adapter_repository == deployment.model_dir / "adapters"
    assert deployment.servers[0].http == "127.0.0.1:8000"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("servers: [{http: 'localhost'}]", "servers.0.http: Value error, expected host:port"),
        ("limits: {memory_budget_mb: -1}", "limits.memory_budget_mb: Input should be greater than 0"),
        ("colour: red", "colour: Extra inputs are not permitted"),
        ("credentials: {management: {header: 'x admin', value_env: K}}", "credentials.management.header"),
        ("credentials: {inference: {header: x-k, value_env: K, apis: [everything]}}", "credentials.inference.apis"),
        ("- a list", "must hold a mapping"),
        ("servers: [", "is not valid YAML"),
        (
            "credentials: {management: {header: a, value_env: A}, inference: {header: b, value_env: B, "
            "apis: [inference, statistics]}}",
            "given to more than one key",
        ),
    ],
)
def test_invalid_configs_say_which_field_and_why(tmp_path: Path, text: str, message: str) -> None:
    with pytest.raises(DeploymentError, match=r"serving_config\.yaml") as excinfo:
        load_deployment(write(tmp_path, text))
    assert message in str(excinfo.value)


def test_keys_come_from_the_environment_and_become_triton_options(tmp_path: Path, monkeypatch) -> None:
    path = write(
        tmp_path,
        "credentials:\n  management: {header: x-admin, value_env: T_ADMIN}\n"
        "  inference: {header: x-api-key, value_env: T_CLIENT}\n",
    )
    deployment = load_deployment(path)
    with pytest.raises(DeploymentError, match=r"environment variable T_ADMIN \(the x-admin key\) is not set"):
        deployment.credentials.triton_args()
    monkeypatch.setenv("T_ADMIN", "a1")
    monkeypatch.setenv("T_CLIENT", "c1")
    assert deployment.credentials.triton_args() == [
        "--http-restricted-api=model-repository,shared-memory,statistics,trace,logging:x-admin=a1",
        "--grpc-restricted-protocol=model-repository,shared-memory,statistics,trace,logging:x-admin=a1",
        "--http-restricted-api=inference:x-api-key=c1",
        "--grpc-restricted-protocol=inference:x-api-key=c1",
    ]
    assert deployment.management_headers("grpc") == {"triton-grpc-protocol-x-admin": "a1"}
    assert deployment.inference_headers() == {"x-api-key": "c1"}
