"""The check a new adapter version passes before it serves: finite logits, and its golden prompts.

A version may ship ``golden.json`` beside its weights: a list of ``{"prompt", "expected", "max_tokens"}``;
the greedy answer to each prompt must contain ``expected``. Publishers use it to pin the behaviour they
trained for, so a version that loads fine but answers wrong (a mixed-up upload, a bad merge) never serves.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import torch
from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError

from peftserve.errors import AdapterLoadError

GOLDEN_FILE = "golden.json"
MAX_GOLDEN_PROMPTS = 16
# A prompt every tokenizer encodes to a few tokens; the check looks at logits, not at the answer.
PROBE_PROMPT = "Hello, how are you?"


class GoldenPrompt(BaseModel):
    model_config = ConfigDict(extra="forbid")

    prompt: str = Field(max_length=4096)
    expected: str = Field(min_length=1, max_length=4096)
    max_tokens: int = Field(32, ge=1, le=256)


_GOLDEN_LIST = TypeAdapter(list[GoldenPrompt])


def read_golden_prompts(version_dir: Path) -> list[GoldenPrompt]:
    path = Path(version_dir) / GOLDEN_FILE
    if not path.is_file():
        return []
    try:
        prompts = _GOLDEN_LIST.validate_python(json.loads(path.read_text(encoding="utf-8")))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, ValidationError) as exc:
        raise AdapterLoadError(f"{path} is not a valid golden prompt list: {exc}") from exc
    if len(prompts) > MAX_GOLDEN_PROMPTS:
        raise AdapterLoadError(f"{path} lists {len(prompts)} golden prompts, at most {MAX_GOLDEN_PROMPTS} allowed")
    return prompts


def smoke_check(
    label: str,
    version_dir: Path,
    prompt_logits: Callable[[str], torch.Tensor],
    greedy_answer: Callable[[str, int], str],
) -> None:
    """Raise :class:`AdapterLoadError` saying what failed; ``prompt_logits`` and ``greedy_answer`` run the
    model with the new version's weights (the engine passes closures over them)."""
    logits = prompt_logits(PROBE_PROMPT)
    if not torch.isfinite(logits).all():
        bad = int((~torch.isfinite(logits)).sum())
        raise AdapterLoadError(f"smoke check of {label} failed: {bad} non-finite logits on a probe prompt")
    for golden in read_golden_prompts(version_dir):
        answer = greedy_answer(golden.prompt, golden.max_tokens)
        if golden.expected not in answer:
            raise AdapterLoadError(
                f"smoke check of {label} failed: golden prompt {golden.prompt!r} expected {golden.expected!r} "
                f"in the answer, got {answer!r}"
            )
