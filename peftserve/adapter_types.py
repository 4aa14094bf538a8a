"""Convert each PEFT adapter type into the engine's runtime form, checked against the base model.

What each type becomes, so that one batch can mix them all in one forward pass:

- LoRA, rsLoRA: A and B·scaling (low-rank pair).
- DoRA: the LoRA pair plus an output scale ``magnitude / ||W + scaling·B·A||`` per output feature,
  computed once at load (PEFT treats the norm as a constant too); the bias is not scaled.
- AdaLoRA: A·diag(E) and B·scaling/rank, i.e. a plain low-rank pair.
- LoHa, LoKr: an exact low-rank pair built from their factors (:mod:`peftserve.exact_factors`): LoHa's
  Hadamard product as a face-splitting product of rank r1·r2, LoKr's Kronecker product as the Kronecker
  product of its factors' pairs, computed on the base weights' device. Where no factor form is below
  ``min(out, in)`` (LoKr with two full factors, LoHa with r² above it) the pair is the dense delta beside an
  identity: two dense matmuls per row, but it still shares the pass.
- IA3: an input (feed-forward modules) or output scaling vector.
- Prefix tuning: key/value prefixes per layer. Prompt tuning, P-tuning: virtual token embeddings (the
  saved embeddings are already the P-tuning encoder's output).

Shapes are checked here, so an incompatible adapter fails at load with a message naming the tensor.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import replace
from typing import Any

import torch

from peftserve.adapter_weights import AdapterWeights, BaseModelShape, ModuleDelta
from peftserve.errors import AdapterLoadError, UnsupportedAdapterError
from peftserve.exact_factors import hadamard_pair, kronecker_pair

_MODULE_KEY = re.compile(
    r"base_model\.model\.(?P<module>.+)\.(?P<param>lora_[AB]\.weight|lora_[ABE]|lora_magnitude_vector|ia3_l"
    r"|hada_w[12]_[ab]|lokr_w[12](?:_[ab])?)"
)
_ANY_MODULE_KEY = re.compile(r"base_model\.model\.(?P<module>.+?)\.(?:lora_|ia3_|hada_|lokr_)")

Converter = Callable[[dict[str, Any], dict[str, torch.Tensor], BaseModelShape], AdapterWeights]


def targeted_module(key: str) -> str | None:
    """The base-model module a PEFT tensor key belongs to, also for tensors the engine cannot apply (LoRA on
    an embedding: ``lora_embedding_A``); ``None`` for keys of no module (prompt learning)."""
    match = _ANY_MODULE_KEY.match(key)
    return match["module"] if match else None


def check_servable(config: dict[str, Any]) -> None:
    """Raise :class:`UnsupportedAdapterError` for a PEFT type or option this engine cannot serve."""
    peft_type = str(config.get("peft_type", ""))
    if peft_type not in CONVERTERS:
        raise UnsupportedAdapterError(
            f"unsupported peft_type {peft_type!r}; supported: {', '.join(sorted(CONVERTERS))}"
        )
    if config.get("modules_to_save"):
        raise UnsupportedAdapterError(
            f"modules_to_save {config['modules_to_save']} would replace whole base modules per request; not supported"
        )
    if config.get("target_parameters"):
        raise UnsupportedAdapterError(
            f"{peft_type} target_parameters {sorted(config['target_parameters'])} puts deltas on raw weight tensors "
            "(fused MoE experts, routers), which peftserve cannot apply per request; it serves adapters on linear "
            "layers only: train with target_modules naming linear layers and without target_parameters"
        )
    # fan_in_fan_out is not refused: PEFT decides the layout by the layer's type whatever the config says
    # (transposed for Conv1D, plain for nn.Linear), and so does the engine.
    for option in ("lora_bias", "trainable_token_indices", "layer_replication"):
        if config.get(option):
            raise UnsupportedAdapterError(f"{peft_type} option {option}={config[option]!r} is not supported")


def convert_adapter(config: dict[str, Any], tensors: dict[str, torch.Tensor], base: BaseModelShape) -> AdapterWeights:
    """Turn a PEFT config and its tensors into :class:`AdapterWeights` checked against ``base``."""
    check_servable(config)
    check_finite(tensors)
    return CONVERTERS[config["peft_type"]](config, tensors, base)


def check_finite(tensors: dict[str, torch.Tensor]) -> None:
    """Refuse NaN and Inf in any tensor, naming the first one that holds some.

    Floating tensors of one dtype are checked in one fused call that reads each tensor's largest magnitude
    (NaN and Inf carry through it; a finite tensor's is at most its dtype's largest value, so nothing
    overflows), instead of a check per tensor. This runs on a loader thread, whose Python shares the GIL with
    the decoding loop: measured 1.32 -> 0.40 ms for the 56 tensors of a demo LoRA (a demo read and conversion:
    2.22 -> 1.91 ms of CPU), 244 -> 217 ms for a 7B all-linear rank-16 one (one thread).
    """
    by_dtype: dict[torch.dtype, list[tuple[str, torch.Tensor]]] = {}
    for name, tensor in tensors.items():
        if tensor.is_floating_point() and tensor.numel():
            by_dtype.setdefault(tensor.dtype, []).append((name, tensor))
        elif tensor.is_complex() and not torch.isfinite(tensor).all():  # integers are always finite
            raise AdapterLoadError(f"tensor {name!r} holds NaN or Inf values")
    for named in by_dtype.values():
        finite = torch.isfinite(torch.stack(torch._foreach_norm([tensor for _, tensor in named], float("inf"))))
        if not finite.all():
            raise AdapterLoadError(f"tensor {named[int((~finite).nonzero()[0, 0])][0]!r} holds NaN or Inf values")


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
            raise AdapterLoadError(
                f"the adapter targets {module!r}, which is not a linear layer of the base model (peftserve applies "
                "adapters to nn.Linear layers, subclasses that compute the same, and Conv1D)"
            )
        if ".experts." in f".{module}.":
            raise UnsupportedAdapterError(
                f"tensor {key!r} targets {module!r}, a routed MoE expert: it sees only the tokens routed to it, which "
                "peftserve cannot map back to requests; adapt the attention or shared layers instead"
            )
        grouped.setdefault(module, {})[match["param"]] = tensor
    if not grouped:
        raise AdapterLoadError("adapter weights hold no tensors")
    return grouped


def _pattern_value(module: str, patterns: dict[str, Any] | None, default: Any) -> Any:
    """PEFT's ``rank_pattern``/``alpha_pattern``: a key matches a module name's suffix, as a regex."""
    for pattern, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?({pattern})$", module):
            return value
    return default


def _expect_shape(name: str, tensor: torch.Tensor, expected: tuple[int, ...]) -> None:
    if tuple(tensor.shape) != expected:
        raise AdapterLoadError(f"tensor {name} has shape {tuple(tensor.shape)}, the base model needs {expected}")


def _expect_params(peft_type: str, module: str, params: dict[str, torch.Tensor], allowed: set[str]) -> None:
    if not set(params) <= allowed:
        raise AdapterLoadError(f"{peft_type} module {module!r} holds {sorted(params)}; expected {sorted(allowed)}")


def _low_rank_pair(a: torch.Tensor, b: torch.Tensor, base: BaseModelShape) -> ModuleDelta:
    """``a``: (r, in), ``b``: (out, r) with delta = b @ a, stored transposed for ``x @ a.T @ b.T``."""
    return ModuleDelta(lora_a=_cast(a.t(), base), lora_b=_cast(b.t(), base))


def _convert_lora(config: dict[str, Any], tensors: dict[str, torch.Tensor], base: BaseModelShape) -> AdapterWeights:
    weights = AdapterWeights(peft_type="LORA")
    use_dora = bool(config.get("use_dora"))
    for module, params in _module_tensors(tensors, base).items():
        required = {"lora_A.weight", "lora_B.weight"} | ({"lora_magnitude_vector"} if use_dora else set())
        if set(params) != required:
            raise AdapterLoadError(f"LoRA module {module!r} needs {sorted(required)}, found {sorted(params)}")
        a, b = params["lora_A.weight"], params["lora_B.weight"]
        in_features, out_features = base.linear_shapes[module]
        rank = a.shape[0]
        _expect_shape(f"{module}.lora_A.weight", a, (rank, in_features))
        _expect_shape(f"{module}.lora_B.weight", b, (out_features, rank))
        alpha = float(_pattern_value(module, config.get("alpha_pattern"), config.get("lora_alpha", 8)))
        scaling = alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank
        delta = _low_rank_pair(a, b * scaling, base)
        if use_dora:
            magnitude = params["lora_magnitude_vector"]
            _expect_shape(f"{module}.lora_magnitude_vector", magnitude, (out_features,))
            weight = base.linear_weights[module]
            merged = weight.float() + (b.float() @ a.float()).to(weight.device) * scaling
            delta.out_scale = _cast(magnitude.to(weight.device).float() / torch.linalg.norm(merged, dim=1), base)
        weights.modules[module] = delta
    return weights


def _convert_adalora(config: dict[str, Any], tensors: dict[str, torch.Tensor], base: BaseModelShape) -> AdapterWeights:
    weights = AdapterWeights(peft_type="ADALORA")
    for module, params in _module_tensors(tensors, base).items():
        if set(params) != {"lora_A", "lora_B", "lora_E"}:
            raise AdapterLoadError(f"AdaLoRA module {module!r} needs lora_A, lora_B and lora_E, found {sorted(params)}")
        a, b, e = params["lora_A"], params["lora_B"], params["lora_E"]
        in_features, out_features = base.linear_shapes[module]
        rank = a.shape[0]
        _expect_shape(f"{module}.lora_A", a, (rank, in_features))
        _expect_shape(f"{module}.lora_B", b, (out_features, rank))
        _expect_shape(f"{module}.lora_E", e, (rank, 1))
        alpha = float(config.get("lora_alpha") or rank)
        # PEFT divides by the current rank plus 1e-5 (its ``ranknum``); folding keeps results identical.
        weights.modules[module] = _low_rank_pair(a * e, b * (alpha / (rank + 1e-5)), base)
    return weights


def _matrix(module: str, params: dict[str, torch.Tensor], param: str) -> torch.Tensor:
    tensor = params[param]
    if tensor.dim() != 2:
        raise AdapterLoadError(
            f"tensor {module}.{param} has shape {tuple(tensor.shape)}; a factor of an adapter on a linear layer is a "
            "matrix (convolution layouts are not served)"
        )
    return tensor


def _factor_placement(module: str, base: BaseModelShape) -> tuple[torch.device, torch.dtype]:
    """Where and how factor products are computed: on the module's own weight device (``meta`` in
    validation), in at least fp32 so that a bf16 base does not round the intermediate products."""
    weight = base.linear_weights.get(module)
    device = weight.device if weight is not None else base.device
    return device, torch.promote_types(base.dtype, torch.float32)


def _convert_loha(config: dict[str, Any], tensors: dict[str, torch.Tensor], base: BaseModelShape) -> AdapterWeights:
    weights = AdapterWeights(peft_type="LOHA")
    names = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b")
    for module, params in _module_tensors(tensors, base).items():
        if set(params) != set(names):
            raise AdapterLoadError(f"LoHa module {module!r} needs {sorted(names)}, found {sorted(params)}")
        factors = [_matrix(module, params, name) for name in names]
        in_features, out_features = base.linear_shapes[module]
        rank = factors[0].shape[1]
        for name, factor, expected in zip(names, factors, [(out_features, rank), (rank, in_features)] * 2, strict=True):
            _expect_shape(f"{module}.{name}", factor, expected)
        alpha = float(_pattern_value(module, config.get("alpha_pattern"), config.get("alpha", rank)))
        device, dtype = _factor_placement(module, base)
        left, right = hadamard_pair(*(factor.to(device=device, dtype=dtype) for factor in factors))
        weights.modules[module] = _low_rank_pair(right, left * (alpha / rank), base)
    return weights


def _lokr_chain(module: str, params: dict[str, torch.Tensor], side: str) -> list[torch.Tensor]:
    """One Kronecker factor of a LoKr module: ``[lokr_w1]`` (full) or ``[lokr_w1_a, lokr_w1_b]`` (low rank)."""
    full, low_rank = f"lokr_{side}", (f"lokr_{side}_a", f"lokr_{side}_b")
    present = {full, *low_rank} & set(params)
    if present == {full}:
        return [_matrix(module, params, full)]
    if present != set(low_rank):
        raise AdapterLoadError(
            f"LoKr module {module!r} needs either {full} or both {' and '.join(low_rank)}, found {sorted(params)}"
        )
    a, b = (_matrix(module, params, name) for name in low_rank)
    if b.shape[0] != a.shape[1]:
        raise AdapterLoadError(
            f"tensor {module}.{low_rank[1]} has shape {tuple(b.shape)}; its rows must match the rank "
            f"{a.shape[1]} of {module}.{low_rank[0]} {tuple(a.shape)}"
        )
    return [a, b]


def _convert_lokr(config: dict[str, Any], tensors: dict[str, torch.Tensor], base: BaseModelShape) -> AdapterWeights:
    weights = AdapterWeights(peft_type="LOKR")
    for module, params in _module_tensors(tensors, base).items():
        _expect_params(
            "LoKr", module, params, {"lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b"}
        )
        w1, w2 = (_lokr_chain(module, params, side) for side in ("w1", "w2"))
        # PEFT reshapes kron(W1, W2) to the weight's shape; for its own linear layers that is a no-op, and
        # a product of another shape would be a different layer, so it is refused.
        (a, c), (b, d) = ((chain[0].shape[0], chain[-1].shape[1]) for chain in (w1, w2))
        in_features, out_features = base.linear_shapes[module]
        if (a * b, c * d) != (out_features, in_features):
            raise AdapterLoadError(
                f"LoKr module {module!r}: the Kronecker product of its w1 factor {(a, c)} and w2 factor {(b, d)} "
                f"has shape {(a * b, c * d)}, the base model needs {(out_features, in_features)}"
            )
        rank = int(_pattern_value(module, config.get("rank_pattern"), config.get("r", 8)))
        alpha = float(_pattern_value(module, config.get("alpha_pattern"), config.get("alpha", rank)))
        device, dtype = _factor_placement(module, base)
        chains = [[t.to(device=device, dtype=dtype) for t in chain] for chain in (w1, w2)]
        left, right = kronecker_pair(*chains)
        factor1, factor2 = (chain[0] if len(chain) == 1 else chain[0] @ chain[1] for chain in chains)
        kronecker = (_cast(factor1 * (alpha / rank), base), _cast(factor2.t(), base))
        weights.modules[module] = replace(_low_rank_pair(right, left * (alpha / rank), base), kronecker=kronecker)
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
            weights.modules[module] = ModuleDelta(in_scale=_cast(vector.flatten(), base))
        elif tuple(vector.shape) == (out_features, 1):
            weights.modules[module] = ModuleDelta(out_scale=_cast(vector.flatten(), base), scales_bias=True)
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
    if base.latent_attention:
        raise UnsupportedAdapterError(
            "prefix tuning on multi-head latent attention (DeepSeek): the KV cache holds compressed latents, not "
            "per-head keys and values, so a key/value prefix has nowhere to go"
        )
    virtual_tokens = embeddings.shape[0]
    width = base.num_layers * 2 * base.num_kv_heads * base.head_dim
    if embeddings.shape[-1] != width and embeddings.shape[-1] % (base.num_layers * 2 * base.head_dim) == 0:
        heads = embeddings.shape[-1] // (base.num_layers * 2 * base.head_dim)
        why = " (multi-query attention: PEFT makes such prefixes for Falcon-7B and cannot run them either)"
        raise UnsupportedAdapterError(
            f"prefix tuning: prompt_embeddings hold key/values for {heads} heads per layer, the base model caches "
            f"{base.num_kv_heads}{why if base.num_kv_heads == 1 else ''}; retrain for this model's key/value heads"
        )
    _expect_shape("prompt_embeddings", embeddings, (virtual_tokens, width))
    # PEFT's layout: (tokens, layers * 2, heads, head_dim), keys at even and values at odd positions.
    kv = embeddings.view(virtual_tokens, base.num_layers, 2, base.num_kv_heads, base.head_dim)
    return AdapterWeights(peft_type="PREFIX_TUNING", prefix_kv=_cast(kv.permute(1, 2, 3, 0, 4), base))


def _convert_prompt(config: dict[str, Any], tensors: dict[str, torch.Tensor], base: BaseModelShape) -> AdapterWeights:
    embeddings = _prompt_embeddings(tensors)
    _expect_shape("prompt_embeddings", embeddings, (embeddings.shape[0], base.hidden_size))
    return AdapterWeights(peft_type=str(config["peft_type"]), virtual_embeddings=_cast(embeddings, base))


CONVERTERS: dict[str, Converter] = {
    "LORA": _convert_lora,
    "ADALORA": _convert_adalora,
    "LOHA": _convert_loha,
    "LOKR": _convert_lokr,
    "IA3": _convert_ia3,
    "PREFIX_TUNING": _convert_prefix,
    "PROMPT_TUNING": _convert_prompt,
    "P_TUNING": _convert_prompt,
}
