"""Serving configuration: every setting of both models, read from the ``parameters`` of peft_llm's ``config.pbtxt``.

Triton hands every parameter over as a string; pydantic converts and range-checks them and the errors of
all keys are reported together, naming the key, the value and what is allowed.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator, model_validator

from peftserve.contract import ENGINE_MODEL, FORWARDER_MODEL
from peftserve.errors import ConfigError

# Triton's own parameters that live beside ours in config.pbtxt and are not engine settings.
TRITON_RESERVED_PARAMETERS = frozenset({"EXECUTION_ENV_PATH", "FORCE_CPU_ONLY_INPUT_TENSORS"})
# peft_llm_stream's only parameter: the model directory (relative to its own) whose config.pbtxt holds the settings.
SHARED_SETTINGS_PARAMETER = "engine_config"

# Loader threads beyond loader_threads (which bounds the ones reading and converting at once: Engine.read_adapter),
# for loads waiting on their smoke checks: the probes of adapters that arrive together then share passes instead
# of joining one pass each. In process, demo, 20 cold adapters arriving beside 4 decoding streams: the smoke checks
# were most of what the arrivals cost the streams (1.47 steps per arrival, 0.68 with the check skipped), their
# probes trickling in over 22-31 packed passes of ~2 steps each.
SMOKE_CHECKS_WAITING = 16


class AdapterLimits(BaseModel):
    """How much of the server one adapter may take; 0 means unlimited."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    max_inflight: int = Field(0, ge=0, description="requests inside the model at once (running or waiting)")
    rate_per_second: float = Field(0.0, ge=0, description="sustained requests per second (token bucket)")
    burst: int = Field(0, ge=0, description="requests allowed at once above the rate; 0: one second's worth")


