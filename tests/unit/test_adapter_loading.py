"""An adapter load never delays requests for adapters already in memory (continuous batcher)."""

from __future__ import annotations

import threading
import time
from pathlib import Path

from peftserve.continuous import Work
from peftserve.engine import Engine
from peftserve.errors import AdapterLoadError
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


class CountingReads:
    """Wraps an engine's reads: counts them, and the most that ran at once."""

    def __init__(self, engine: Engine, monkeypatch, seconds: float, fail: str | None = None) -> None:
        self.calls: list[str] = []
        self.running = self.most = 0
        self._lock = threading.Lock()
        real = engine._read_adapter

        def read(version):
            with self._lock:
                self.calls.append(version.adapter_id)
                self.running += 1
                self.most = max(self.most, self.running)
            try:
                time.sleep(seconds)
                if version.adapter_id == fail:
                    raise AdapterLoadError(f"{fail} is broken")
                return real(version)
            finally:
                with self._lock:
                    self.running -= 1

        monkeypatch.setattr(engine, "_read_adapter", read)


def test_first_requests_for_one_adapter_share_one_load(model_dir: Path, monkeypatch) -> None:
    engine = Engine(demo_config(model_dir))
    reads = CountingReads(engine, monkeypatch, seconds=0.5, fail="chef")
    answers = Answers()
    engine.batcher.submit(*(answers.work(f"wizard{i}", CompletionRequest("a dog", "wizard")) for i in range(4)))
    engine.batcher.submit(*(answers.work(f"chef{i}", CompletionRequest("a dog", "chef")) for i in range(3)))
    assert answers.all_in.wait(timeout=30)
    engine.batcher.close()
    assert sorted(reads.calls) == ["chef", "wizard"]
    for i in range(4):
        assert DEMO_PHRASES["wizard"] in answers.arrived[f"wizard{i}"][1].text
    for i in range(3):  # every request that waited on the failed load gets its error
        assert "chef is broken" in str(answers.arrived[f"chef{i}"][1])
    assert not engine._loads


def test_reads_are_bounded_by_loader_threads_and_never_wait_on_a_smoke_check(model_dir: Path, monkeypatch) -> None:
    """Loads waiting on their smoke checks hold no reading slot: with one loader thread, a second adapter is
    read while the first one's check is still running."""
    engine = Engine(demo_config(model_dir, loader_threads="1"))
    reads = CountingReads(engine, monkeypatch, seconds=0.05)
    real_check = engine._smoke_check
    checking, read_meanwhile = threading.Event(), threading.Event()

    def slow_check(version, weights):
        if version.adapter_id == "wizard":
            checking.set()
            read_meanwhile.wait(timeout=10)
            checking.clear()
        real_check(version, weights)

    def read_after_check_started(version):
        if checking.is_set():
            read_meanwhile.set()
        return real_read(version)

    monkeypatch.setattr(engine, "_smoke_check", slow_check)
    real_read = engine.read_adapter
    monkeypatch.setattr(engine, "read_adapter", read_after_check_started)
    answers = Answers()
    engine.batcher.submit(answers.work("wizard", CompletionRequest("a dog", "wizard")))
    assert checking.wait(timeout=10)
    adapters = ["pirate", "chef", "robot"]
    engine.batcher.submit(*(answers.work(adapter, CompletionRequest("a dog", adapter)) for adapter in adapters))
    assert answers.all_in.wait(timeout=30)
    engine.batcher.close()
    assert read_meanwhile.is_set(), "a read waited for another adapter's smoke check"
    assert reads.most == 1
    for adapter in ["wizard", *adapters]:
        assert DEMO_PHRASES[adapter] in answers.arrived[adapter][1].text
