"""Many small, distinct LoRA adapters for scale tests and benchmarks, saved by PEFT itself."""

from __future__ import annotations

from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model
from tqdm import tqdm
from transformers import AutoModelForCausalLM


def write_random_loras(
    base_model: Path, adapters_dir: Path, count: int, *, prefix: str = "a", seed: int = 0
) -> list[str]:
    """Write ``count`` rank-2 LoRA adapters on q and v of every layer, with random weights large enough
    that each answers differently; returns their ids (``<prefix>0000`` ...)."""
    model = get_peft_model(
        AutoModelForCausalLM.from_pretrained(base_model),
        LoraConfig(r=2, lora_alpha=2, target_modules=["q_proj", "v_proj"], init_lora_weights=False),
    )
    generator = torch.Generator().manual_seed(seed)
    ids = [f"{prefix}{index:04d}" for index in range(count)]
    for adapter_id in tqdm(ids, desc="writing adapters", unit="adapter", disable=count < 50):
        with torch.no_grad():
            for name, parameter in model.named_parameters():
                if "lora_" in name:
                    parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.6)
        model.save_pretrained(adapters_dir / adapter_id / "1")
    return ids
