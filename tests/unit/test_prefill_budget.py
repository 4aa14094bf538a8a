"""The prefill chunk is sized in time while streams decode, and by its cap otherwise."""

from __future__ import annotations

import pytest

from peftserve.prefill_budget import PrefillBudget


def measured(budget: PrefillBudget, *, decode: float, per_token: float) -> PrefillBudget:
    budget.decoded(decode)
    budget.prefilled(100, 100 * per_token)
    return budget


def test_without_running_streams_or_measurements_the_cap_applies() -> None:
    assert PrefillBudget(max_tokens=512, share=1.0).tokens(streams_running=True) == 512
    budget = measured(PrefillBudget(max_tokens=512, share=1.0), decode=0.1, per_token=0.001)
    assert budget.tokens(streams_running=False) == 512
    assert (
        measured(PrefillBudget(max_tokens=0, share=1.0), decode=0.1, per_token=0.001).tokens(streams_running=False)
        is None
    )


@pytest.mark.parametrize(
    ("cap", "share", "decode", "per_token", "expected"),
    [
        (512, 1.0, 0.1, 0.001, 100),  # a chunk as long as a decoding step
        (512, 2.0, 0.1, 0.001, 200),
        (64, 1.0, 0.1, 0.001, 64),  # never over the cap
        (512, 1.0, 0.001, 0.001, 64),  # never under the minimum: short prompts join whole, long ones progress
        (8, 1.0, 0.001, 0.001, 8),  # ... unless the cap is smaller still
        (512, 0.0, 0.1, 0.001, 512),  # share 0: fixed chunks
    ],
)
def test_while_streams_decode_a_chunk_takes_about_a_decoding_steps_time(
    cap: int, share: float, decode: float, per_token: float, expected: int
) -> None:
    budget = measured(PrefillBudget(max_tokens=cap, share=share), decode=decode, per_token=per_token)
    assert budget.tokens(streams_running=True) == expected


def test_measurements_are_smoothed() -> None:
    budget = measured(PrefillBudget(max_tokens=0, share=1.0), decode=0.1, per_token=0.001)
    budget.decoded(1.1)  # one slow step moves the average by a fifth of the difference
    assert budget.decode_seconds == pytest.approx(0.3)
