"""docker-compose.yml, the Dockerfile and deploy/: no Docker engine runs here, so the files are checked against
the project's configuration (ports, paths, keys, versions, the router rendering), compose's variable
substitution is applied as its specification describes, and the image's entry point runs for real against a
stand-in ``tritonserver`` that records its arguments."""

from __future__ import annotations

import fnmatch
import json
import os
import re
import shlex
import subprocess
from pathlib import Path

import pytest
import yaml

from tests.conftest import REPO_ROOT
from tools.deployment import DeploymentError, ManagementKey, load_deployment
from tools.image_requirements import dockerfile_args
from tools.scale_out import COMPOSE_REPLICAS, COMPOSE_ROUTER_CONFIG, compose_router_config

COMPOSE = yaml.safe_load((REPO_ROOT / "docker-compose.yml").read_text())
SERVICES = COMPOSE["services"]
ENTRYPOINT = REPO_ROOT / "deploy" / "triton-entrypoint.sh"
DOCKERFILE = (REPO_ROOT / "Dockerfile").read_text()
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


def dockerignore_admits(path: str) -> bool:
    """Whether the build context keeps ``path`` (Docker's rule: the last matching pattern decides)."""
    admitted = True
    for line in (REPO_ROOT / ".dockerignore").read_text().splitlines():
        pattern = line.strip()
        if not pattern or pattern.startswith("#"):
            continue
        negated, pattern = pattern.startswith("!"), pattern.removeprefix("!").rstrip("/")
        parts = Path(path).parts
        if any(fnmatch.fnmatch("/".join(parts[: i + 1]), pattern) for i in range(len(parts))):
            admitted = negated
    return admitted


def test_the_image_is_built_once_with_everything_the_engine_needs() -> None:
    """Dependencies, stub and engine are installed by the Dockerfile; a container start installs nothing."""
    for name in COMPOSE_REPLICAS:
        assert SERVICES[name]["build"] == "." and "entrypoint" not in SERVICES[name]
        assert not any(target == "/workspace" for _, target in host_paths(SERVICES[name]))  # no checkout mount
    copies = re.findall(r"^COPY\s+(.+?)\s+\S+$", DOCKERFILE, re.M)
    sources = [source for line in copies for source in line.split()]
    assert {"deploy/requirements-triton.txt", "deploy/triton-entrypoint.sh", "peftserve"} <= set(sources)
    for source in sources:
        assert (REPO_ROOT / source).exists() and dockerignore_admits(source), source
    assert not dockerignore_admits(".venv/bin/python") and not dockerignore_admits("model_repository/peft_llm")
    assert "pip install --no-cache-dir -r /opt/peftserve/requirements-triton.txt" in DOCKERFILE
    assert 'ENTRYPOINT ["/opt/peftserve/bin/triton-entrypoint.sh"]' in DOCKERFILE
    assert "pip install" not in ENTRYPOINT.read_text()  # nothing is installed at start-up any more
    args = dockerfile_args()
    assert "FROM nvcr.io/nvidia/tritonserver:${TRITON_RELEASE}-py3" in DOCKERFILE
    assert SERVICES["triton"]["image"] == f"peftserve-triton:{args['TRITON_RELEASE']}"
    # The stub for the engine's Python goes where the Python backend looks for it, and that Python's venv
    # is first on PATH (the stub embeds the first python3 there, as tools/triton_server.py arranges locally).
    assert 'install-python-backend-stub.sh /tmp/pytriton "${PYTHON_VERSION}"' in DOCKERFILE
    assert "/opt/tritonserver/backends/python" in DOCKERFILE
    assert re.search(r"^ENV PATH=/opt/peftserve/venv/bin:\$\{PATH\}", DOCKERFILE, re.M)
    assert '"python${PYTHON_VERSION}" -m venv /opt/peftserve/venv' in DOCKERFILE
    pyproject = (REPO_ROOT / "pyproject.toml").read_text()
    minor = int(args["PYTHON_VERSION"].split(".")[1])
    assert f'requires-python = ">=3.{minor},<3.{minor + 1}"' in pyproject


def test_the_stub_installer_puts_a_loadable_stub_in_place(tmp_path: Path) -> None:
    """The Dockerfile's stub step, run here on the installed nvidia-pytriton (the same wheel the image uses)."""
    import pytriton

    site_packages = Path(pytriton.__file__).parents[1]
    script = REPO_ROOT / "deploy" / "install-python-backend-stub.sh"
    backend, libraries = tmp_path / "backend", tmp_path / "lib"
    backend.mkdir()
    version = dockerfile_args()["PYTHON_VERSION"]
    done = subprocess.run([script, site_packages, version, backend, libraries], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    stub = backend / "triton_python_backend_stub"
    assert os.access(stub, os.X_OK) and any(p.name.startswith("libcudart") for p in libraries.iterdir())
    refused = subprocess.run([script, site_packages, "3.7", backend, libraries], capture_output=True, text=True)
    assert refused.returncode == 1 and "no Python-backend stub for Python 3.7" in refused.stderr


def compose_substitute(value: str, environment: dict[str, str]) -> str:
    """Compose's ``${VAR}``, ``${VAR:-default}`` and ``${VAR:?error}`` substitution (compose specification)."""

    def one(match: re.Match) -> str:
        name, operator, argument = match[1], match[2], match[3]
        if operator == ":?" and not environment.get(name):
            raise ValueError(f"required variable {name} is missing a value: {argument}")
        return environment.get(name) or (argument if operator == ":-" else "")

    return re.sub(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?:(:[-?])([^}]*))?\}", one, value)


