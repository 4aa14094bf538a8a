"""How many prompt tokens the next prefill chunk may take, so running streams keep their pace.

A prefill chunk runs between two decoding steps, or inside one (a packed pass), so every running stream
waits for it. A fixed token count cannot suit every device: on a CPU a 256-token chunk of a small model
costs ten decoding steps, on a GPU about one. The budget is therefore set in time: while streams are
decoding, a chunk may take about ``share`` times as long as a decoding step, converted to tokens with the
prefill cost per token measured so far (moving averages of both). With nothing decoding, or before anything
is measured, the chunk is ``max_tokens``; it is never under ``min_tokens``, so a long prompt always
progresses and a group of short prompts joins in one forward pass (each extra pass costs throughput:
measured with ``make bench-continuous``, splitting short joins cost a fifth of continuous batching's gain).
"""

from __future__ import annotations

from dataclasses import dataclass

_SMOOTHING = 0.2  # weight of the newest measurement in the moving averages


@dataclass
class PrefillBudget:
    max_tokens: int  # 0: no limit
    share: float  # a chunk's time as a multiple of a decoding step's; 0: always max_tokens
    min_tokens: int = 64
    decode_seconds: float | None = None  # moving average of one decoding step
    seconds_per_token: float | None = None  # moving average of prefill time per prompt token

    def tokens(self, *, streams_running: bool) -> int | None:
        """The next chunk's size in tokens; None means no limit."""
        cap = self.max_tokens or None
        if not streams_running or not self.share or self.decode_seconds is None or not self.seconds_per_token:
            return cap
        fitting = max(self.min_tokens, int(self.share * self.decode_seconds / self.seconds_per_token))
        return fitting if cap is None else min(cap, fitting)

    def decoded(self, seconds: float) -> None:
        self.decode_seconds = _average(self.decode_seconds, seconds)

    def prefilled(self, tokens: int, seconds: float) -> None:
        if tokens:
            self.seconds_per_token = _average(self.seconds_per_token, seconds / tokens)

    def packed(self, tokens: int, seconds: float, *, streams_running: bool) -> None:
        """A packed pass of ``tokens`` prompt tokens, beside a decoding step when streams run: the chunk cost
        what the pass took beyond a decoding step (at least a tenth of the pass, against noise)."""
        if streams_running and self.decode_seconds is not None:
            seconds = max(seconds - self.decode_seconds, 0.1 * seconds)
        self.prefilled(tokens, seconds)


def _average(previous: float | None, value: float) -> float:
    return value if previous is None else (1 - _SMOOTHING) * previous + _SMOOTHING * value
