"""``python -m tools.reference_docs``: writes everything generated from the contract table and the settings.

- the ``input``/``output`` blocks of both models' ``config.pbtxt`` (everything else in them is kept), from
  :mod:`peftserve.contract`;
- ``docs/reference/contract.md``, the tensors of each model, from the same table;
- ``docs/reference/configuration.md``, every setting of :class:`peftserve.config.ServeConfig`, from its
  pydantic fields (type, default, range, description).

``--check`` writes nothing and exits 1 naming the files that differ; ``tests/unit/test_reference_docs.py``
runs the same comparison.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import types
import typing
from collections.abc import Iterable
from pathlib import Path

import annotated_types
from pydantic import BaseModel
from pydantic.fields import FieldInfo

from peftserve.config import SHARED_SETTINGS_PARAMETER, TRITON_RESERVED_PARAMETERS, AdapterLimits, ServeConfig
from peftserve.contract import ENGINE_MODEL, FORWARDER_MODEL, MODEL_INPUTS, MODEL_OUTPUTS, TensorSpec

ROOT = Path(__file__).resolve().parent.parent
COMMAND = "python -m tools.reference_docs"
CONTRACT_PAGE = Path("docs/reference/contract.md")
CONFIGURATION_PAGE = Path("docs/reference/configuration.md")
SETTINGS_FILE = Path("model_repository") / FORWARDER_MODEL / "config.pbtxt"

BLOCK_MARKER = f"# input and output: generated from peftserve/contract.py by `{COMMAND}` (make reference-docs)"
# The marker line (when present) and the input block followed by the output block, as this tool writes them.
_BLOCKS = re.compile(
    rf"^(?:{re.escape(BLOCK_MARKER)}\n)?input \[\n(?:.*\n)*?\]\noutput \[\n(?:.*\n)*?\]\n", re.MULTILINE
)

MODEL_ROLES = {
    FORWARDER_MODEL: "Non-decoupled: HTTP and gRPC infer, the generate endpoint, perf_analyzer. It holds no "
    f"weights and forwards each request to `{ENGINE_MODEL}`, then returns its one answer.",
    ENGINE_MODEL: "Decoupled: gRPC streaming, `POST /v2/models/peft_llm_stream/generate_stream` (SSE), "
    "`perf_analyzer -i grpc --streaming`. It holds the engine and batches the rows of all adapters together.",
}


def config_file(model: str) -> Path:
    return Path("model_repository") / model / "config.pbtxt"


def generated_files(root: Path = ROOT) -> dict[Path, str]:
    """Every generated file (relative to ``root``) and the text it must have."""
    files = {
        config_file(model): with_tensor_blocks((root / config_file(model)).read_text(), model) for model in MODEL_INPUTS
    }
    files[CONTRACT_PAGE] = contract_page(MODEL_INPUTS, MODEL_OUTPUTS)
    files[CONFIGURATION_PAGE] = configuration_page()
    return files


def stale_files(root: Path = ROOT) -> list[Path]:
    """The generated files whose committed text differs from what this tool writes."""
    return [
        path
        for path, text in generated_files(root).items()
        if not (root / path).exists() or (root / path).read_text() != text
    ]


# config.pbtxt


def tensor_blocks(inputs: Iterable[TensorSpec], outputs: Iterable[TensorSpec]) -> str:
    """The ``input`` and ``output`` lists of a config.pbtxt, one tensor a line."""

    def entries(specs: Iterable[TensorSpec]) -> str:
        lines = []
        for spec in specs:
            dims = ", ".join(str(d) for d in spec.dims)
            optional = ", optional: true" if spec.optional else ""
            lines.append(f'  {{ name: "{spec.name}", data_type: {spec.data_type}, dims: [ {dims} ]{optional} }}')
        return ",\n".join(lines)

    return f"{BLOCK_MARKER}\ninput [\n{entries(inputs)}\n]\noutput [\n{entries(outputs)}\n]\n"


def with_tensor_blocks(text: str, model: str, inputs=None, outputs=None) -> str:
    """``text`` (a config.pbtxt) with its input and output blocks replaced by the contract's for ``model``."""
    blocks = tensor_blocks(inputs or MODEL_INPUTS[model], outputs or MODEL_OUTPUTS[model])
    replaced, count = _BLOCKS.subn(lambda _: blocks, text)
    if count != 1:
        raise ValueError(
            f"the config.pbtxt of {model} needs one `input [` block followed by one `output [` block, each closed "
            f"by a line `]`; found {count}"
        )
    return replaced


# docs/reference/contract.md


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _tensor_default(kind: str, spec: TensorSpec) -> str:
    if kind == "output":
        return "—"
    if not spec.optional:
        return "(required)"
    if spec.default is None or isinstance(spec.default, tuple):
        return spec.absent
    value = f"`{json.dumps(spec.default)}`"
    return f"{value} ({spec.absent})" if spec.absent else value


def _tensor_rows(kind: str, specs: Iterable[TensorSpec]) -> list[str]:
    return [
        f"| `{spec.name}` | {kind} | {spec.data_type} ({spec.type.datatype}) | [{', '.join(map(str, spec.dims))}] | "
        f"{'yes' if spec.optional else 'no'} | {_cell(_tensor_default(kind, spec))} | {_cell(spec.meaning)} |"
        for spec in specs
    ]


