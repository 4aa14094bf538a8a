"""An adapter load never delays requests for adapters already in memory."""

from __future__ import annotations

import threading
import time
from pathlib import Path

from peftserve.engine import Completion, CompletionRequest, Engine
from peftserve.scheduler import Scheduler, Submission
from tests.conftest import DEMO_PHRASES, demo_config

SLOW_LOAD_SECONDS = 3.0


class Answers:
    """Collects each submission's answers and when they arrived."""

    def __init__(self) -> None:
        self.arrived: dict[str, tuple[float, list]] = {}
        self.done = threading.Event()

    def responder(self, name: str):
        def respond(answers: list) -> None:
            self.arrived[name] = (time.monotonic(), answers)
            if name == "slow":
                self.done.set()

        return respond


def test_a_slow_load_does_not_stall_loaded_adapters(model_dir: Path, monkeypatch) -> None:
    engine = Engine(demo_config(model_dir, preload="pirate"))
    real_read = engine.read_adapter

    def slow_read(version):
        if version.adapter_id == "wizard":
            time.sleep(SLOW_LOAD_SECONDS)
        return real_read(version)

    monkeypatch.setattr(engine, "read_adapter", slow_read)
    scheduler = Scheduler(engine)
    answers = Answers()
    started = time.monotonic()
    scheduler.submit([Submission([CompletionRequest("a dog", "wizard", max_tokens=24)], answers.responder("slow"))])
    for index in range(5):  # the batches that keep coming while the load runs
        scheduler.submit(
            [Submission([CompletionRequest("my friend", "pirate", max_tokens=24)], answers.responder(f"fast{index}"))]
        )
    assert answers.done.wait(timeout=30)
    scheduler.close()
    for index in range(5):
        arrived, (result,) = answers.arrived[f"fast{index}"]
        assert arrived - started < SLOW_LOAD_SECONDS, "a request for a loaded adapter waited for another's load"
        assert DEMO_PHRASES["pirate"] in result.text
    arrived, (slow,) = answers.arrived["slow"]
    assert arrived - started >= SLOW_LOAD_SECONDS
    assert isinstance(slow, Completion) and DEMO_PHRASES["wizard"] in slow.text


def test_unknown_adapters_are_answered_at_once(model_dir: Path) -> None:
    scheduler = Scheduler(Engine(demo_config(model_dir)))
    answers = Answers()
    scheduler.submit([Submission([CompletionRequest("a dog", "ghost")], answers.responder("ghost"))])
    _, (error,) = answers.arrived["ghost"]  # answered before submit returned: no background hop
    assert "unknown adapter 'ghost'" in str(error)
    scheduler.close()
