"""The status document a server answers with, built from a real engine's state (no Triton)."""

from __future__ import annotations

import json
import shutil
import threading
from pathlib import Path

import pytest

from peftserve.adapter_status import SCHEMA_VERSION, AdapterState, AdapterStates, ServerStatus, server_status
from peftserve.engine import Engine
from peftserve.hot_swap import AdapterWatcher
from peftserve.requests import CompletionRequest
from peftserve.smoke_check import GOLDEN_FILE
from peftserve.swap_history import SwapHistory
from tests.conftest import DEMO_PHRASES, demo_config


@pytest.fixture
def repository(model_dir: Path, tmp_path: Path) -> Path:
    root = tmp_path / "adapters"
    for adapter_id in ("pirate", "robot"):
        shutil.copytree(model_dir / "adapters" / adapter_id / "1", root / adapter_id / "1")
    return root


@pytest.fixture
def engine(model_dir: Path, repository: Path) -> Engine:
    return Engine(demo_config(model_dir, adapter_repository=str(repository)))


def status_of(engine: Engine) -> ServerStatus:
    """The document as a client reads it: built, serialized, parsed back."""
    return ServerStatus.from_json(server_status(engine, model="peft_llm", model_version=3).to_json())


def complete(engine: Engine, adapter_id: str) -> str:
    """The adapter version that answered, or the error's class name."""
    (result,) = engine.complete([CompletionRequest("the cat looks at", adapter_id, max_tokens=8)])
    return type(result).__name__ if isinstance(result, Exception) else result.adapter_version


def test_a_served_adapter_is_reported_with_its_version_digest_and_memory(engine: Engine) -> None:
    assert status_of(engine) == ServerStatus("peft_llm", 3, ())  # nothing requested yet: nothing known
    assert complete(engine, "pirate") == "pirate@1"
    status = status_of(engine)
    (entry,) = status.adapters
    assert status.schema_version == SCHEMA_VERSION and status.model_version == 3
    assert (entry.adapter, entry.state, entry.serving_version) == ("pirate", AdapterState.SERVING, 1)
    assert entry.sha256 == engine.serving()["pirate"].digest and len(entry.sha256) == 64
    assert entry.loaded_bytes == engine.cache.sizes()[engine.serving()["pirate"]] > 0
    assert entry.rejected_version is None and entry.loading_version is None and entry.changed_at.endswith("+00:00")
    assert complete(engine, "no-such-adapter") == "AdapterNotFoundError"
    assert [e.adapter for e in status_of(engine).adapters] == ["pirate"]  # an unknown id never enters it


def test_a_rejected_version_is_reported_with_its_reason_while_the_old_one_serves(
    engine: Engine, model_dir: Path, repository: Path
) -> None:
    watcher = AdapterWatcher(engine, interval=0)
    complete(engine, "pirate")
    complete(engine, "robot")
    wrong = repository / "pirate" / "2"
    shutil.copytree(model_dir / "adapters" / "robot" / "1", wrong)
    (wrong / GOLDEN_FILE).write_text(json.dumps([{"prompt": "the cat looks at", "expected": DEMO_PHRASES["pirate"]}]))
    broken = repository / "robot" / "2"
    shutil.copytree(model_dir / "adapters" / "robot" / "1", broken)
    (broken / "adapter_model.safetensors").write_bytes(b"not a safetensors file")
    watcher.poll_once()

    pirate, robot = status_of(engine).adapters
    assert (pirate.state, pirate.serving_version, pirate.rejected_version) == (AdapterState.REJECTED, 1, 2)
    assert "smoke check of pirate@2 failed: golden prompt" in pirate.rejection_reason
    assert (robot.state, robot.serving_version, robot.rejected_version) == (AdapterState.REJECTED, 1, 2)
    assert "safetensors" in robot.rejection_reason and str(repository) not in robot.rejection_reason
    assert complete(engine, "pirate") == "pirate@1"

    shutil.copytree(model_dir / "adapters" / "pirate" / "1", repository / "pirate" / "3")
    watcher.poll_once()
    pirate = status_of(engine).adapter("pirate")
    assert (pirate.state, pirate.serving_version, pirate.rejected_version) == (AdapterState.SERVING, 3, 2)

    shutil.rmtree(repository / "robot")
    watcher.poll_once()
    robot = status_of(engine).adapter("robot")
    assert (robot.state, robot.serving_version, robot.sha256) == (AdapterState.RETIRED, None, "")


