"""``python -m validation ADAPTER_DIR --base-model BASE``: exit 0 full, 1 partial, 2 incompatible, 64 usage."""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from enum import IntEnum
from pathlib import Path

import torch
import transformers

from peftserve.config import read_model_config
from validation import ValidationOptions, validate_adapter
from validation.report import Level, ValidationReport
from validation.rules import RuleLoadError, load_rule


class ExitStatus(IntEnum):
    FULL = 0
    PARTIAL = 1
    INCOMPATIBLE = 2
    USAGE = 64  # EX_USAGE: argparse's own 2 would read as "incompatible" in a pipeline
    INTERNAL = 70


LEVEL_STATUS = {
    Level.FULL: ExitStatus.FULL,
    Level.PARTIAL: ExitStatus.PARTIAL,
    Level.INCOMPATIBLE: ExitStatus.INCOMPATIBLE,
}
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


class UsageError(Exception):
    pass


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        raise UsageError(message)


def serving_limits(config_pbtxt: Path) -> dict[str, float]:
    """The limits of a peft_llm config.pbtxt that an adapter must fit (the adapter cache size)."""
    return {"max_adapter_memory_mb": read_model_config(config_pbtxt.parent).max_adapter_memory_mb}


def build_parser() -> argparse.ArgumentParser:
    """The command line of ``python -m validation`` (also read by tests/unit/test_docs.py)."""
    parser = _Parser(
        prog="python -m validation", description="Check that a PEFT adapter can be served on a base model."
    )
    parser.add_argument("adapter_dir", type=Path, help="the adapter's directory (adapter_config.json + weights)")
    parser.add_argument("--base-model", required=True, help="local model directory or model id in the HF cache")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    parser.add_argument("--allow-pickle", action="store_true", help="read adapter_model.bin (weights only)")
    parser.add_argument("--load", action="store_true", help="really load base and adapter and generate once")
    parser.add_argument("--serving-config", type=Path, help="peft_llm config.pbtxt whose limits to check against")
    parser.add_argument("--max-adapter-memory-mb", type=float, help="adapter cache size to check against")
    parser.add_argument("--max-rank", type=int, help="largest LoRA rank the deployment accepts")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="float32", help="serving dtype for memory figures")
    parser.add_argument("--rule", action="append", default=[], metavar="MODULE:FUNCTION", help="custom rule")
    return parser


def run(argv: list[str]) -> ValidationReport:
    args = build_parser().parse_args(argv)
    limits = serving_limits(args.serving_config) if args.serving_config else {}
    if args.max_adapter_memory_mb is not None:
        limits["max_adapter_memory_mb"] = args.max_adapter_memory_mb
    options = ValidationOptions(
        allow_pickle=args.allow_pickle,
        load=args.load,
        max_rank=args.max_rank,
        serving_dtype=DTYPES[args.dtype],
        **limits,
    )
    try:
        rules = [load_rule(reference) for reference in args.rule]
    except RuleLoadError as exc:
        raise UsageError(str(exc)) from exc
    report = validate_adapter(args.adapter_dir, args.base_model, options, rules=rules)
    print(json.dumps(report.to_dict(), indent=2) if args.json else report.render())
    return report


def main(argv: list[str] | None = None) -> int:
    # Library chatter (deprecation notices, weight-loading progress) would bury the report.
    warnings.filterwarnings("ignore", category=FutureWarning)
    transformers.utils.logging.disable_progress_bar()
    try:
        report = run(sys.argv[1:] if argv is None else argv)
    except UsageError as exc:
        print(f"usage error: {exc}", file=sys.stderr)
        return ExitStatus.USAGE
    except Exception as exc:  # noqa: BLE001 - one line for the operator; --json consumers see the status
        print(f"error: {type(exc).__name__}: {exc}", file=sys.stderr)
        return ExitStatus.INTERNAL
    return LEVEL_STATUS[report.compatibility_level]


if __name__ == "__main__":
    raise SystemExit(main())
