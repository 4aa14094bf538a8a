"""State shared by the checks of one validation run, read lazily and at most once."""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import torch

from validation.base_model import BaseModelInfo, BaseModelUnavailable, inspect_base_model
from validation.report import Issue, Severity, ValidationReport


@dataclass(frozen=True)
class ValidationOptions:
    """How strict to be and what the serving model allows."""

    allow_pickle: bool = False  # read adapter_model.bin with torch.load(weights_only=True)
    load: bool = False  # really load base model and adapter, and generate once
    max_adapter_memory_mb: float | None = None  # the serving model's adapter cache
    max_rank: int | None = None
    serving_dtype: torch.dtype = torch.float32
    prompt: str = "the cat looks at"


class ValidationContext:
    """What checks read (adapter config, tensors, base model) and where they write findings."""

    def __init__(self, adapter_dir: Path, base_model: str, options: ValidationOptions) -> None:
        self.adapter_dir = adapter_dir
        self.base_model_name = base_model
        self.options = options
        self.report = ValidationReport(adapter_dir=str(adapter_dir), base_model=base_model)
        self.config: dict[str, Any] | None = None  # set by the files check once it parsed
        self.weights_path: Path | None = None  # set by the files check: the file to read tensors from
        self.tensor_shapes: dict[str, tuple[int, ...]] = {}

    def add(self, severity: Severity, category: str, message: str, hint: str = "", check: str = "") -> None:
        self.report.issues.append(Issue(severity, category, message, hint, check))

    def has_errors(self, category: str | None = None) -> bool:
        return any(i.severity == Severity.ERROR and category in (None, i.category) for i in self.report.issues)

    @property
    def peft_type(self) -> str:
        return str((self.config or {}).get("peft_type", ""))

    @cached_property
    def base(self) -> BaseModelInfo | None:
        """The base model (meta device); an unreadable one is an error, reported once."""
        try:
            return inspect_base_model(self.base_model_name)
        except BaseModelUnavailable as exc:
            self.add(
                Severity.ERROR,
                "architecture",
                str(exc),
                "pass --base-model a local model directory or a model id in the local Hugging Face cache",
            )
            return None

    @cached_property
    def tensors(self) -> dict[str, torch.Tensor]:
        """The adapter's tensors (safetensors; pickle only when allowed, and then weights-only)."""
        if self.weights_path is None:
            return {}
        if self.weights_path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(self.weights_path))
        return torch.load(self.weights_path, map_location="cpu", weights_only=True)
