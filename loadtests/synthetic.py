"""Many distinct LoRA adapters for scale tests and benchmarks, shaped like a trained one, saved by PEFT itself."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model
from tqdm import tqdm
from transformers import AutoModelForCausalLM


@dataclass(frozen=True)
class LoraShape:
    """What a LoRA adapter costs per token: its rank, scale numerator and the modules (and layers) it adapts."""

    rank: int
    alpha: float
    target_modules: tuple[str, ...]
    layers_to_transform: tuple[int, ...] | None = None

    @classmethod
    def of(cls, adapter_dir: Path) -> LoraShape:
        """The shape of the plain LoRA adapter saved in ``adapter_dir`` (a version directory)."""
        config = json.loads((adapter_dir / "adapter_config.json").read_text())
        if config["peft_type"] != "LORA" or config.get("use_dora") or config.get("use_rslora"):
            raise ValueError(f"{adapter_dir} is not a plain LoRA adapter; synthetic adapters copy plain LoRA only")
        targets = config["target_modules"]
        layers = config.get("layers_to_transform")
        return cls(
            rank=int(config["r"]),
            alpha=float(config["lora_alpha"]),
            target_modules=tuple(sorted([targets] if isinstance(targets, str) else targets)),
            layers_to_transform=tuple(layers) if layers else None,
        )

    def peft_config(self) -> LoraConfig:
        return LoraConfig(
            r=self.rank,
            lora_alpha=self.alpha,
            target_modules=list(self.target_modules),
            layers_to_transform=list(self.layers_to_transform) if self.layers_to_transform else None,
            init_lora_weights=False,
        )


def write_random_loras(
    base_model: Path,
    adapters_dir: Path,
    count: int,
    *,
    shape: LoraShape,
    prefix: str = "a",
    seed: int = 0,
    start: int = 0,
    strength: float = 6.0,
) -> list[str]:
    """Write ``count`` LoRA adapters of ``shape`` with random weights; returns their ids (``<prefix>0000`` ...).

    Each adapted module's update ``B @ A * scale`` adds about ``strength`` times the input's root mean square
    to each output element, whatever the width. The default is what rank-2 weights of standard deviation 0.6
    gave on the demo's 128-wide layers: enough that adapters answer differently from each other. Normalised
    layer inputs keep a deep model finite in float32.
    """
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(base_model), shape.peft_config())
    scale = shape.alpha / shape.rank
    generator = torch.Generator().manual_seed(seed + start)
    ids = [f"{prefix}{index:04d}" for index in range(start, start + count)]
    for adapter_id in tqdm(ids, desc="writing adapters", unit="adapter", disable=count < 50):
        with torch.no_grad():
            for name, parameter in model.named_parameters():
                if "lora_A" in name:  # (rank, in_features)
                    std = 1 / math.sqrt(parameter.shape[1])
                elif "lora_B" in name:  # (out_features, rank)
                    std = strength / (scale * math.sqrt(shape.rank))
                else:
                    continue
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * std)
        model.save_pretrained(adapters_dir / adapter_id / "1")
    return ids
