"""The deployment config (``serving_config.yaml``) that every ``python -m tools`` subcommand reads.

It says where the servers are, which model repository they serve, which keys to send, and the limits the
tools enforce. Keys are never written into the file: it names environment variables that hold them, so
the file can be committed. Errors name the file, the field and what is allowed.
"""

from __future__ import annotations

import os
from functools import cached_property
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from peftserve.config import ServeConfig, read_model_config
from peftserve.contract import FORWARDER_MODEL

DEFAULT_PATH = Path("serving_config.yaml")


class DeploymentError(ValueError):
    """The deployment config is missing or invalid."""


class ReleaseError(RuntimeError):
    """A publish, rollback or model swap was refused or failed; the message says why and what to do."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Server(_Strict):
    """One Triton replica; addresses are host:port."""

    name: str = "local"
    http: str = "127.0.0.1:8000"
    grpc: str = "127.0.0.1:8001"
    metrics: str = "127.0.0.1:8002"

    @field_validator("http", "grpc", "metrics")
    @classmethod
    def _host_port(cls, value: str) -> str:
        host, _, port = value.rpartition(":")
        if not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ValueError(f"expected host:port, got {value!r}")
        return value


# Triton's restricted-API categories (--http-restricted-api / --grpc-restricted-protocol).
TRITON_API_CATEGORIES = (
    "health",
    "metadata",
    "inference",
    "shared-memory",
    "model-config",
    "model-repository",
    "statistics",
    "trace",
    "logging",
)
GRPC_HEADER_PREFIX = "triton-grpc-protocol-"
ApiCategory = Literal[TRITON_API_CATEGORIES]  # type: ignore[valid-type]


class ApiKey(_Strict):
    """A header Triton requires on some API categories, and the environment variable holding its value."""

    header: str = Field(pattern=r"^[A-Za-z0-9-]{1,64}$")
    value_env: str = Field(pattern=r"^[A-Za-z_][A-Za-z0-9_]*$")
    apis: tuple[ApiCategory, ...] = Field(min_length=1)
    optional: bool = Field(
        False, description="an unset variable means no key (as the compose entry point treats the inference key)"
    )

    def headers(self, protocol: str = "http") -> dict[str, str]:
        """The header to send; over gRPC Triton expects the name prefixed with ``triton-grpc-protocol-``."""
        value = os.environ.get(self.value_env)
        if not value:
            if self.optional:
                return {}
            raise DeploymentError(f"environment variable {self.value_env} (the {self.header} key) is not set")
        return {(GRPC_HEADER_PREFIX if protocol == "grpc" else "") + self.header: value}


class ManagementKey(ApiKey):
    """Guards what changes or inspects the server: loading models, shared memory, statistics, tracing, logs."""

    apis: tuple[ApiCategory, ...] = ("model-repository", "shared-memory", "statistics", "trace", "logging")


class InferenceKey(ApiKey):
    """Clients must send it to run inference (Triton's restricted ``inference`` category)."""

    apis: tuple[ApiCategory, ...] = ("inference",)


class Credentials(_Strict):
    management: ManagementKey | None = None
    inference: InferenceKey | None = None

    @model_validator(mode="after")
    def _each_category_once(self) -> Credentials:
        keys = [key for key in (self.management, self.inference) if key is not None]
        categories = [api for key in keys for api in key.apis]
        repeated = sorted({api for api in categories if categories.count(api) > 1})
        if repeated:
            raise ValueError(f"API categories {repeated} are given to more than one key; Triton takes one per category")
        return self

    def triton_args(self) -> list[str]:
        """Triton's restricted-API options for HTTP and gRPC; keys read from the environment now."""
        args = []
        for key in (self.management, self.inference):
            headers = key.headers() if key is not None else {}
            if not headers:
                continue
            ((header, value),) = headers.items()
            spec = f"{','.join(key.apis)}:{header}={value}"
            args += [f"--http-restricted-api={spec}", f"--grpc-restricted-protocol={spec}"]
        return args


class Limits(_Strict):
    memory_budget_mb: float = Field(
        16384, gt=0, description="host or GPU memory a model instance may use during a model version swap"
    )
    swap_timeout_seconds: float = Field(120, gt=0)


class Deployment(_Strict):
    path: Path = Field(DEFAULT_PATH, exclude=True)
    model_repository: Path = Path("model_repository")
    model: str = Field(FORWARDER_MODEL, description="the model clients call; its config.pbtxt holds the settings")
    servers: list[Server] = Field(default_factory=lambda: [Server()], min_length=1)
    credentials: Credentials = Credentials()
    limits: Limits = Limits()

    @property
    def model_dir(self) -> Path:
        return self.model_repository / self.model

    @cached_property
    def serve_config(self) -> ServeConfig:
        """The model's own settings (base model, adapter repository) from its config.pbtxt."""
        return read_model_config(self.model_dir)

    @property
    def engine_model(self) -> str:
        """The model that holds the engine (model swaps load its new versions), as the settings name it."""
        return self.serve_config.engine_model

    @property
    def adapter_repository(self) -> Path:
        return Path(self.serve_config.adapter_repository)

    def management_headers(self, protocol: str = "http") -> dict[str, str]:
        return self.credentials.management.headers(protocol) if self.credentials.management else {}

    def inference_headers(self, protocol: str = "http") -> dict[str, str]:
        return self.credentials.inference.headers(protocol) if self.credentials.inference else {}


def load_deployment(path: Path = DEFAULT_PATH) -> Deployment:
    """Read and validate the deployment file; relative paths resolve against the file's directory."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except OSError as exc:
        raise DeploymentError(f"cannot read deployment config {path}: {exc.strerror}") from exc
    except yaml.YAMLError as exc:
        raise DeploymentError(f"{path} is not valid YAML: {exc}") from exc
    if not isinstance(raw, dict):
        raise DeploymentError(f"{path} must hold a mapping of settings, got {type(raw).__name__}")
    try:
        deployment = Deployment(**raw)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc']) or '(top level)'}: {err['msg']}" for err in exc.errors()
        )
        raise DeploymentError(f"invalid deployment config {path}: {problems}") from exc
    repository = deployment.model_repository
    if not repository.is_absolute():
        repository = (path.parent / repository).resolve()
    return deployment.model_copy(update={"path": path, "model_repository": repository})
