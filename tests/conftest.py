"""Shared fixtures: the demo model repository (built once if missing) and an engine over it."""

from __future__ import annotations

from pathlib import Path

import pytest

from peftserve.config import ServeConfig, from_parameters
from peftserve.engine import Engine
from tools import demo_assets

REPO_ROOT = Path(__file__).resolve().parents[1]
MODEL_REPOSITORY = REPO_ROOT / "model_repository"
MODEL_DIR = MODEL_REPOSITORY / "peft_llm"
DEMO_PHRASES = {adapter.adapter_id: adapter.phrase.strip() for adapter in demo_assets.demo_adapters()}
# Adapters whose brief training reliably yields their phrase for any prompt; prompt tuning and P-tuning
# are weaker on a 0.7M-parameter model and are checked against PEFT's logits instead.
STRONG_ADAPTERS = ["pirate", "robot", "knight", "wizard", "gardener", "astronaut", "chef", "poet"]
PROMPTS = ["the cat looks at", "a dog", "my friend writes about", "the river"]


@pytest.fixture(scope="session")
def model_dir() -> Path:
    if not (MODEL_DIR / "base_model" / "config.json").exists():
        demo_assets.build(MODEL_REPOSITORY)
    return MODEL_DIR


def demo_config(model_dir: Path, **overrides: str) -> ServeConfig:
    parameters = {"base_model": "base_model", "adapter_repository": "adapters", **overrides}
    return from_parameters(parameters, model_dir=model_dir)


@pytest.fixture(scope="session")
def engine(model_dir: Path) -> Engine:
    return Engine(demo_config(model_dir))
