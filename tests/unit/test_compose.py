"""docker-compose.yml and deploy/: no Docker engine runs here, so the files themselves are checked against
the project's configuration (ports, paths, keys, versions, the router rendering)."""

from __future__ import annotations

import json
import os
import re
import shlex
from pathlib import Path

import pytest
import yaml

from tests.conftest import REPO_ROOT
from tools.deployment import ManagementKey, load_deployment
from tools.scale_out import COMPOSE_REPLICAS, COMPOSE_ROUTER_CONFIG, compose_router_config

COMPOSE = yaml.safe_load((REPO_ROOT / "docker-compose.yml").read_text())
SERVICES = COMPOSE["services"]
ENTRYPOINT = REPO_ROOT / "deploy" / "triton-entrypoint.sh"
# NVIDIA's container release -> the tritonserver version it ships.
TRITON_RELEASES = {"24.10": "2.51"}


def entrypoint_args() -> list[str]:
    """The tritonserver arguments the entry point always passes (from its args=( ... ) array)."""
    block = re.search(r"^args=\((.*?)^\)", ENTRYPOINT.read_text(), re.S | re.M)[1]
    return shlex.split(block, comments=True)


def host_paths(service: dict) -> list[tuple[str, str]]:
    return [tuple(volume.split(":")[:2]) for volume in service.get("volumes", [])]


def test_services_and_profiles() -> None:
    assert set(SERVICES) == {"triton", "triton-b", "router", "prometheus", "grafana"}
    assert {name for name, s in SERVICES.items() if "scale-out" in s.get("profiles", [])} == {"triton-b", "router"}
    assert tuple(name for name in SERVICES if name.startswith("triton")) == COMPOSE_REPLICAS


def test_every_mounted_file_exists() -> None:
    for name, service in SERVICES.items():
        for source, _ in host_paths(service):
            if source.startswith("${"):
                continue  # the Hugging Face cache: a host setting
            assert (REPO_ROOT / source).exists(), f"{name} mounts missing {source}"
    assert os.access(ENTRYPOINT, os.X_OK)
    assert SERVICES["triton"]["entrypoint"] == ["/workspace/deploy/triton-entrypoint.sh"]


@pytest.mark.parametrize("name", COMPOSE_REPLICAS)
def test_triton_services_agree_with_the_project(name: str) -> None:
    service = SERVICES[name]
    image, release = service["image"].split(":")
    assert image == "nvcr.io/nvidia/tritonserver" and release.endswith("-py3")
    requirements = (REPO_ROOT / "requirements.txt").read_text()
    assert f"tritonclient[all]=={TRITON_RELEASES[release.removesuffix('-py3')]}.0" in requirements
    assert service["deploy"]["resources"]["reservations"]["devices"][0]["capabilities"] == ["gpu"]
    assert service["healthcheck"]["test"][-1] == "http://localhost:8000/v2/health/ready"
    mounts = dict(host_paths(service))
    args = entrypoint_args()
    assert f"--model-repository={mounts['./model_repository']}" in args
    assert {"--model-control-mode=explicit", "--load-model=*"} <= set(args)  # as tools/serve.py starts it
    container_ports = {int(mapping.split(":")[1]) for mapping in service["ports"]}
    assert container_ports == {8000, 8001, 8002}
    assert {"--http-port=8000", "--grpc-port=8001", "--metrics-port=8002"} <= set(args)
    exit_timeout = int(next(a for a in args if a.startswith("--exit-timeout-secs=")).split("=")[1])
    assert int(service["stop_grace_period"].removesuffix("s")) > exit_timeout


def test_host_ports_match_the_deployment_configs() -> None:
    local = load_deployment(REPO_ROOT / "serving_config.yaml").servers[0]
    compose = load_deployment(REPO_ROOT / "deploy" / "serving_config.compose.yaml").servers[0]
    scale_out = load_deployment(REPO_ROOT / "deploy" / "serving_config.scale-out.yaml").servers
    triton_host_ports = [int(m.split(":")[0]) for m in SERVICES["triton"]["ports"]]
    for server in (local, compose, scale_out[0]):
        assert [int(a.rpartition(":")[2]) for a in (server.http, server.grpc, server.metrics)] == triton_host_ports
    assert [int(a.rpartition(":")[2]) for a in (scale_out[1].http, scale_out[1].grpc, scale_out[1].metrics)] == [
        int(m.split(":")[0]) for m in SERVICES["triton-b"]["ports"]
    ]


def test_entrypoint_keys_match_the_compose_deployment_config() -> None:
    credentials = load_deployment(REPO_ROOT / "deploy" / "serving_config.compose.yaml").credentials
    script = ENTRYPOINT.read_text()
    management = f"{','.join(ManagementKey.model_fields['apis'].default)}:{credentials.management.header}="
    assert management in script and f"${{{credentials.management.value_env}}}" in script
    assert f"inference:{credentials.inference.header}=${{{credentials.inference.value_env}}}" in script
    for variable in (credentials.management.value_env, credentials.inference.value_env):
        assert variable in SERVICES["triton"]["environment"]


def test_container_requirements_use_the_project_pins() -> None:
    def pins(path: Path) -> dict[str, str]:
        lines = [line.split("#")[0].strip() for line in path.read_text().splitlines()]
        return dict(line.split("==") for line in lines if "==" in line)

    project = pins(REPO_ROOT / "requirements.txt")
    container = pins(REPO_ROOT / "deploy" / "requirements-triton.txt")
    assert container and all(project[name] == version for name, version in container.items())
    assert {"torch", "transformers", "peft", "safetensors", "pydantic"} <= set(container)


def test_router_config_is_the_rendered_template() -> None:
    assert COMPOSE_ROUTER_CONFIG.read_text() == compose_router_config()
    assert "./deploy/nginx/router.compose.conf" in dict(host_paths(SERVICES["router"]))
    assert set(SERVICES["router"]["depends_on"]) == set(COMPOSE_REPLICAS)
    text = COMPOSE_ROUTER_CONFIG.read_text()
    assert "hash $http_x_adapter_id consistent;" in text and "proxy_buffering off;" in text


def test_prometheus_scrapes_every_replica_and_grafana_is_provisioned() -> None:
    prometheus = yaml.safe_load((REPO_ROOT / "deploy" / "prometheus" / "prometheus.yml").read_text())
    targets = {t for job in prometheus["scrape_configs"] for group in job["static_configs"] for t in group["targets"]}
    assert targets == {f"{name}:8002" for name in COMPOSE_REPLICAS}
    datasource = yaml.safe_load(
        (REPO_ROOT / "deploy" / "grafana" / "provisioning" / "datasources" / "prometheus.yml").read_text()
    )["datasources"][0]
    assert datasource["url"] == "http://prometheus:9090"
    provider = yaml.safe_load(
        (REPO_ROOT / "deploy" / "grafana" / "provisioning" / "dashboards" / "peftserve.yml").read_text()
    )["providers"][0]
    assert provider["options"]["path"] == dict(host_paths(SERVICES["grafana"]))["./deploy/grafana/dashboards"]
    dashboard = json.loads((REPO_ROOT / "deploy" / "grafana" / "dashboards" / "peftserve.json").read_text())
    uids = {t["datasource"]["uid"] for panel in dashboard["panels"] for t in panel["targets"]}
    assert uids == {datasource["uid"]}
