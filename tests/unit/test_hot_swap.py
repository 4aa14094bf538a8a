"""Adapter versions switch in the engine without a reload: new, rejected, rolled back, changed in place."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from peftserve.engine import Engine
from peftserve.errors import AdapterLoadError, AdapterNotFoundError
from peftserve.hot_swap import AdapterWatcher
from peftserve.metrics import EngineMetrics
from peftserve.requests import CompletionRequest
from peftserve.smoke_check import GOLDEN_FILE
from peftserve.swap_history import SwapHistory
from tests.conftest import DEMO_PHRASES, demo_config


class RecordedEvents(EngineMetrics):
    def __init__(self) -> None:
        self.events: list[tuple[str, str, int | None]] = []
        self.serving: dict[str, int] = {}

    def adapter_event(self, event: str, adapter: str, version: int | None) -> None:
        self.events.append((event, adapter, version))

    def serving_version(self, adapter: str, version: int) -> None:
        self.serving[adapter] = version


@pytest.fixture
def repository(model_dir: Path, tmp_path: Path) -> Path:
    root = tmp_path / "adapters"
    shutil.copytree(model_dir / "adapters" / "pirate" / "1", root / "pirate" / "1")
    return root


@pytest.fixture
def engine(model_dir: Path, repository: Path) -> Engine:
    config = demo_config(model_dir, adapter_repository=str(repository))
    return Engine(config, metrics=RecordedEvents())


def publish_copy(model_dir: Path, repository: Path, source_id: str, adapter_id: str, version: int) -> Path:
    target = repository / adapter_id / str(version)
    shutil.copytree(model_dir / "adapters" / source_id / "1", target)
    return target


def answer(engine: Engine, adapter_id: str = "pirate"):
    (result,) = engine.complete([CompletionRequest("the cat looks at", adapter_id, max_tokens=24)])
    return result


def test_new_version_switches_and_old_one_is_freed_after_its_batches(
    engine: Engine, model_dir: Path, repository: Path
) -> None:
    watcher = AdapterWatcher(engine, interval=0)
    first = answer(engine)
    assert first.adapter_version == "pirate@1" and DEMO_PHRASES["pirate"] in first.text
    old = engine.serving()["pirate"]
    engine.cache.acquire(old, lambda: pytest.fail("old version should still be cached"))  # a batch in flight
    publish_copy(model_dir, repository, "robot", "pirate", 2)
    watcher.poll_once()

    second = answer(engine)
    assert second.adapter_version == "pirate@2" and DEMO_PHRASES["robot"] in second.text
    assert old in engine.cache, "a version still leased by a batch must stay until the batch ends"
    engine.cache.release(old)
    assert old not in engine.cache
    assert engine.metrics.serving["pirate"] == 2
    (event,) = SwapHistory(repository).read()
    assert (event.event, event.version, event.outcome) == ("switched", 2, "ok")
    assert event.sha256 == engine.serving()["pirate"].digest and len(event.sha256) == 64


def test_broken_or_failing_version_is_rejected_and_the_old_one_keeps_serving(
    engine: Engine, model_dir: Path, repository: Path
) -> None:
    watcher = AdapterWatcher(engine, interval=0)
    answer(engine)
    broken = publish_copy(model_dir, repository, "robot", "pirate", 2)
    (broken / "adapter_model.safetensors").write_bytes(b"not a safetensors file")
    watcher.poll_once()
    watcher.poll_once()  # a rejected version is not retried while its files stay the same
    assert answer(engine).adapter_version == "pirate@1"
    assert engine.metrics.events == [("rejected", "pirate", 2)]

    wrong = publish_copy(model_dir, repository, "robot", "pirate", 3)
    golden = [{"prompt": "the cat looks at", "expected": DEMO_PHRASES["pirate"]}]
    (wrong / GOLDEN_FILE).write_text(json.dumps(golden))  # robot's weights cannot say the pirate's phrase
    watcher.poll_once()
    assert answer(engine).adapter_version == "pirate@1"
    rejected = [e for e in SwapHistory(repository).read() if e.event == "rejected"]
    assert [e.version for e in rejected] == [2, 3]
    assert "not a readable safetensors file" in rejected[0].detail
    assert "golden prompt" in rejected[1].detail and "pirate@1 keeps serving" in rejected[1].detail


def test_golden_prompts_that_match_let_the_version_serve(engine: Engine, model_dir: Path, repository: Path) -> None:
    watcher = AdapterWatcher(engine, interval=0)
    answer(engine)
    good = publish_copy(model_dir, repository, "robot", "pirate", 2)
    (good / GOLDEN_FILE).write_text(json.dumps([{"prompt": "a dog", "expected": DEMO_PHRASES["robot"]}]))
    watcher.poll_once()
    assert answer(engine).adapter_version == "pirate@2"


def test_removing_the_serving_version_rolls_back_and_removing_all_unserves(
    engine: Engine, model_dir: Path, repository: Path
) -> None:
    watcher = AdapterWatcher(engine, interval=0)
    publish_copy(model_dir, repository, "robot", "pirate", 2)
    assert answer(engine).adapter_version == "pirate@2"
    shutil.rmtree(repository / "pirate" / "2")
    watcher.poll_once()
    rolled_back = answer(engine)
    assert rolled_back.adapter_version == "pirate@1" and DEMO_PHRASES["pirate"] in rolled_back.text
    shutil.rmtree(repository / "pirate" / "1")
    watcher.poll_once()
    assert isinstance(answer(engine), AdapterNotFoundError)
    assert engine.metrics.serving["pirate"] == 0


def test_files_changed_in_place_are_detected_and_never_served(
    engine: Engine, model_dir: Path, repository: Path
) -> None:
    watcher = AdapterWatcher(engine, interval=0)
    answer(engine)
    watcher.poll_once()
    robot_weights = model_dir / "adapters" / "robot" / "1" / "adapter_model.safetensors"
    shutil.copyfile(robot_weights, repository / "pirate" / "1" / "adapter_model.safetensors")
    watcher.poll_once()
    assert ("files_changed", "pirate", 1) in engine.metrics.events
    still = answer(engine)  # the copy checked at load keeps serving
    assert still.adapter_version == "pirate@1" and DEMO_PHRASES["pirate"] in still.text

    engine.cache.retire(engine.serving()["pirate"])  # evicted from both tiers: the next load reads the files
    engine.host_tier.drop(engine.serving()["pirate"])
    refused = answer(engine)
    assert isinstance(refused, AdapterLoadError) and "changed on disk after it was accepted" in str(refused)


def test_candidate_with_a_symlinked_file_is_rejected_and_recorded(
    engine: Engine, model_dir: Path, repository: Path, tmp_path: Path
) -> None:
    watcher = AdapterWatcher(engine, interval=0)
    answer(engine)
    candidate = publish_copy(model_dir, repository, "robot", "pirate", 2)
    outside = tmp_path / "outside.safetensors"
    (candidate / "adapter_model.safetensors").rename(outside)
    (candidate / "adapter_model.safetensors").symlink_to(outside)
    watcher.poll_once()
    assert answer(engine).adapter_version == "pirate@1"
    (event,) = SwapHistory(repository).read()
    assert (event.event, event.version, event.sha256) == ("rejected", 2, "")  # cannot be hashed, still recorded
    assert "symlink" in event.detail


def test_a_poll_looks_closer_only_at_adapters_whose_files_changed(
    engine: Engine, model_dir: Path, repository: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    watcher = AdapterWatcher(engine, interval=0)
    for adapter_id in ("robot", "chef"):
        publish_copy(model_dir, repository, adapter_id, adapter_id, 1)
        answer(engine, adapter_id)
    answer(engine)
    listed: list[str] = []
    real_versions = engine.repository.versions
    monkeypatch.setattr(engine.repository, "versions", lambda a: (listed.append(a), real_versions(a))[1])
    watcher.poll_once()
    assert sorted(listed) == ["chef", "pirate", "robot"]  # the first poll reads everything
    listed.clear()
    watcher.poll_once()
    assert listed == []  # nothing changed: no adapter is listed again
    # A version directory made first and filled later (a copy in two steps) is still seen once complete.
    later = repository / "robot" / "2"
    later.mkdir()
    watcher.poll_once()
    assert engine.serving()["robot"].version == 1
    for source in (model_dir / "adapters" / "pirate" / "1").iterdir():
        shutil.copy(source, later / source.name)
    listed.clear()
    watcher.poll_once()
    assert listed == ["robot"]
    assert answer(engine, "robot").adapter_version == "robot@2"
