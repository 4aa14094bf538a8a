"""Broken and unsafe adapters fail at load with a message that names the problem."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from peftserve.adapter_types import check_finite, convert_adapter
from peftserve.adapter_weights import read_adapter_files
from peftserve.engine import Engine
from peftserve.errors import AdapterLoadError, UnsupportedAdapterError


def rewrite_config(path: Path, **changes: object) -> None:
    config = json.loads((path / "adapter_config.json").read_text())
    config.update(changes)
    (path / "adapter_config.json").write_text(json.dumps(config))


def rewrite_tensors(path: Path, change: Callable[[dict[str, torch.Tensor]], None]) -> None:
    tensors = load_file(path / "adapter_model.safetensors")
    change(tensors)
    save_file(tensors, path / "adapter_model.safetensors")


def first_key(tensors: dict[str, torch.Tensor], suffix: str) -> str:
    return next(key for key in sorted(tensors) if key.endswith(suffix))


def pickle_only(path: Path) -> None:
    (path / "adapter_model.safetensors").rename(path / "adapter_model.bin")


def nan_weights(path: Path) -> None:
    rewrite_tensors(path, lambda t: t[first_key(t, "lora_B.weight")].fill_(float("nan")))


def wrong_rank_shape(path: Path) -> None:
    def change(tensors: dict[str, torch.Tensor]) -> None:
        key = first_key(tensors, "self_attn.q_proj.lora_A.weight")
        tensors[key] = torch.zeros(tensors[key].shape[0], tensors[key].shape[1] + 3)

    rewrite_tensors(path, change)


def unknown_module(path: Path) -> None:
    def change(tensors: dict[str, torch.Tensor]) -> None:
        key = first_key(tensors, "self_attn.q_proj.lora_A.weight")
        tensors[key.replace("q_proj", "no_such_proj")] = tensors.pop(key)

    rewrite_tensors(path, change)


def corrupt_safetensors(path: Path) -> None:
    (path / "adapter_model.safetensors").write_bytes(b"\x00\x01 not a safetensors file")


def symlinked_weights(path: Path) -> None:
    target = path.parent / "elsewhere.safetensors"
    (path / "adapter_model.safetensors").rename(target)
    (path / "adapter_model.safetensors").symlink_to(target)


BROKEN_LORA = [
    ("pickle only", pickle_only, AdapterLoadError, "pickle weights .* refused"),
    ("no weights", lambda p: (p / "adapter_model.safetensors").unlink(), AdapterLoadError, "has no adapter_model"),
    ("corrupt weights", corrupt_safetensors, AdapterLoadError, "not a readable safetensors file"),
    ("symlinked weights", symlinked_weights, AdapterLoadError, "is a symlink"),
    ("bad json", lambda p: (p / "adapter_config.json").write_text("{not json"), AdapterLoadError, "not valid JSON"),
    ("json not an object", lambda p: (p / "adapter_config.json").write_text("[1]"), AdapterLoadError, "JSON object"),
    ("NaN weights", nan_weights, AdapterLoadError, "NaN or Inf"),
    ("wrong shape", wrong_rank_shape, AdapterLoadError, r"has shape \(8, 131\), the base model needs \(8, 128\)"),
    (
        "unknown module",
        unknown_module,
        AdapterLoadError,
        "targets 'model.layers.0.self_attn.no_such_proj', which is not a linear layer",
    ),
    (
        "unknown type",
        lambda p: rewrite_config(p, peft_type="MAGIC"),
        UnsupportedAdapterError,
        "unsupported peft_type 'MAGIC'",
    ),
    ("DoRA without magnitudes", lambda p: rewrite_config(p, use_dora=True), AdapterLoadError, "lora_magnitude_vector"),
    ("LoRA bias", lambda p: rewrite_config(p, lora_bias=True), UnsupportedAdapterError, "lora_bias"),
    (
        "modules_to_save",
        lambda p: rewrite_config(p, modules_to_save=["lm_head"]),
        UnsupportedAdapterError,
        "modules_to_save",
    ),
]


@pytest.mark.parametrize(("case", "breaks", "error", "message"), BROKEN_LORA, ids=[c[0] for c in BROKEN_LORA])
def test_broken_adapter_is_refused_with_a_clear_message(
    engine: Engine, model_dir: Path, tmp_path: Path, case: str, breaks, error: type, message: str
) -> None:
    path = tmp_path / "adapter"
    shutil.copytree(model_dir / "adapters" / "pirate" / "1", path)
    breaks(path)
    with pytest.raises(error, match=message):
        convert_adapter(*read_adapter_files(path), engine.base_shape)


def test_prefix_for_another_architecture_is_refused(engine: Engine, model_dir: Path, tmp_path: Path) -> None:
    path = tmp_path / "adapter"
    shutil.copytree(model_dir / "adapters" / "poet" / "1", path)
    rewrite_tensors(path, lambda t: t.update(prompt_embeddings=torch.zeros(10, 100)))
    with pytest.raises(
        AdapterLoadError, match=r"prompt_embeddings has shape \(10, 100\), the base model needs \(10, 512\)"
    ):
        convert_adapter(*read_adapter_files(path), engine.base_shape)


def test_demo_adapters_convert_to_their_runtime_form(engine: Engine, model_dir: Path) -> None:
    def convert(adapter_id: str):
        return convert_adapter(*read_adapter_files(model_dir / "adapters" / adapter_id / "1"), engine.base_shape)

    pirate, chef, poet, oracle = (convert(a) for a in ["pirate", "chef", "poet", "oracle"])
    assert pirate.peft_type == "LORA" and pirate.modules["model.layers.0.self_attn.q_proj"].lora_a.shape == (128, 8)
    assert chef.modules["model.layers.0.mlp.down_proj"].in_scale.shape == (256,)
    assert chef.modules["model.layers.0.self_attn.k_proj"].out_scale.shape == (64,)
    assert poet.prefix_kv.shape == (4, 2, 2, 10, 32) and poet.prefix_length == 10
    assert oracle.virtual_embeddings.shape == (4, 128) and oracle.virtual_length == 4
    assert pirate.nbytes == sum(d.lora_a.numel() + d.lora_b.numel() for d in pirate.modules.values()) * 4


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_one_non_finite_value_among_tensors_of_several_dtypes_is_named(bad: float) -> None:
    tensors = {
        "a": torch.randn(8, 16),
        "b": torch.full((4, 4), 60000.0, dtype=torch.float16),  # near float16's largest value, finite
        "c": torch.randn(16, 8, dtype=torch.bfloat16),
        "d": torch.arange(6),  # integers are always finite
        "e": torch.randn(5, dtype=torch.float16),
    }
    check_finite(tensors)
    tensors["e"][3] = bad
    with pytest.raises(AdapterLoadError, match="tensor 'e' holds NaN or Inf"):
        check_finite(tensors)
    tensors["e"][3] = 0.0
    tensors["c"][2, 5] = bad
    with pytest.raises(AdapterLoadError, match="tensor 'c' holds NaN or Inf"):
        check_finite(tensors)