def contract_page(inputs: dict[str, tuple[TensorSpec, ...]], outputs: dict[str, tuple[TensorSpec, ...]]) -> str:
    lines = [
        f"<!-- Generated by `{COMMAND}` (make reference-docs) from peftserve/contract.py: edit the table there, "
        "then run the command. -->",
        "",
        "# The tensor contract",
        "",
        "The inputs and outputs of the two Triton models. Their names and types are public API: tensors are "
        "added, never renamed or given another type. `dims` leave out the batch dimension: `[1]` is one value "
        "per row, `[-1]` a list per row. A request may carry several rows; every optional input it sends then "
        "has a value (or list) per row. The type is the one `config.pbtxt` declares, with the name clients and "
        "model metadata use in brackets. An optional input that is left out takes its default.",
    ]
    for model in inputs:
        lines += ["", f"## `{model}`", "", MODEL_ROLES[model], ""]
        lines += ["| name | kind | type | dims | optional | default | meaning |", "|---|---|---|---|---|---|---|"]
        lines += _tensor_rows("input", inputs[model]) + _tensor_rows("output", outputs[model])
    return "\n".join(lines) + "\n"


# docs/reference/configuration.md


def _type_name(annotation) -> str:
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is typing.Literal:
        return "text"
    if origin is tuple:
        return f"list of {_type_name(args[0])}"
    if origin is dict:
        return f"map of {_type_name(args[0])} to {_type_name(args[1])}"
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(arg) for arg in args if arg is not type(None))
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return f"[{annotation.__name__}](#{annotation.__name__.lower()})"
    return {int: "integer", float: "number", str: "text", bool: "true or false"}[annotation]


_BOUNDS = {
    annotated_types.Ge: ("ge", "≥"),
    annotated_types.Gt: ("gt", ">"),
    annotated_types.Le: ("le", "≤"),
    annotated_types.Lt: ("lt", "<"),
}


def _allowed(field: FieldInfo) -> str:
    if typing.get_origin(field.annotation) is typing.Literal:
        return ", ".join(f"`{choice}`" for choice in typing.get_args(field.annotation))
    rules = []
    for rule in field.metadata:
        for kind, (attribute, sign) in _BOUNDS.items():
            if isinstance(rule, kind):
                rules.append(f"{sign} {getattr(rule, attribute)}")
        if isinstance(rule, annotated_types.MinLen):
            rules.append(f"at least {rule.min_length} character{'s' if rule.min_length > 1 else ''}")
    return ", ".join(rules) or "any"


def _default(field: FieldInfo) -> str:
    if field.is_required():
        return "(required)"
    value = field.get_default(call_default_factory=True)
    if isinstance(value, BaseModel):
        return f"`{json.dumps(value.model_dump())}`"
    if isinstance(value, tuple | dict) and not value:
        return "empty"
    return f"`{value}`"


def _settings_rows(model: type[BaseModel]) -> list[str]:
    rows = ["| key | type | default | allowed | description |", "|---|---|---|---|---|"]
    for name, field in model.model_fields.items():
        if not field.description:
            raise ValueError(f"{model.__name__}.{name} has no description: give its Field(description=...)")
        rows.append(
            f"| `{name}` | {_type_name(field.annotation)} | {_cell(_default(field))} | {_cell(_allowed(field))} | "
            f"{_cell(field.description)} |"
        )
    return rows


def configuration_page() -> str:
    reserved = ", ".join(f"`{name}`" for name in sorted(TRITON_RESERVED_PARAMETERS))
    lines = [
        f"<!-- Generated by `{COMMAND}` (make reference-docs) from the fields of ServeConfig in peftserve/config.py: "
        "edit their descriptions there, then run the command. -->",
        "",
        "# Configuration reference",
        "",
        f"Both models run with one set of settings: the `parameters` of `{SETTINGS_FILE}`, e.g. "
        '`parameters: { key: "max_running_rows", value: { string_value: "32" } }`. '
        f"`{ENGINE_MODEL}` reads them from there: its only parameter, `{SHARED_SETTINGS_PARAMETER}`, names that "
        "model directory. Values are strings, checked when the model loads; every problem is reported together, "
        "naming the key and the value, and a bad configuration stops the model from loading. A key left out takes "
        "its default, an unknown key is an error. Relative paths resolve against the model directory. Triton's own "
        f"parameters ({reserved}) may stand beside them.",
        "",
        *_settings_rows(ServeConfig),
        "",
        "## AdapterLimits",
        "",
        "The JSON object of `adapter_limits` and of each entry of `adapter_limit_overrides`; a key left out is 0.",
        "",
        *_settings_rows(AdapterLimits),
    ]
    return "\n".join(lines) + "\n"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="write nothing; exit 1 when a file differs")
    parser.add_argument("--root", type=Path, default=ROOT, help="the repository (default: this checkout)")
    return parser


def run(argv: list[str]) -> list[Path]:
    """Write the generated files (or, with ``--check``, only compare); returns the files that differed."""
    args = build_parser().parse_args(argv)
    stale = stale_files(args.root)
    if not args.check:
        for path, text in generated_files(args.root).items():
            (args.root / path).parent.mkdir(parents=True, exist_ok=True)
            (args.root / path).write_text(text)
    return stale


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    try:
        stale = run(argv)
    except (OSError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    verb = "differ from the generated text" if "--check" in argv else "rewritten"
    print(f"{len(stale)} file(s) {verb}" + "".join(f"\n  {path}" for path in stale))
    return 1 if stale and "--check" in argv else 0


if __name__ == "__main__":
    sys.exit(main())
