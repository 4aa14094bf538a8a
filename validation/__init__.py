"""Adapter compatibility validation: can this adapter be served on this base model, and if not, why.

``validate_adapter(adapter_dir, base_model)`` runs every check and returns a :class:`ValidationReport`;
``python -m validation`` is the same from the shell. Nothing from the adapter is executed, and the base
model's weights are never loaded unless ``load=True`` asks for a real load and a smoke generation.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from validation.checks import BUILTIN_CHECKS
from validation.context import ValidationContext, ValidationOptions
from validation.report import Issue, Level, Severity, ValidationReport
from validation.rules import Rule, installed_rules

__all__ = [
    "Issue",
    "Level",
    "Rule",
    "Severity",
    "ValidationContext",
    "ValidationOptions",
    "ValidationReport",
    "validate_adapter",
]


def validate_adapter(
    adapter_dir: str | Path,
    base_model: str,
    options: ValidationOptions | None = None,
    *,
    rules: Iterable[Rule] = (),
) -> ValidationReport:
    """Run the built-in checks, installed rules and ``rules`` on one adapter version directory."""
    ctx = ValidationContext(Path(adapter_dir), base_model, options or ValidationOptions())
    for check in [*BUILTIN_CHECKS, *installed_rules(), *rules]:
        found = check(ctx)
        if found:
            ctx.report.issues.extend(found)
    return ctx.report
