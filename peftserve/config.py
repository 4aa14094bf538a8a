"""Serving configuration, read from the ``parameters`` of ``config.pbtxt``.

Triton hands every parameter over as a string; pydantic converts and range-checks them and the errors of
all keys are reported together, naming the key, the value and what is allowed.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator, model_validator

from peftserve.errors import ConfigError

# Triton's own parameters that live beside ours in config.pbtxt and are not engine settings.
TRITON_RESERVED_PARAMETERS = frozenset({"EXECUTION_ENV_PATH", "FORCE_CPU_ONLY_INPUT_TENSORS"})


class AdapterLimits(BaseModel):
    """How much of the server one adapter may take; 0 means unlimited."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    max_inflight: int = Field(0, ge=0, description="requests inside the model at once (running or waiting)")
    rate_per_second: float = Field(0.0, ge=0, description="sustained requests per second (token bucket)")
    burst: int = Field(0, ge=0, description="requests allowed at once above the rate; 0: one second's worth")


class ServeConfig(BaseModel):
    """Everything the engine needs to serve; paths are absolute once built by :func:`from_parameters`."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    base_model: str = Field(description="local directory or Hugging Face model id (read from the local cache)")
    adapter_repository: str = Field("adapters", description="directory holding <adapter_id>/<version>/")
    dtype: Literal["auto", "float32", "float16", "bfloat16"] = "auto"
    default_max_tokens: int = Field(32, ge=1)
    max_tokens_limit: int = Field(256, ge=1)
    max_prompt_tokens: int = Field(1024, ge=1)
    max_prompt_bytes: int = Field(65536, ge=1)
    max_loaded_adapters: int = Field(16, ge=1)
    max_adapter_memory_mb: float = Field(1024.0, gt=0)
    host_adapter_cache_mb: float = Field(
        4096.0,
        ge=0,
        description="host memory for converted adapters, so that one evicted from the adapter cache comes back as "
        "a copy instead of a file read and conversion (peftserve/host_tier.py); on CPU it shares the adapter "
        "cache's tensors; 0: off",
    )
    preload: tuple[str, ...] = ()
    adapter_poll_seconds: float = Field(
        1.0, ge=0, description="how often to look for new adapter versions (hot-swap); 0 turns watching off"
    )
    attn_implementation: Literal["auto", "sdpa", "eager"] = Field(
        "auto", description="auto: what the model supports (sdpa where it can, else eager)"
    )
    adapter_limits: AdapterLimits = Field(
        default_factory=AdapterLimits, description="limits applied to every adapter id (and the base model)"
    )
    adapter_limit_overrides: dict[str, AdapterLimits] = Field(
        default_factory=dict, description='per adapter id, e.g. {"pirate": {"rate_per_second": 5}}; "(base)" too'
    )
    max_running_rows: int = Field(32, ge=1, description="requests inside the model at once (prefilling or decoding)")
    kv_cache_memory_mb: float = Field(
        0.0,
        ge=0,
        description="KV cache size; 0: what max_running_rows requests of the longest allowed length use, at most "
        "kv_cache_free_memory_fraction of free GPU memory (1 GiB on CPU)",
    )
    kv_cache_free_memory_fraction: float = Field(0.8, gt=0, le=1, description="used when kv_cache_memory_mb is 0")
    kv_block_size: int = Field(16, ge=1, le=1024, description="tokens per KV cache block")
    prefill_chunk_tokens: int = Field(
        512, ge=0, description="most prompt tokens prefilled per loop iteration, over joining requests; 0: no limit"
    )
    prefill_step_share: float = Field(
        1.0,
        ge=0,
        description="while streams decode, a prefill chunk takes about this many decoding steps' time (measured); "
        "0: always prefill_chunk_tokens",
    )
    response_cache_mb: float = Field(
        0.0,
        ge=0,
        description="memory for answers of greedy or seeded non-streaming requests, served again to identical "
        "requests (peftserve/response_cache.py); 0: off",
    )
    max_stop_strings: int = Field(4, ge=0, le=64)
    max_stop_string_bytes: int = Field(256, ge=1)
    blocked_patterns: tuple[str, ...] = Field((), description="regular expressions refused in prompts and answers")

    @field_validator("adapter_limits", "adapter_limit_overrides", "blocked_patterns", mode="before")
    @classmethod
    def _parse_json(cls, value: Any, info: ValidationInfo) -> Any:
        """Triton parameters are strings: structured settings arrive as JSON text (empty: the default)."""
        if isinstance(value, str):
            if not value.strip():
                return [] if info.field_name == "blocked_patterns" else {}
            try:
                return json.loads(value)
            except json.JSONDecodeError as exc:
                raise ValueError(f"expected JSON: {exc}") from exc
        return value

    @field_validator("blocked_patterns")
    @classmethod
    def _compile_patterns(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        for pattern in value:
            try:
                re.compile(pattern)
            except re.error as exc:
                raise ValueError(f"blocked pattern {pattern!r} is not a valid regular expression: {exc}") from exc
        return value

    @field_validator("preload", mode="before")
    @classmethod
    def _split_preload(cls, value: Any) -> Any:
        if isinstance(value, str):
            return tuple(item.strip() for item in value.split(",") if item.strip())
        return value

    @model_validator(mode="after")
    def _default_within_limit(self) -> ServeConfig:
        if self.default_max_tokens > self.max_tokens_limit:
            raise ValueError(
                f"default_max_tokens ({self.default_max_tokens}) exceeds max_tokens_limit ({self.max_tokens_limit})"
            )
        return self

    @property
    def max_adapter_memory_bytes(self) -> int:
        return int(self.max_adapter_memory_mb * 1024 * 1024)

    @property
    def host_adapter_cache_bytes(self) -> int:
        return int(self.host_adapter_cache_mb * 1024 * 1024)

    @property
    def response_cache_bytes(self) -> int:
        return int(self.response_cache_mb * 1024 * 1024)


def from_parameters(parameters: dict[str, Any], *, model_dir: Path) -> ServeConfig:
    """Build the config from Triton's ``parameters`` map (``{key: {"string_value": v}}``) or plain values.

    Relative paths resolve against ``model_dir`` (the model's directory in the Triton repository), so a
    repository can be moved or mounted anywhere.
    """
    values: dict[str, Any] = {}
    for key, raw in parameters.items():
        if key in TRITON_RESERVED_PARAMETERS:
            continue
        values[key] = raw["string_value"] if isinstance(raw, dict) else raw
    try:
        config = ServeConfig(**values)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc']) or 'config'}: {err['msg']} (got {err.get('input')!r})"
            for err in exc.errors()
        )
        raise ConfigError(f"invalid peft_llm parameters in config.pbtxt: {problems}") from exc
    return config.model_copy(
        update={
            "base_model": _resolve_local(config.base_model, model_dir),
            "adapter_repository": str((model_dir / config.adapter_repository).resolve()),
        }
    )


def _resolve_local(name_or_path: str, model_dir: Path) -> str:
    """A path relative to the model directory when it exists there; otherwise a hub id, left unchanged."""
    candidate = Path(name_or_path).expanduser()
    if not candidate.is_absolute():
        candidate = model_dir / candidate
    return str(candidate.resolve()) if candidate.exists() else name_or_path


def read_model_config(model_dir: Path) -> ServeConfig:
    """The engine settings of a model directory, read from its ``config.pbtxt`` as Triton parses it."""
    from google.protobuf import text_format
    from google.protobuf.message import DecodeError
    from tritonclient.grpc import model_config_pb2

    path = Path(model_dir) / "config.pbtxt"
    try:
        parsed = text_format.Parse(path.read_text(), model_config_pb2.ModelConfig())
    except (OSError, text_format.ParseError, DecodeError) as exc:
        raise ConfigError(f"cannot read {path}: {exc}") from exc
    parameters = {key: value.string_value for key, value in parsed.parameters.items()}
    return from_parameters(parameters, model_dir=Path(model_dir))