class ServeConfig(BaseModel):
    """Every setting of both Triton models, each with its description (docs/reference/configuration.md is
    generated from them by ``python -m tools.reference_docs``); paths are absolute once built by
    :func:`from_parameters`."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    base_model: str = Field(
        description="local model directory (relative paths resolve against the model directory), or the id of a "
        "model in the local Hugging Face cache (never downloaded)"
    )
    adapter_repository: str = Field(
        "adapters", description="directory holding `<adapter_id>/<version>/` (relative to the model directory)"
    )
    dtype: Literal["auto", "float32", "float16", "bfloat16"] = Field(
        "auto", description="dtype of the weights; auto: float32 on CPU, the checkpoint's dtype on a GPU"
    )
    attn_implementation: Literal["auto", "sdpa", "eager"] = Field(
        "auto", description="auto: what the model supports (sdpa where it can, else eager, e.g. Gemma 2, Bloom)"
    )
    kv_reads: Literal["auto", "gathered", "in_place"] = Field(
        "auto",
        description="how forward passes read the paged KV cache: gathered copies every row's keys and values into "
        "a dense tensor (and a packed pass's mask) for sdpa, each layer of each step; in_place reads the blocks "
        "where they are, with triton-lang kernels for decoding and packed passes (needs CUDA, triton and a model "
        "on sdpa; checked against gathered reads at start, refusing to start if they differ); auto: in_place on "
        "CUDA where that check passes, gathered elsewhere",
    )
    decode_graphs: Literal["auto", "off", "on"] = Field(
        "auto",
        description="whether decoding steps replay CUDA graphs (one per batch-size bucket: 1, 2, 4, then multiples "
        "of 8 up to max_running_rows; captured on first use, again when adapter stacks grow or the ops in use "
        "change): on needs CUDA, "
        "kv_reads in place and adapter_compute on slot tables, and is checked against eager steps at start, "
        "refusing to start if it fails; auto: on where all that holds, off elsewhere",
    )
    adapter_compute: Literal["auto", "per_row", "slot_tables"] = Field(
        "auto",
        description="how adapter terms are computed: per_row stacks each batch's adapter pairs per rank bucket "
        "(torch; the CPU path), slot_tables keeps adapters in preallocated per-module stacks indexed per token "
        "(triton-lang kernels where triton and CUDA are present, torch otherwise); auto: slot_tables on CUDA; "
        "elsewhere per_row, except for batches of 9 or more distinct adapters, which go through slot_tables",
    )
    default_max_tokens: int = Field(32, ge=1, description="`max_tokens` of a request that omits it")
    max_tokens_limit: int = Field(256, ge=1, description="largest `max_tokens` a request may ask for")
    max_prompt_tokens: int = Field(
        1024, ge=1, description="longest prompt in tokens (a chat prompt after its template is applied)"
    )
    max_prompt_bytes: int = Field(
        65536, ge=1, description="longest prompt in UTF-8 bytes (`text_input` or `messages`), checked before tokenizing"
    )
    max_stop_strings: int = Field(4, ge=0, le=64, description="most `stop` strings one request may send")
    max_stop_string_bytes: int = Field(256, ge=1, description="longest `stop` string, in UTF-8 bytes")
    blocked_patterns: tuple[str, ...] = Field(
        (), description="JSON list of regular expressions refused in prompts and withheld from answers"
    )
    max_loaded_adapters: int = Field(
        16, ge=1, description="adapters held on the device at once; the least recently used is evicted first"
    )
    max_adapter_memory_mb: float = Field(1024.0, gt=0, description="device memory for loaded adapters, in MiB")
    host_adapter_cache_mb: float = Field(
        4096.0,
        ge=0,
        description="host memory for converted adapters, so that one evicted from the adapter cache comes back as "
        "a copy instead of a file read and conversion (peftserve/host_tier.py), each packed into one buffer; on "
        "CPU the adapter cache reads views into those buffers; 0: off",
    )
    preload: tuple[str, ...] = Field((), description="comma-separated adapter ids loaded at start and never evicted")
    adapter_poll_seconds: float = Field(
        1.0, ge=0, description="how often to look for new, changed and removed adapter versions (hot-swap); 0: off"
    )
    loader_threads: int = Field(
        2,
        ge=1,
        le=64,
        description="adapters read and converted at once beside the decoding loop; up to "
        f"{SMOKE_CHECKS_WAITING} more loads may wait on their smoke checks meanwhile, whose probes then share passes",
    )
    torch_threads: int = Field(
        0,
        ge=0,
        le=1024,
        description="intra-op threads of the decoding loop, which runs every forward pass; 0: torch's default "
        "(one per core). Every other thread of the engine runs torch single-threaded: on a CPU, OpenMP teams "
        "started from several threads slowed the loop's small operations down up to tenfold (measured)",
    )
    adapter_limits: AdapterLimits = Field(
        default_factory=AdapterLimits,
        description="JSON object of limits applied to every adapter id and to the base model (`(base)`): "
        "`max_inflight` (requests inside the model), `rate_per_second` (token bucket), `burst` (above the rate; "
        "0: one second's worth); 0 means unlimited",
    )
    adapter_limit_overrides: dict[str, AdapterLimits] = Field(
        default_factory=dict,
        description="JSON object of limits per adapter id that replace adapter_limits, e.g. "
        '`{"pirate": {"rate_per_second": 5}}`; `(base)` for the base model',
    )
    max_running_rows: int = Field(
        32, ge=1, description="requests inside the model at once (prefilling or decoding); more wait in the queue"
    )
    join_group: int = Field(
        4,
        ge=1,
        description="where prefill runs in passes of its own (packed_steps off, or a model that fails its packing "
        "check), waiting requests join the running batch together once this many wait (or they fill the free "
        "rows), at once when nothing runs: such a prefill pass costs on a CPU about a decoding step of the whole "
        "batch; with packed passes requests join at once",
    )
    join_every: int = Field(
        8,
        ge=1,
        description="waiting requests also join once the oldest of them has waited this many decoding steps "
        "(see join_group)",
    )
    kv_cache_memory_mb: float = Field(
        0.0,
        ge=0,
        description="KV cache size; 0: what max_running_rows requests of the longest allowed length use, at most "
        "kv_cache_free_memory_fraction of free GPU memory (1 GiB on CPU)",
    )
    kv_cache_free_memory_fraction: float = Field(
        0.8,
        gt=0,
        le=1,
        description="share of the GPU memory free after loading that the KV cache takes when kv_cache_memory_mb is 0",
    )
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
    packed_steps: bool = Field(
        True,
        description="prompt chunks share the decoding step's forward pass (one packed sequence, no padding) where a "
        "check at start shows the model gives the same logits that way; false: prefill passes of their own",
    )
    response_cache_mb: float = Field(
        0.0,
        ge=0,
        description="memory for answers of greedy or seeded non-streaming requests, served again to identical "
        "requests (peftserve/response_cache.py); 0: off",
    )
    served_model: str = Field(
        FORWARDER_MODEL,
        min_length=1,
        description="the model clients call, which forwards every request to engine_model; the engine's metrics "
        "carry its name in their `model` label",
    )
    engine_model: str = Field(ENGINE_MODEL, min_length=1, description="the model that holds the engine")
    forwarding_threads: int = Field(
        64,
        ge=1,
        le=1024,
        description="requests served_model forwards to engine_model at once (each waits on a thread for its "
        "answer); more wait in served_model's queue",
    )

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

    @model_validator(mode="after")
    def _forward_elsewhere(self) -> ServeConfig:
        if self.served_model == self.engine_model:
            raise ValueError(
                f"served_model and engine_model are both {self.engine_model!r}: a model cannot forward to itself"
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
        values[key] = _value(raw)
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


def triton_model_config(args: dict[str, Any]) -> ServeConfig:
    """The settings a Triton model of this repository runs with, from the ``args`` of its ``initialize``.

    They are its own ``parameters``, or, where those name ``engine_config``, the parameters of that model's
    ``config.pbtxt``: peft_llm_stream reads peft_llm's, so both models run with one validated set.
    """
    parameters = json.loads(args["model_config"]).get("parameters", {})
    model_dir = Path(args["model_repository"])
    shared = parameters.get(SHARED_SETTINGS_PARAMETER)
    if shared is None:
        return from_parameters(parameters, model_dir=model_dir)
    beside = sorted(set(parameters) - TRITON_RESERVED_PARAMETERS - {SHARED_SETTINGS_PARAMETER})
    if beside:
        raise ConfigError(
            f"{model_dir / 'config.pbtxt'} sets {beside} beside {SHARED_SETTINGS_PARAMETER}: settings belong in "
            f"the config.pbtxt that {SHARED_SETTINGS_PARAMETER} names"
        )
    return read_model_config((model_dir / _value(shared)).resolve())


def _value(raw: Any) -> Any:
    """A parameter's value from Triton's ``{"string_value": v}`` form, or a plain value as given."""
    return raw["string_value"] if isinstance(raw, dict) else raw