def test_a_first_load_that_fails_is_reported_as_rejected_with_nothing_serving(
    engine: Engine, model_dir: Path, repository: Path
) -> None:
    broken = repository / "broken" / "1"
    shutil.copytree(model_dir / "adapters" / "robot" / "1", broken)
    (broken / "adapter_config.json").write_text("{not json")
    assert complete(engine, "broken") == "AdapterLoadError"
    entry = status_of(engine).adapter("broken")
    assert (entry.state, entry.serving_version, entry.rejected_version) == (AdapterState.REJECTED, None, 1)
    assert entry.rejection_reason.startswith("broken/1/adapter_config.json")


def test_a_version_retired_while_it_is_checked_is_not_reported_as_rejected(
    engine: Engine, model_dir: Path, repository: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The tools retire a rejected version at once; a watcher poll that read it meanwhile must not replace
    the recorded reason with "files missing" (seen on a real server)."""
    watcher = AdapterWatcher(engine, interval=0)
    complete(engine, "pirate")
    shutil.copytree(model_dir / "adapters" / "robot" / "1", repository / "pirate" / "2")
    read_adapter = engine.read_adapter

    def retired_while_read(version):
        shutil.move(version.path, repository / "pirate" / ".retired-2")
        return read_adapter(version)

    monkeypatch.setattr(engine, "read_adapter", retired_while_read)
    watcher.poll_once()
    pirate = status_of(engine).adapter("pirate")
    assert (pirate.state, pirate.serving_version, pirate.rejected_version) == (AdapterState.SERVING, 1, None)
    assert [e.event for e in SwapHistory(repository).read()] == []
    assert complete(engine, "pirate") == "pirate@1"


def test_the_status_answers_while_the_model_is_busy(engine: Engine) -> None:
    complete(engine, "pirate")
    held, release = threading.Event(), threading.Event()

    def hold_the_model() -> None:
        with engine.lock:  # what a forward pass or a loader wrapping layers holds
            held.set()
            release.wait(30)

    holder = threading.Thread(target=hold_the_model)
    holder.start()
    held.wait(30)
    answered: list[ServerStatus] = []
    reader = threading.Thread(target=lambda: answered.append(status_of(engine)))
    reader.start()
    reader.join(5)
    release.set()
    holder.join()
    assert answered and answered[0].adapter("pirate").serving_version == 1


def test_loading_is_reported_while_a_candidate_is_checked() -> None:
    states = AdapterStates()
    states.serving("pirate", 1, "a" * 64)
    states.loading("pirate", 2)
    states.loading("pirate", 2)  # two loads of the same version at once (concurrent first requests)
    states.loading_done("pirate", 2)
    (entry,) = states.snapshot()
    assert (entry.state, entry.serving_version, entry.loading_version) == (AdapterState.LOADING, 1, 2)
    states.loading_done("pirate", 2)
    (entry,) = states.snapshot({"pirate": 512})
    assert (entry.state, entry.loading_version, entry.loaded_bytes) == (AdapterState.SERVING, None, 512)


@pytest.mark.parametrize(
    ("document", "message"),
    [
        ({"schema_version": 99, "model": "peft_llm", "model_version": 1, "adapters": []}, "schema_version 99"),
        ({"schema_version": SCHEMA_VERSION, "model": "peft_llm", "model_version": 1}, "adapters"),
        ({"schema_version": SCHEMA_VERSION, "model": "m", "model_version": 1, "adapters": [{"adapter": "x"}]}, "state"),
    ],
)
def test_documents_the_tools_cannot_read_are_refused(document: dict, message: str) -> None:
    with pytest.raises((ValueError, KeyError), match=message):
        ServerStatus.from_json(json.dumps(document))


def test_fields_added_by_a_newer_server_are_ignored() -> None:
    entry = {"adapter": "pirate", "state": "serving", "serving_version": 2, "future_field": 1}
    document = {"schema_version": SCHEMA_VERSION, "model": "peft_llm", "model_version": 1, "adapters": [entry]}
    status = ServerStatus.from_json(json.dumps({**document, "also_new": True}))
    assert status.adapter("pirate").serving_version == 2 and status.adapter("robot") is None
