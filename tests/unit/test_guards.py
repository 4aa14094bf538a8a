"""Per-adapter admission limits, stop strings and blocked-content patterns."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

from peftserve.admission import Admission
from peftserve.config import AdapterLimits
from peftserve.continuous import Work
from peftserve.engine import Engine
from peftserve.errors import BlockedContentError, InvalidRequestError, OverLimitError
from peftserve.requests import CompletionRequest
from tests.conftest import DEMO_PHRASES, demo_config


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_rate_limit_allows_the_burst_then_the_rate() -> None:
    clock = Clock()
    admission = Admission(AdapterLimits(rate_per_second=2, burst=3), clock=clock)
    for _ in range(3):
        admission.admit("pirate")
    with pytest.raises(OverLimitError, match=r"over limit: adapter 'pirate' exceeds its request rate \(2/s, burst 3\)"):
        admission.admit("pirate")
    admission.admit("robot")  # another adapter has its own bucket
    clock.now = 0.5  # one more token after half a second at 2/s
    admission.admit("pirate")
    with pytest.raises(OverLimitError):
        admission.admit("pirate")


def test_inflight_limit_counts_in_and_out_and_overrides_apply() -> None:
    admission = Admission(AdapterLimits(max_inflight=2), {"robot": AdapterLimits(max_inflight=0)})
    admission.admit("pirate")
    admission.admit("pirate")
    with pytest.raises(OverLimitError, match="already has 2 requests in flight"):
        admission.admit("pirate")
    admission.release("pirate")
    admission.admit("pirate")
    for _ in range(10):
        admission.admit("robot")  # unlimited by its override
    assert admission.inflight("pirate") == 2 and admission.inflight("robot") == 10


@pytest.fixture(scope="module")
def guarded(model_dir: Path) -> Engine:
    return Engine(
        demo_config(
            model_dir,
            blocked_patterns='["(?i)forbidden", "beep boop"]',
            max_stop_strings="2",
        )
    )


def test_over_limit_requests_are_refused_at_once_and_others_still_served(model_dir: Path) -> None:
    limited = Engine(demo_config(model_dir, adapter_limit_overrides='{"pirate": {"rate_per_second": 1, "burst": 2}}'))
    batcher = limited.batcher
    answers: dict[str, object] = {}
    finished = threading.Event()

    def work(name: str, adapter: str) -> Work:
        def done(answer) -> None:
            answers[name] = answer
            if len(answers) == 8:
                finished.set()

        return Work(CompletionRequest("a dog", adapter, max_tokens=24), on_done=done)

    for i in range(4):
        for adapter in ("pirate", "knight"):
            batcher.submit(work(f"{adapter}{i}", adapter))
    assert finished.wait(30)
    pirate = [answers[f"pirate{i}"] for i in range(4)]
    knight = [answers[f"knight{i}"] for i in range(4)]
    assert sum(isinstance(a, OverLimitError) for a in pirate) == 2
    assert all(DEMO_PHRASES["knight"] in a.text for a in knight)
    assert batcher.admission.inflight("pirate") == 0 and batcher.admission.inflight("knight") == 0


def test_stop_strings_end_generation_and_are_not_returned(guarded: Engine) -> None:
    (full,) = guarded.complete([CompletionRequest("the cat looks at", "pirate", max_tokens=24)])
    assert "hoist" in full.text
    (stopped,) = guarded.complete(
        [CompletionRequest("the cat looks at", "pirate", max_tokens=24, stop=("hoist", "zzz"))]
    )
    assert stopped.text == full.text[: full.text.index("hoist")]
    assert stopped.finish_reason == "stop" and stopped.output_tokens < full.output_tokens


@pytest.mark.parametrize(
    ("stop", "message"),
    [
        (("a", "b", "c"), "stop has 3 strings, at most 2 allowed"),
        (("",), "each stop string must have 1 to 256 bytes"),
        (("x" * 300,), "got 300"),
    ],
)
def test_bad_stop_strings_are_refused(guarded: Engine, stop: tuple[str, ...], message: str) -> None:
    (result,) = guarded.complete([CompletionRequest("a dog", stop=stop)])
    assert isinstance(result, InvalidRequestError) and message in str(result)


def test_blocked_patterns_refuse_prompts_and_withhold_answers(guarded: Engine) -> None:
    prompt, answer, fine = guarded.complete(
        [
            CompletionRequest("this is FORBIDDEN text"),
            CompletionRequest("the cat looks at", "robot", max_tokens=24),  # robot says "beep boop"
            CompletionRequest("the cat looks at", "pirate", max_tokens=24),
        ]
    )
    assert isinstance(prompt, BlockedContentError) and "text_input refused" in str(prompt) and "#0" in str(prompt)
    assert isinstance(answer, BlockedContentError) and "answer was withheld" in str(answer) and "#1" in str(answer)
    assert "forbidden" not in str(prompt).lower()  # the pattern itself is not revealed
    assert DEMO_PHRASES["pirate"] in fine.text
