"""Config schema per PEFT type: required fields and value ranges, then PEFT's own config checks."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from peft import PeftConfig, PeftType

from validation.context import ValidationContext
from validation.report import Severity

CATEGORY = "config"
LORA_FAMILY = {"LORA", "ADALORA", "LOHA", "LOKR"}
PROMPT_LEARNING = {"PREFIX_TUNING", "PROMPT_TUNING", "P_TUNING"}


def _positive_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def _positive_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and value > 0


def _probability(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and 0 <= value < 1


def _module_list(value: Any) -> bool:
    return (isinstance(value, str) and bool(value)) or (isinstance(value, list) and bool(value))


@dataclass(frozen=True)
class FieldRule:
    peft_types: frozenset[str]
    field: str
    required: bool
    valid: Callable[[Any], bool]
    requirement: str


FIELD_RULES = [
    FieldRule(frozenset({"LORA", "LOHA", "LOKR"}), "r", True, _positive_int, "an integer > 0"),
    FieldRule(frozenset({"ADALORA"}), "init_r", True, _positive_int, "an integer > 0"),
    FieldRule(frozenset({"ADALORA"}), "target_r", True, _positive_int, "an integer > 0"),
    FieldRule(frozenset({"LORA", "ADALORA"}), "lora_alpha", True, _positive_number, "a number > 0"),
    FieldRule(frozenset({"LOHA", "LOKR"}), "alpha", True, _positive_number, "a number > 0"),
    FieldRule(frozenset({"LORA", "ADALORA"}), "lora_dropout", False, _probability, "in [0, 1)"),
    FieldRule(frozenset({"LOHA", "LOKR"}), "rank_dropout", False, _probability, "in [0, 1)"),
    FieldRule(frozenset({"LOHA", "LOKR"}), "module_dropout", False, _probability, "in [0, 1)"),
    FieldRule(frozenset({"P_TUNING"}), "encoder_dropout", False, _probability, "in [0, 1)"),
    FieldRule(frozenset(PROMPT_LEARNING), "num_virtual_tokens", True, _positive_int, "an integer > 0"),
    FieldRule(
        frozenset(LORA_FAMILY | {"IA3"}),
        "target_modules",
        True,
        _module_list,
        "a non-empty list of module names or a regex string",
    ),
]


def check_schema(ctx: ValidationContext) -> None:
    config = ctx.config
    if config is None:
        return
    peft_type = config.get("peft_type")
    known = sorted(member.value for member in PeftType)
    if not peft_type:
        ctx.add(Severity.ERROR, CATEGORY, "adapter_config.json has no peft_type", f"set peft_type to one of {known}")
        return
    if peft_type not in known:
        ctx.add(Severity.ERROR, CATEGORY, f"unknown peft_type {peft_type!r}", f"PEFT knows: {', '.join(known)}")
        return
    before = len(ctx.report.issues)
    for rule in FIELD_RULES:
        if peft_type not in rule.peft_types:
            continue
        value = config.get(rule.field)
        if value is None:
            if rule.required and not (rule.field == "target_modules" and config.get("target_parameters")):
                ctx.add(
                    Severity.ERROR,
                    CATEGORY,
                    f"{peft_type} config lacks {rule.field}",
                    f"set {rule.field} to {rule.requirement}",
                )
        elif not rule.valid(value):
            ctx.add(
                Severity.ERROR,
                CATEGORY,
                f"{rule.field} = {value!r} is invalid for {peft_type}",
                f"{rule.field} must be {rule.requirement}",
            )
    _check_patterns(ctx, config)
    _check_relations(ctx, config, peft_type)
    if len(ctx.report.issues) == before:
        try:
            PeftConfig.from_peft_type(**config)
        except (TypeError, ValueError) as exc:
            ctx.add(
                Severity.ERROR, CATEGORY, f"PEFT rejects this config: {exc}", "re-create it with PEFT's config class"
            )


def _check_patterns(ctx: ValidationContext, config: dict[str, Any]) -> None:
    for field, valid, requirement in [
        ("rank_pattern", _positive_int, "integers > 0"),
        ("alpha_pattern", _positive_number, "numbers > 0"),
    ]:
        for pattern, value in (config.get(field) or {}).items():
            if not valid(value):
                ctx.add(
                    Severity.ERROR,
                    CATEGORY,
                    f"{field}[{pattern!r}] = {value!r}",
                    f"{field} values must be {requirement}",
                )


def _check_relations(ctx: ValidationContext, config: dict[str, Any], peft_type: str) -> None:
    ranks = (config.get("init_r"), config.get("target_r"))
    if peft_type == "ADALORA" and all(map(_positive_int, ranks)) and ranks[1] > ranks[0]:
        ctx.add(
            Severity.ERROR,
            CATEGORY,
            f"target_r ({ranks[1]}) exceeds init_r ({ranks[0]})",
            "AdaLoRA only prunes ranks: target_r <= init_r",
        )
    if peft_type == "IA3":
        targets, feedforward = config.get("target_modules"), config.get("feedforward_modules")
        if isinstance(targets, list) and isinstance(feedforward, list) and not set(feedforward) <= set(targets):
            ctx.add(
                Severity.ERROR,
                CATEGORY,
                f"feedforward_modules {sorted(set(feedforward) - set(targets))} are not in target_modules",
                "every feed-forward module must also be a target module",
            )
    if config.get("use_dora"):
        ctx.add(Severity.INFO, CATEGORY, "DoRA: LoRA with a learned magnitude vector")
