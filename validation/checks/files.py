"""Files: the config parses, weights exist in a safe format, every file's size and SHA-256."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from safetensors import SafetensorError, safe_open

from peftserve.adapter_weights import CONFIG_FILE, MAX_CONFIG_BYTES, PICKLE_WEIGHTS_FILE, WEIGHTS_FILE
from validation.context import ValidationContext
from validation.report import Severity

CATEGORY = "files"


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def check_files(ctx: ValidationContext) -> None:
    directory = ctx.adapter_dir
    if not directory.is_dir():
        ctx.add(Severity.ERROR, CATEGORY, f"{directory} is not a directory", "pass the adapter's version directory")
        return
    files = {}
    for path in sorted(directory.iterdir()):
        if path.is_symlink() and not path.resolve().is_relative_to(directory.resolve()):
            ctx.add(
                Severity.ERROR,
                CATEGORY,
                f"{path.name} is a symlink out of the adapter directory",
                "copy the file into the adapter directory",
            )
        elif path.is_file():
            files[path.name] = {"bytes": path.stat().st_size, "sha256": sha256(path)}
    ctx.report.facts["files"] = files
    _read_config(ctx, directory / CONFIG_FILE)
    _find_weights(ctx, directory)


def _read_config(ctx: ValidationContext, path: Path) -> None:
    if not path.is_file():
        ctx.add(
            Severity.ERROR,
            CATEGORY,
            f"{CONFIG_FILE} is missing",
            "save the adapter with PeftModel.save_pretrained(), which writes it",
        )
        return
    if path.stat().st_size > MAX_CONFIG_BYTES:
        ctx.add(
            Severity.ERROR, CATEGORY, f"{CONFIG_FILE} is larger than {MAX_CONFIG_BYTES} bytes", "re-save the adapter"
        )
        return
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        ctx.add(Severity.ERROR, CATEGORY, f"{CONFIG_FILE} is not valid JSON: {exc}", "re-save the adapter")
        return
    if not isinstance(config, dict):
        ctx.add(
            Severity.ERROR,
            CATEGORY,
            f"{CONFIG_FILE} holds a {type(config).__name__}, not a JSON object",
            "re-save the adapter",
        )
        return
    ctx.config = config
    ctx.report.peft_type = str(config.get("peft_type")) if config.get("peft_type") else None


def _find_weights(ctx: ValidationContext, directory: Path) -> None:
    safe, pickled = directory / WEIGHTS_FILE, directory / PICKLE_WEIGHTS_FILE
    if safe.is_file():
        try:
            with safe_open(str(safe), framework="pt") as handle:
                ctx.tensor_shapes = {key: tuple(handle.get_slice(key).get_shape()) for key in handle.keys()}  # noqa: SIM118
        except (SafetensorError, OSError, ValueError) as exc:
            ctx.add(
                Severity.ERROR,
                CATEGORY,
                f"{WEIGHTS_FILE} is not a valid safetensors file: {exc}",
                "re-save the adapter; the file may be truncated or corrupted",
            )
            return
        ctx.weights_path = safe
        if pickled.exists():
            ctx.add(Severity.INFO, CATEGORY, f"{PICKLE_WEIGHTS_FILE} is ignored: {WEIGHTS_FILE} is used")
        return
    if not pickled.is_file():
        ctx.add(
            Severity.ERROR,
            CATEGORY,
            f"no weights: {WEIGHTS_FILE} is missing",
            "save with PeftModel.save_pretrained(..., safe_serialization=True)",
        )
        return
    if not ctx.options.allow_pickle:
        ctx.add(
            Severity.ERROR,
            CATEGORY,
            f"only pickle weights ({PICKLE_WEIGHTS_FILE}): refused, loading pickle can execute code",
            f"convert to {WEIGHTS_FILE}, or pass --allow-pickle to read it with torch.load(weights_only=True)",
        )
        return
    ctx.add(
        Severity.WARNING,
        CATEGORY,
        f"pickle weights ({PICKLE_WEIGHTS_FILE}) read with weights_only=True",
        f"convert to {WEIGHTS_FILE}: the server refuses pickle files",
    )
    ctx.weights_path = pickled
    try:
        ctx.tensor_shapes = {key: tuple(t.shape) for key, t in ctx.tensors.items()}
    except Exception as exc:  # noqa: BLE001 - any unpickling failure is a finding, not a crash
        ctx.add(
            Severity.ERROR,
            CATEGORY,
            f"{PICKLE_WEIGHTS_FILE} cannot be read safely: {exc}",
            f"convert it to {WEIGHTS_FILE} where it was made",
        )
        ctx.weights_path = None
