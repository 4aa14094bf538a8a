"""Read untrusted PEFT adapter files and convert them into the engine's per-module runtime form.

Every supported PEFT type is reduced to a few primitives that the batched layers can apply per row:
a low-rank pair (LoRA family), scaling vectors (IA3), key/value prefixes (prefix tuning) and virtual token
embeddings (prompt tuning, P-tuning). Shapes are checked against the base model here, so an incompatible
adapter fails at load with a message naming the tensor, instead of failing a batch later.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from peftserve.errors import AdapterLoadError, UnsupportedAdapterError

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
PICKLE_WEIGHTS_FILE = "adapter_model.bin"
MAX_CONFIG_BYTES = 1 << 20
_MODULE_KEY = re.compile(r"base_model\.model\.(?P<module>.+)\.(?P<param>lora_A\.weight|lora_B\.weight|ia3_l)")


@dataclass(frozen=True)
class BaseModelShape:
    """What adapter conversion needs to know about the base model."""

    linear_shapes: dict[str, tuple[int, int]]  # module name -> (in_features, out_features)
    num_layers: int
    num_kv_heads: int
    head_dim: int
    hidden_size: int
    dtype: torch.dtype
    device: torch.device

    @classmethod
    def describe(cls, model: torch.nn.Module) -> BaseModelShape:
        """Read the shape facts off a loaded (or ``meta``-device) transformers model, before any wrapping."""
        text_config = model.config.get_text_config()
        heads = text_config.num_attention_heads
        parameter = next(model.parameters())
        return cls(
            linear_shapes={
                name: (module.in_features, module.out_features)
                for name, module in model.named_modules()
                if type(module) is torch.nn.Linear
            },
            num_layers=text_config.num_hidden_layers,
            num_kv_heads=getattr(text_config, "num_key_value_heads", None) or heads,
            head_dim=getattr(text_config, "head_dim", None) or text_config.hidden_size // heads,
            hidden_size=text_config.hidden_size,
            dtype=parameter.dtype,
            device=parameter.device,
        )


@dataclass
class ModuleDelta:
    """Per-module parts of one adapter, stored ready for the batched matmuls."""

    lora_a: torch.Tensor | None = None  # (in, r): A transposed
    lora_b: torch.Tensor | None = None  # (r, out): B transposed, LoRA scaling folded in
    ia3_in: torch.Tensor | None = None  # (in,): IA3 on a feed-forward module scales the input
    ia3_out: torch.Tensor | None = None  # (out,): IA3 elsewhere scales the output


@dataclass
class AdapterWeights:
    """One adapter in runtime form; immutable once built."""

    peft_type: str
    modules: dict[str, ModuleDelta] = field(default_factory=dict)
    prefix_kv: torch.Tensor | None = None  # (layers, 2, kv_heads, virtual_tokens, head_dim)
    virtual_embeddings: torch.Tensor | None = None  # (virtual_tokens, hidden)

    @property
    def prefix_length(self) -> int:
        return 0 if self.prefix_kv is None else self.prefix_kv.shape[3]

    @property
    def virtual_length(self) -> int:
        return 0 if self.virtual_embeddings is None else self.virtual_embeddings.shape[0]

    def tensors(self) -> list[torch.Tensor]:
        """Every runtime tensor this adapter holds."""
        parts = [self.prefix_kv, self.virtual_embeddings]
        for delta in self.modules.values():
            parts += [delta.lora_a, delta.lora_b, delta.ia3_in, delta.ia3_out]
        return [t for t in parts if t is not None]

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors())


def read_adapter_files(path: Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """Load ``adapter_config.json`` and the safetensors weights of one adapter version directory.

    Pickle-based ``adapter_model.bin`` is refused: unpickling untrusted files executes code.
    """
    config_path, weights_path = path / CONFIG_FILE, path / WEIGHTS_FILE
    for file in (config_path, weights_path):
        if file.is_symlink():
            raise AdapterLoadError(f"{file} is a symlink; adapter files must be regular files")
    if not weights_path.is_file():
        if (path / PICKLE_WEIGHTS_FILE).exists():
            raise AdapterLoadError(
                f"{path} holds only pickle weights ({PICKLE_WEIGHTS_FILE}), refused because loading them can run "
                f"code; convert them to {WEIGHTS_FILE} (save_pretrained(..., safe_serialization=True))"
            )
        raise AdapterLoadError(f"{path} has no {WEIGHTS_FILE}")
    if config_path.stat().st_size > MAX_CONFIG_BYTES:
        raise AdapterLoadError(f"{config_path} is larger than {MAX_CONFIG_BYTES} bytes")
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise AdapterLoadError(f"{config_path} is not valid JSON: {exc}") from exc
    if not isinstance(config, dict):
        raise AdapterLoadError(f"{config_path} must hold a JSON object")
    try:
        tensors = load_file(str(weights_path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise AdapterLoadError(f"{weights_path} is not a readable safetensors file: {exc}") from exc
    return config, tensors


def check_servable(config: dict[str, Any]) -> None:
    """Raise :class:`UnsupportedAdapterError` for a PEFT type or option this engine cannot serve."""
    peft_type = str(config.get("peft_type", ""))
    if peft_type not in _CONVERTERS:
        raise UnsupportedAdapterError(
            f"unsupported peft_type {peft_type!r}; supported: {', '.join(sorted(_CONVERTERS))}"
        )
    if config.get("modules_to_save"):
        raise UnsupportedAdapterError(
            f"modules_to_save {config['modules_to_save']} would replace whole base modules per request; not supported"
        )
    if peft_type == "LORA":
        for option in ("use_dora", "lora_bias", "fan_in_fan_out"):
            if config.get(option):
                raise UnsupportedAdapterError(f"LoRA option {option}=true is not supported")


def convert_adapter(config: dict[str, Any], tensors: dict[str, torch.Tensor], base: BaseModelShape) -> AdapterWeights:
    """Turn a PEFT config and its tensors into :class:`AdapterWeights` checked against ``base``."""
    check_servable(config)
    for name, tensor in tensors.items():
        if not torch.isfinite(tensor).all():
            raise AdapterLoadError(f"tensor {name!r} holds NaN or Inf values")
    return _CONVERTERS[config["peft_type"]](config, tensors, base)


def _cast(tensor: torch.Tensor, base: BaseModelShape) -> torch.Tensor:
    return tensor.to(device=base.device, dtype=base.dtype).contiguous()


def _module_tensors(tensors: dict[str, torch.Tensor], base: BaseModelShape) -> dict[str, dict[str, torch.Tensor]]:
    """Group ``base_model.model.<module>.<param>`` keys by module; refuse keys the engine cannot apply."""
    grouped: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        match = _MODULE_KEY.fullmatch(key)
        if match is None:
            raise UnsupportedAdapterError(f"unexpected tensor {key!r} in adapter weights")
        module = match["module"]
        if module not in base.linear_shapes:
            raise AdapterLoadError(f"tensor {key!r} targets {module!r}, which is not a linear layer of the base model")
        grouped.setdefault(module, {})[match["param"]] = tensor
    if not grouped:
        raise AdapterLoadError("adapter weights hold no tensors")
    return grouped


def _pattern_value(module: str, patterns: dict[str, Any], default: Any) -> Any:
    """PEFT's ``rank_pattern``/``alpha_pattern``: a key matches a module name's suffix, as a regex."""
    for pattern, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?({pattern})$", module):
            return value
    return default


def _expect_shape(name: str, tensor: torch.Tensor, expected: tuple[int, ...]) -> None:
    if tuple(tensor.shape) != expected:
        raise AdapterLoadError(f"tensor {name} has shape {tuple(tensor.shape)}, the base model needs {expected}")


def _convert_lora(config: dict[str, Any], tensors: dict[str, torch.Tensor], base: BaseModelShape) -> AdapterWeights:
    weights = AdapterWeights(peft_type="LORA")
    for module, params in _module_tensors(tensors, base).items():
        if set(params) != {"lora_A.weight", "lora_B.weight"}:
            raise AdapterLoadError(f"LoRA module {module!r} needs lora_A and lora_B, found {sorted(params)}")
        a, b = params["lora_A.weight"], params["lora_B.weight"]
        in_features, out_features = base.linear_shapes[module]
        rank = a.shape[0]
        _expect_shape(f"{module}.lora_A.weight", a, (rank, in_features))
        _expect_shape(f"{module}.lora_B.weight", b, (out_features, rank))
        alpha = float(_pattern_value(module, config.get("alpha_pattern"), config.get("lora_alpha", 8)))
        scaling = alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank
        weights.modules[module] = ModuleDelta(lora_a=_cast(a.t(), base), lora_b=_cast(b.t() * scaling, base))
    return weights


def _convert_ia3(config: dict[str, Any], tensors: dict[str, torch.Tensor], base: BaseModelShape) -> AdapterWeights:
    weights = AdapterWeights(peft_type="IA3")
    for module, params in _module_tensors(tensors, base).items():
        vector = params.get("ia3_l")
        if vector is None or len(params) != 1:
            raise AdapterLoadError(f"IA3 module {module!r} needs exactly one ia3_l tensor, found {sorted(params)}")
        in_features, out_features = base.linear_shapes[module]
        # PEFT stores (1, in) for feed-forward modules (input scaling) and (out, 1) for the others.
        if tuple(vector.shape) == (1, in_features):
            weights.modules[module] = ModuleDelta(ia3_in=_cast(vector.flatten(), base))
        elif tuple(vector.shape) == (out_features, 1):
            weights.modules[module] = ModuleDelta(ia3_out=_cast(vector.flatten(), base))
        else:
            raise AdapterLoadError(
                f"tensor {module}.ia3_l has shape {tuple(vector.shape)}, the base model needs "
                f"(1, {in_features}) or ({out_features}, 1)"
            )
    return weights


def _prompt_embeddings(tensors: dict[str, torch.Tensor]) -> torch.Tensor:
    if set(tensors) != {"prompt_embeddings"}:
        raise AdapterLoadError(f"prompt-learning adapters hold one tensor 'prompt_embeddings', found {sorted(tensors)}")
    return tensors["prompt_embeddings"]


def _convert_prefix(config: dict[str, Any], tensors: dict[str, torch.Tensor], base: BaseModelShape) -> AdapterWeights:
    embeddings = _prompt_embeddings(tensors)
    if int(config.get("num_transformer_submodules") or 1) != 1:
        raise UnsupportedAdapterError("prefix tuning with num_transformer_submodules != 1 (encoder-decoder)")
    virtual_tokens = embeddings.shape[0]
    _expect_shape(
        "prompt_embeddings",
        embeddings,
        (virtual_tokens, base.num_layers * 2 * base.num_kv_heads * base.head_dim),
    )
    # PEFT's layout: (tokens, layers * 2, heads, head_dim), keys at even and values at odd positions.
    kv = embeddings.view(virtual_tokens, base.num_layers, 2, base.num_kv_heads, base.head_dim)
    return AdapterWeights(peft_type="PREFIX_TUNING", prefix_kv=_cast(kv.permute(1, 2, 3, 0, 4), base))


def _convert_prompt(config: dict[str, Any], tensors: dict[str, torch.Tensor], base: BaseModelShape) -> AdapterWeights:
    # Saved prompt-learning embeddings are the encoder's output (P-tuning) or the table itself (prompt
    # tuning), so at inference both are virtual tokens prepended to the input embeddings.
    embeddings = _prompt_embeddings(tensors)
    _expect_shape("prompt_embeddings", embeddings, (embeddings.shape[0], base.hidden_size))
    return AdapterWeights(peft_type=str(config["peft_type"]), virtual_embeddings=_cast(embeddings, base))


_CONVERTERS: dict[str, Callable[[dict[str, Any], dict[str, torch.Tensor], BaseModelShape], AdapterWeights]] = {
    "LORA": _convert_lora,
    "IA3": _convert_ia3,
    "PREFIX_TUNING": _convert_prefix,
    "PROMPT_TUNING": _convert_prompt,
    "P_TUNING": _convert_prompt,
}
