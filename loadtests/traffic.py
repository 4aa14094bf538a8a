"""Which adapter each request names: the traffic patterns of the multi-adapter serving literature.

- ``base``: no adapter (the base model alone);
- ``single``: every request names the same adapter;
- ``uniform``: adapters drawn uniformly from N;
- ``trained``: drawn uniformly like ``uniform``, named apart because its adapters are the model's own trained
  ones (their types, ranks and target modules as trained) rather than synthetic LoRA;
- ``zipf``: adapters drawn from N with Zipf-skewed popularity (a few hot, a long tail);
- ``distinct``: every request names a different adapter, round robin over all N.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

PATTERNS = ("base", "single", "uniform", "trained", "zipf", "distinct")
ZIPF_EXPONENT = 1.1


@dataclass(frozen=True)
class TrafficPattern:
    kind: str
    adapters: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.kind not in PATTERNS:
            raise ValueError(f"unknown traffic pattern {self.kind!r}; choose from {', '.join(PATTERNS)}")
        if self.kind != "base" and not self.adapters:
            raise ValueError(f"pattern {self.kind!r} needs at least one adapter")

    @property
    def label(self) -> str:
        return self.kind if self.kind in ("base", "single") else f"{self.kind}-{len(self.adapters)}"

    def sample(self, count: int, *, seed: int = 0) -> list[str]:
        """``count`` adapter ids ("" for the base model), reproducibly."""
        rng = random.Random(seed)
        if self.kind == "base":
            return [""] * count
        if self.kind == "single":
            return [self.adapters[0]] * count
        if self.kind == "distinct":
            return [self.adapters[i % len(self.adapters)] for i in range(count)]
        weights = None
        if self.kind == "zipf":
            weights = [1 / (rank + 1) ** ZIPF_EXPONENT for rank in range(len(self.adapters))]
        return rng.choices(self.adapters, weights=weights, k=count)


def perf_analyzer_input_data(
    pattern: TrafficPattern, prompts: list[str], *, max_tokens: int, count: int, seed: int = 0, ignore_eos: bool = False
) -> dict:
    """perf_analyzer ``--input-data`` JSON: it cycles through these entries in order, so the adapter mix
    is fixed by the entries. Every entry sends ``adapter_id`` (empty for the base model) so that Triton's
    dynamic batcher may group all of them. ``ignore_eos`` makes every request generate exactly
    ``max_tokens``, so patterns compare equal work."""
    adapters = pattern.sample(count, seed=seed)
    entries = []
    for i, adapter in enumerate(adapters):
        entry = {"text_input": [prompts[i % len(prompts)]], "adapter_id": [adapter], "max_tokens": [max_tokens]}
        if ignore_eos:
            entry["ignore_eos"] = [True]
        entries.append(entry)
    return {"data": entries}
