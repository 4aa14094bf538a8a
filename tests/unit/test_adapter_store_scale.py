"""The adapter store under load: memory after many evictions, and 1,000 adapters behind a cache of 16."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from loadtests.synthetic import LoraShape, write_random_loras
from loadtests.traffic import TrafficPattern
from peftserve.engine import Engine
from peftserve.requests import Completion, CompletionRequest
from tests.conftest import demo_config

# Resident memory may wander by allocator noise, never by the size of what was loaded: 500 cycles of
# 4 adapters would leak over 100 MiB if evicted adapters stayed referenced.
RSS_TOLERANCE_BYTES = 24 * 2**20


def resident_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


def test_eviction_really_frees_memory(model_dir: Path) -> None:
    engine = Engine(demo_config(model_dir, max_loaded_adapters="2"))
    adapters = ["pirate", "knight", "wizard", "astronaut"]  # the four largest demo adapters

    def cycles(count: int) -> None:
        for cycle in range(count):
            (result,) = engine.complete([CompletionRequest("a dog", adapters[cycle % len(adapters)], max_tokens=1)])
            assert isinstance(result, Completion)

    cycles(40)  # warm-up: allocator pools, wrapped layers, first loads
    before = resident_bytes()
    evictions_before = engine.cache.stats.evictions
    cycles(500)
    growth = resident_bytes() - before
    assert engine.cache.stats.evictions - evictions_before == 500
    assert growth < RSS_TOLERANCE_BYTES, f"resident memory grew by {growth / 2**20:.1f} MiB over 500 load/evict cycles"
    assert len(engine.layers.recent) <= len(engine.cache), "recent batches outlived their evicted adapters"
    assert len(engine.layers.profiles) <= len(engine.cache), "module profiles outlived their evicted adapters"


@pytest.fixture(scope="module")
def thousand_adapters(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """1,000 small, distinct, random LoRA adapters saved by PEFT (rank 2 on q and v of every layer)."""
    root = tmp_path_factory.mktemp("store")
    shutil.copytree(model_dir / "base_model", root / "base_model")
    shape = LoraShape(rank=2, alpha=2, target_modules=("q_proj", "v_proj"))
    write_random_loras(root / "base_model", root / "adapters", 1000, shape=shape)
    return root


def test_thousand_adapters_zipf_traffic_cache_of_16(thousand_adapters: Path) -> None:
    engine = Engine(demo_config(thousand_adapters, max_loaded_adapters="16"))
    assert len(engine.repository.adapter_ids()) == 1000
    traffic = TrafficPattern("zipf", tuple(f"a{i:04d}" for i in range(1000))).sample(400, seed=7)
    prompts = ["the cat looks at", "a dog", "my friend writes about", "the river"]
    answers: dict[tuple[str, str], list[str]] = {}
    for start in range(0, len(traffic), 8):
        batch = [
            CompletionRequest(prompts[i % 4], adapter_id, max_tokens=6)
            for i, adapter_id in enumerate(traffic[start : start + 8], start)
        ]
        for request, result in zip(batch, engine.complete(batch), strict=True):
            assert isinstance(result, Completion) and result.adapter_version == f"{request.adapter_id}@1"
            answers.setdefault((request.adapter_id, request.text), []).append(result.text)
    assert len(engine.cache) == 16 and engine.cache.stats.evictions > 0 and engine.cache.stats.hits > 0
    # Every answer must equal what that adapter gives alone, in a fresh engine that never evicted.
    reference = Engine(demo_config(thousand_adapters, max_loaded_adapters="1000"))
    distinct = {text for texts in answers.values() for text in texts}
    assert len(distinct) > 20, "random adapters should answer differently"
    for (adapter_id, prompt), texts in answers.items():
        (alone,) = reference.complete([CompletionRequest(prompt, adapter_id, max_tokens=6)])
        assert set(texts) == {alone.text}, (adapter_id, prompt)
