"""Vectorised sampling draws from the right distribution, row by row, with top-k and top-p applied."""

from __future__ import annotations

import torch

from peftserve.generation import SamplingParams, _sample

LOGITS = torch.tensor([2.0, 1.0, 0.0, -1.0])


def draws(settings: SamplingParams, count: int = 4000) -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    noise = torch.rand(count, LOGITS.shape[0], generator=generator)
    return _sample(LOGITS.expand(count, -1), [settings] * count, noise)


def frequencies(tokens: torch.Tensor) -> torch.Tensor:
    return torch.bincount(tokens, minlength=LOGITS.shape[0]).float() / len(tokens)


def test_sampling_follows_the_softmax_at_each_temperature() -> None:
    for temperature in (0.5, 1.0, 2.0):
        expected = torch.softmax(LOGITS / temperature, dim=-1)
        torch.testing.assert_close(
            frequencies(draws(SamplingParams(temperature=temperature))), expected, atol=0.03, rtol=0
        )


def test_top_k_and_top_p_cut_the_tail() -> None:
    assert set(draws(SamplingParams(temperature=1.0, top_k=2)).tolist()) == {0, 1}
    assert set(draws(SamplingParams(temperature=1.0, top_k=1)).tolist()) == {0}
    # softmax([2, 1, 0, -1]) = [0.64, 0.24, 0.09, 0.03]: top_p 0.8 keeps the first two, 0.5 only the first.
    assert set(draws(SamplingParams(temperature=1.0, top_p=0.8)).tolist()) == {0, 1}
    assert set(draws(SamplingParams(temperature=1.0, top_p=0.5)).tolist()) == {0}
    kept = frequencies(draws(SamplingParams(temperature=1.0, top_k=3, top_p=0.8)))
    torch.testing.assert_close(kept[:2], torch.softmax(LOGITS[:2], dim=-1), atol=0.03, rtol=0)


def test_rows_with_different_settings_sample_independently_in_one_call() -> None:
    settings = [
        SamplingParams(temperature=1.0, top_k=1),
        SamplingParams(temperature=1.0),
        SamplingParams(1.0, top_p=0.5),
    ]
    noise = torch.rand(3, LOGITS.shape[0], generator=torch.Generator().manual_seed(1))
    tokens = _sample(LOGITS.expand(3, -1), settings, noise)
    assert tokens[0] == 0 and tokens[2] == 0
    assert tokens[1] == _sample(LOGITS[None], settings[1:2], noise[1:2])[0]  # the same draw alone
