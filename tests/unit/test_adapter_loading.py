"""An adapter load never delays requests for adapters already in memory (continuous batcher)."""

from __future__ import annotations

import threading
import time
from pathlib import Path

from peftserve.continuous import Work
from peftserve.engine import Engine
from peftserve.requests import Completion, CompletionRequest
from tests.conftest import DEMO_PHRASES, demo_config

SLOW_LOAD_SECONDS = 3.0


class Answers:
    """Collects each request's answer and when it arrived."""

    def __init__(self) -> None:
        self.arrived: dict[str, tuple[float, object]] = {}
        self.all_in = threading.Event()
        self.expected = 0

    def work(self, name: str, request: CompletionRequest) -> Work:
        self.expected += 1

        def done(answer) -> None:
            self.arrived[name] = (time.monotonic(), answer)
            if len(self.arrived) == self.expected:
                self.all_in.set()

        return Work(request, on_done=done)


def test_a_slow_load_does_not_stall_loaded_adapters(model_dir: Path, monkeypatch) -> None:
    engine = Engine(demo_config(model_dir, preload="pirate"))
    real_read = engine.read_adapter

    def slow_read(version):
        if version.adapter_id == "wizard":
            time.sleep(SLOW_LOAD_SECONDS)
        return real_read(version)

    monkeypatch.setattr(engine, "read_adapter", slow_read)
    batcher = engine.batcher
    answers = Answers()
    started = time.monotonic()
    batcher.submit(answers.work("slow", CompletionRequest("a dog", "wizard", max_tokens=24)))
    for index in range(5):  # the requests that keep coming while the load runs
        batcher.submit(answers.work(f"fast{index}", CompletionRequest("my friend", "pirate", max_tokens=24)))
    assert answers.all_in.wait(timeout=30)
    batcher.close()
    for index in range(5):
        arrived, result = answers.arrived[f"fast{index}"]
        assert arrived - started < SLOW_LOAD_SECONDS, "a request for a loaded adapter waited for another's load"
        assert DEMO_PHRASES["pirate"] in result.text
    arrived, slow = answers.arrived["slow"]
    assert arrived - started >= SLOW_LOAD_SECONDS
    assert isinstance(slow, Completion) and DEMO_PHRASES["wizard"] in slow.text


def test_unknown_adapters_are_answered_with_their_error(model_dir: Path) -> None:
    batcher = Engine(demo_config(model_dir)).batcher
    answers = Answers()
    batcher.submit(answers.work("ghost", CompletionRequest("a dog", "ghost")))
    assert answers.all_in.wait(timeout=10)
    batcher.close()
    _, error = answers.arrived["ghost"]
    assert "unknown adapter 'ghost'" in str(error)
