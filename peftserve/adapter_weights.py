"""Untrusted adapter files in, and the engine's per-module runtime form of an adapter.

Every supported PEFT type is reduced (in :mod:`peftserve.adapter_types`) to a few primitives that the
batched layers apply per row: a low-rank pair, input and output scaling vectors, key/value prefixes and
virtual token embeddings.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors
from transformers.pytorch_utils import Conv1D

from peftserve.adapter_repository import read_version
from peftserve.errors import AdapterLoadError

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
PICKLE_WEIGHTS_FILE = "adapter_model.bin"
MAX_CONFIG_BYTES = 1 << 20
ADAPTER_FILES = (CONFIG_FILE, WEIGHTS_FILE)  # the files parse_adapter_files reads the bytes of


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
    linear_weights: dict[str, torch.Tensor] = field(default_factory=dict, repr=False)  # references, not copies
    latent_attention: bool = False  # DeepSeek's MLA: the KV cache holds compressed latents, not heads

    @classmethod
    def describe(cls, model: torch.nn.Module) -> BaseModelShape:
        """Read the shape facts off a loaded (or ``meta``-device) transformers model, before any wrapping."""
        text_config = model.config.get_text_config()
        heads = text_config.num_attention_heads
        parameter = next(model.parameters())
        linears = {name: module for name, module in model.named_modules() if is_linear_like(module)}
        return cls(
            linear_shapes={name: linear_features(module) for name, module in linears.items()},
            num_layers=text_config.num_hidden_layers,
            num_kv_heads=_num_kv_heads(text_config),
            head_dim=getattr(text_config, "head_dim", None) or text_config.hidden_size // heads,
            hidden_size=text_config.hidden_size,
            dtype=parameter.dtype,
            device=parameter.device,
            linear_weights={name: linear_weight(module) for name, module in linears.items()},
            latent_attention=bool(getattr(text_config, "kv_lora_rank", None)),
        )


def is_linear_like(module: torch.nn.Module) -> bool:
    """Layers the engine can wrap: transformers' ``Conv1D`` (GPT-2 and its descendants: a linear layer that
    stores its weight transposed), ``nn.Linear``, and subclasses of it whose own ``forward`` still computes
    ``x W^T + b`` (Falcon's ``FalconLinear``), but not those that compute something else with their weight
    (Phi-MoE's router returns routing decisions)."""
    if isinstance(module, Conv1D):
        return True
    if not isinstance(module, torch.nn.Linear):
        return False
    return type(module).forward is torch.nn.Linear.forward or _computes_linear(module)


def _computes_linear(module: torch.nn.Linear) -> bool:
    """Run the layer's own forward on small stand-in parameters (works on ``meta`` modules too)."""
    generator = torch.Generator().manual_seed(0)
    weight, x = torch.randn(3, 5, generator=generator), torch.randn(2, 5, generator=generator)
    parameters = {"weight": weight}
    if module.bias is not None:
        parameters["bias"] = torch.randn(3, generator=generator)
    try:
        out = torch.func.functional_call(module, parameters, (x,))
    except Exception:  # noqa: BLE001 - a forward that cannot take a plain input is not a linear layer
        return False
    expected = torch.nn.functional.linear(x, weight, parameters.get("bias"))
    return isinstance(out, torch.Tensor) and out.shape == expected.shape and torch.allclose(out, expected)


def linear_features(module: torch.nn.Module) -> tuple[int, int]:
    """``(in_features, out_features)`` of a linear-like layer."""
    if isinstance(module, Conv1D):
        return module.nx, module.nf
    return module.in_features, module.out_features


def linear_weight(module: torch.nn.Module) -> torch.Tensor:
    """The weight as ``(out, in)``, as PEFT reads it; a transposed view (no copy) for ``Conv1D``."""
    return module.weight.t() if isinstance(module, Conv1D) else module.weight


def _num_kv_heads(text_config: Any) -> int:
    """Key/value heads per layer in the KV cache, which is what prefix tuning fills.

    Falcon's layouts say it in flags: ``new_decoder_architecture`` (Falcon-40B) caches keys broadcast to
    every attention head; ``multi_query`` (Falcon-7B, GPT-BigCode) caches one head without setting
    ``num_key_value_heads``.
    """
    if getattr(text_config, "new_decoder_architecture", False):
        return int(text_config.num_attention_heads)
    if getattr(text_config, "multi_query", False):
        return 1
    for name in ("num_key_value_heads", "num_kv_heads"):
        if getattr(text_config, name, None):
            return int(getattr(text_config, name))
    return int(text_config.num_attention_heads)


@dataclass
class ModuleDelta:
    """Per-module parts of one adapter, stored ready for the batched matmuls."""

    lora_a: torch.Tensor | None = None  # (in, r): A transposed
    lora_b: torch.Tensor | None = None  # (r, out): B transposed, scaling folded in
    in_scale: torch.Tensor | None = None  # (in,): IA3 on a feed-forward module scales the input
    out_scale: torch.Tensor | None = None  # (out,): IA3 elsewhere, and DoRA's magnitude / column norm
    scales_bias: bool = False  # IA3 scales the whole output, bias included; DoRA leaves the bias alone
    # LoKr also keeps its Kronecker factors, ``(W1 * scaling (a, c), W2 transposed (d, b))`` with the delta
    # ``kron(W1, W2)``: where the exact pair's rank is large the CPU path computes through them instead,
    # reading a few thousand numbers instead of rank x (in + out) (peftserve.batched_layers).
    kronecker: tuple[torch.Tensor, torch.Tensor] | None = None


@dataclass
class AdapterWeights:
    """One adapter in runtime form; immutable once built."""

    peft_type: str
    modules: dict[str, ModuleDelta] = field(default_factory=dict)
    prefix_kv: torch.Tensor | None = None  # (layers, 2, kv_heads, virtual_tokens, head_dim)
    virtual_embeddings: torch.Tensor | None = None  # (virtual_tokens, hidden)
    # The PackedAdapter (peftserve.packed_adapter) whose buffer these tensors are views into, if any: the host
    # tier keeps that buffer as it is instead of packing a second copy.
    packed_from: Any = field(default=None, repr=False, compare=False)

    @property
    def prefix_length(self) -> int:
        return 0 if self.prefix_kv is None else self.prefix_kv.shape[3]

    @cached_property
    def scales(self) -> bool:
        """Whether any module scales its input or output (IA3, DoRA): batches without such an adapter skip
        looking for scaling vectors module by module."""
        return any(d.in_scale is not None or d.out_scale is not None for d in self.modules.values())

    @property
    def virtual_length(self) -> int:
        return 0 if self.virtual_embeddings is None else self.virtual_embeddings.shape[0]

    def tensors(self) -> list[torch.Tensor]:
        """Every runtime tensor this adapter holds."""
        parts = [self.prefix_kv, self.virtual_embeddings]
        for delta in self.modules.values():
            parts += [delta.lora_a, delta.lora_b, delta.in_scale, delta.out_scale, *(delta.kronecker or ())]
        return [t for t in parts if t is not None]

    @cached_property
    def nbytes(self) -> int:
        """Computed once, when the finished adapter is first sized: the cache and metrics read it often."""
        return sum(t.numel() * t.element_size() for t in self.tensors())


def read_adapter_files(path: Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """Load ``adapter_config.json`` and the safetensors weights of one adapter version directory, through the
    engine's own read (``read_version``: symlinks refused, each file read once) and :func:`parse_adapter_files`."""
    return parse_adapter_files(read_version(path, keep=ADAPTER_FILES)[1], path)


def parse_adapter_files(files: Mapping[str, bytes], path: Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """The config and tensors of one version from its files (``files``: by name relative to ``path``; the
    bytes of :data:`ADAPTER_FILES`, any other file only named).

    Pickle-based ``adapter_model.bin`` is refused: unpickling untrusted files executes code.
    """
    config_path, weights_path = path / CONFIG_FILE, path / WEIGHTS_FILE
    if WEIGHTS_FILE not in files:
        if PICKLE_WEIGHTS_FILE in files:
            raise AdapterLoadError(
                f"{path} holds only pickle weights ({PICKLE_WEIGHTS_FILE}), refused because loading them can run "
                f"code; convert them to {WEIGHTS_FILE} (save_pretrained(..., safe_serialization=True))"
            )
        raise AdapterLoadError(f"{path} has no {WEIGHTS_FILE}")
    if CONFIG_FILE not in files:
        raise AdapterLoadError(f"{path} has no {CONFIG_FILE}")
    if len(files[CONFIG_FILE]) > MAX_CONFIG_BYTES:
        raise AdapterLoadError(f"{config_path} is larger than {MAX_CONFIG_BYTES} bytes")
    try:
        config = json.loads(files[CONFIG_FILE].decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise AdapterLoadError(f"{config_path} is not valid JSON: {exc}") from exc
    if not isinstance(config, dict):
        raise AdapterLoadError(f"{config_path} must hold a JSON object")
    try:
        tensors = dict(sorted(load_safetensors(files[WEIGHTS_FILE]).items()))  # by name, as files list them
    except (SafetensorError, ValueError) as exc:
        raise AdapterLoadError(f"{weights_path} is not a readable safetensors file: {exc}") from exc
    return config, tensors
