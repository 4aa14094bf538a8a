"""Custom rules: operators add checks without editing this package.

A rule is any callable ``rule(ctx: ValidationContext) -> Iterable[Issue] | None``; it may also record
findings with ``ctx.add``. Rules come from the ``peftserve.validation_rules`` entry-point group of installed
packages, and from ``--rule package.module:function`` on the command line. They are the operator's code,
run after the built-in checks; nothing from the adapter is ever imported.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterable
from importlib.metadata import entry_points

from validation.context import ValidationContext
from validation.report import Issue

Rule = Callable[[ValidationContext], Iterable[Issue] | None]
ENTRY_POINT_GROUP = "peftserve.validation_rules"


class RuleLoadError(ValueError):
    """A --rule reference does not name an importable callable."""


def load_rule(reference: str) -> Rule:
    module_name, _, attribute = reference.partition(":")
    if not module_name or not attribute:
        raise RuleLoadError(f"rule {reference!r} must look like package.module:function")
    try:
        rule = getattr(importlib.import_module(module_name), attribute)
    except (ImportError, AttributeError) as exc:
        raise RuleLoadError(f"cannot load rule {reference!r}: {exc}") from exc
    if not callable(rule):
        raise RuleLoadError(f"rule {reference!r} is not callable")
    return rule


def installed_rules() -> list[Rule]:
    return [entry.load() for entry in entry_points(group=ENTRY_POINT_GROUP)]