@pytest.mark.parametrize("name", COMPOSE_REPLICAS)
def test_compose_refuses_to_start_triton_without_the_management_key(name: str) -> None:
    environment = SERVICES[name]["environment"]
    with pytest.raises(ValueError, match="PEFTSERVE_ADMIN_KEY is missing a value: set PEFTSERVE_ADMIN_KEY"):
        compose_substitute(environment["PEFTSERVE_ADMIN_KEY"], {})
    assert compose_substitute(environment["PEFTSERVE_ADMIN_KEY"], {"PEFTSERVE_ADMIN_KEY": "k"}) == "k"
    assert compose_substitute(environment["PEFTSERVE_INFERENCE_KEY"], {}) == ""  # inference keys stay optional


def run_entrypoint(tmp_path: Path, **keys: str) -> subprocess.CompletedProcess:
    """The image's entry point with a stand-in tritonserver on PATH that prints the arguments it got."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    fake = bin_dir / "tritonserver"
    fake.write_text('#!/bin/sh\nfor arg in "$@"; do echo "$arg"; done\n')
    fake.chmod(0o755)
    environment = {"PATH": f"{bin_dir}:/usr/bin:/bin", **keys}
    return subprocess.run([ENTRYPOINT, "--log-verbose=1"], env=environment, capture_output=True, text=True)


def test_the_entrypoint_refuses_to_start_without_the_management_key(tmp_path: Path) -> None:
    refused = run_entrypoint(tmp_path)
    assert refused.returncode == 64 and not refused.stdout  # tritonserver never ran
    assert "PEFTSERVE_ADMIN_KEY is not set" in refused.stderr
    refused = run_entrypoint(tmp_path, PEFTSERVE_ADMIN_KEY="", PEFTSERVE_INFERENCE_KEY="client")
    assert refused.returncode == 64 and not refused.stdout


def test_the_entrypoint_keys_management_always_and_inference_when_set(tmp_path: Path) -> None:
    management = "--http-restricted-api=model-repository,shared-memory,statistics,trace,logging:x-peftserve-admin-key=a"
    started = run_entrypoint(tmp_path, PEFTSERVE_ADMIN_KEY="a")
    assert started.returncode == 0, started.stderr
    args = started.stdout.splitlines()
    assert management in args and not any(arg.startswith("--http-restricted-api=inference") for arg in args)
    assert args[-1] == "--log-verbose=1" and args[: len(entrypoint_args())] == entrypoint_args()
    args = run_entrypoint(tmp_path, PEFTSERVE_ADMIN_KEY="a", PEFTSERVE_INFERENCE_KEY="c").stdout.splitlines()
    assert {
        management,
        "--http-restricted-api=inference:x-api-key=c",
        "--grpc-restricted-protocol=inference:x-api-key=c",
    } <= set(args)


@pytest.mark.parametrize("name", COMPOSE_REPLICAS)
def test_triton_services_agree_with_the_project(name: str) -> None:
    service = SERVICES[name]
    release = dockerfile_args()["TRITON_RELEASE"]
    assert service["image"] == f"peftserve-triton:{release}"
    requirements = (REPO_ROOT / "requirements.txt").read_text()
    assert f"tritonclient[all]=={TRITON_RELEASES[release]}.0" in requirements
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


@pytest.mark.parametrize("config", ["serving_config.compose.yaml", "serving_config.scale-out.yaml"])
def test_the_compose_configs_need_only_the_management_key(config: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """As the entry point: the management key always, the inference key when set."""
    deployment = load_deployment(REPO_ROOT / "deploy" / config)
    monkeypatch.setenv("PEFTSERVE_ADMIN_KEY", "admin")
    monkeypatch.delenv("PEFTSERVE_INFERENCE_KEY", raising=False)
    assert deployment.management_headers() == {"x-peftserve-admin-key": "admin"}
    assert deployment.inference_headers("grpc") == {}
    monkeypatch.setenv("PEFTSERVE_INFERENCE_KEY", "client")
    assert deployment.inference_headers("grpc") == {"triton-grpc-protocol-x-api-key": "client"}
    monkeypatch.delenv("PEFTSERVE_ADMIN_KEY")
    with pytest.raises(DeploymentError, match="PEFTSERVE_ADMIN_KEY"):
        deployment.management_headers()


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
