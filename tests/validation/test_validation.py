"""A generated corpus of broken adapters, each caught with the right category and level."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoConfig, LlamaConfig

from tests.conftest import DEMO_PHRASES, MODEL_DIR
from validation import Level, Severity, ValidationOptions, validate_adapter
from validation.__main__ import ExitStatus, main
from validation.report import ValidationReport


@pytest.fixture(scope="module")
def base_model(model_dir: Path) -> str:
    return str(model_dir / "base_model")


def copy_adapter(model_dir: Path, tmp_path: Path, adapter_id: str = "pirate") -> Path:
    path = tmp_path / adapter_id
    shutil.copytree(model_dir / "adapters" / adapter_id / "1", path)
    return path


def edit_config(path: Path, **changes: object) -> None:
    config = json.loads((path / "adapter_config.json").read_text())
    config.update(changes)
    (path / "adapter_config.json").write_text(json.dumps(config))


def edit_tensors(path: Path, change: Callable[[dict[str, torch.Tensor]], None]) -> None:
    tensors = dict(load_file(path / "adapter_model.safetensors"))
    change(tensors)
    save_file(tensors, path / "adapter_model.safetensors")


Q_A = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"


def findings(report: ValidationReport, severity: Severity) -> list[tuple[str, str]]:
    return [(i.category, i.message) for i in report.issues if i.severity == severity]


@pytest.mark.parametrize("adapter_id", list(DEMO_PHRASES))
def test_demo_adapters_are_fully_compatible(model_dir: Path, base_model: str, adapter_id: str) -> None:
    report = validate_adapter(model_dir / "adapters" / adapter_id / "1", base_model)
    assert report.compatibility_level == Level.FULL, report.render()
    assert report.overall_score == 1.0
    assert set(report.facts["files"]) >= {"adapter_config.json", "adapter_model.safetensors"}
    assert len(report.facts["files"]["adapter_model.safetensors"]["sha256"]) == 64


def pickle_only(path: Path) -> None:
    torch.save(load_file(path / "adapter_model.safetensors"), path / "adapter_model.bin")
    (path / "adapter_model.safetensors").unlink()


def base_vocabulary() -> int:
    return AutoConfig.from_pretrained(MODEL_DIR / "base_model").vocab_size


def lm_head_to_save(path: Path, rows: int) -> None:
    edit_config(path, modules_to_save=["lm_head"])
    edit_tensors(path, lambda t: t.update({"base_model.model.lm_head.weight": torch.randn(rows, 128)}))


def added_vocabulary(path: Path) -> None:
    lm_head_to_save(path, base_vocabulary() + 10)


def tensor_for_missing_module(path: Path) -> None:
    edit_tensors(path, lambda t: t.update({Q_A.replace("q_proj", "z_proj"): t[Q_A].clone()}))


BROKEN = [
    # (name, how to break the pirate LoRA, expected level, category of the decisive finding, message part)
    (
        "missing config",
        lambda p: (p / "adapter_config.json").unlink(),
        Level.INCOMPATIBLE,
        "files",
        "adapter_config.json is missing",
    ),
    (
        "config not json",
        lambda p: (p / "adapter_config.json").write_text("{oops"),
        Level.INCOMPATIBLE,
        "files",
        "not valid JSON",
    ),
    (
        "missing weights",
        lambda p: (p / "adapter_model.safetensors").unlink(),
        Level.INCOMPATIBLE,
        "files",
        "adapter_model.safetensors is missing",
    ),
    (
        "corrupted safetensors",
        lambda p: (p / "adapter_model.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{garbage"),
        Level.INCOMPATIBLE,
        "files",
        "not a valid safetensors file",
    ),
    ("pickle only", pickle_only, Level.INCOMPATIBLE, "files", "refused, loading pickle can execute code"),
    (
        "unknown peft type",
        lambda p: edit_config(p, peft_type="SUPERLORA"),
        Level.INCOMPATIBLE,
        "config",
        "unknown peft_type 'SUPERLORA'",
    ),
    ("rank zero", lambda p: edit_config(p, r=0), Level.INCOMPATIBLE, "config", "r = 0 is invalid for LORA"),
    (
        "negative alpha",
        lambda p: edit_config(p, lora_alpha=-3),
        Level.INCOMPATIBLE,
        "config",
        "lora_alpha = -3 is invalid",
    ),
    (
        "dropout out of range",
        lambda p: edit_config(p, lora_dropout=1.5),
        Level.INCOMPATIBLE,
        "config",
        "lora_dropout = 1.5",
    ),
    (
        "no target modules",
        lambda p: edit_config(p, target_modules=None),
        Level.INCOMPATIBLE,
        "config",
        "lacks target_modules",
    ),
    (
        "unknown target module",
        lambda p: edit_config(p, target_modules=["attention_qkv"]),
        Level.INCOMPATIBLE,
        "architecture",
        "target_modules do not match the base model",
    ),
    (
        "tensor shapes",
        lambda p: edit_tensors(p, lambda t: t.update({Q_A: torch.zeros(8, 96)})),
        Level.INCOMPATIBLE,
        "architecture",
        f"tensor {Q_A} has shape (8, 96), this base model needs (8, 128)",
    ),
    ("rank differs from config", lambda p: edit_config(p, r=4), Level.INCOMPATIBLE, "architecture", "needs (4, 256)"),
    (
        "tensor for a module the base lacks",
        tensor_for_missing_module,
        Level.INCOMPATIBLE,
        "architecture",
        "tensors the config does not explain",
    ),
    (
        "NaN weights",
        lambda p: edit_tensors(p, lambda t: t[Q_A].fill_(float("nan"))),
        Level.INCOMPATIBLE,
        "weights",
        "hold NaN or Inf",
    ),
    (
        "integer weights",
        lambda p: edit_tensors(p, lambda t: t.update({Q_A: t[Q_A].to(torch.int32)})),
        Level.INCOMPATIBLE,
        "weights",
        "not floating point",
    ),
    (
        "vocabulary mismatch",
        added_vocabulary,
        Level.INCOMPATIBLE,
        "tokenizer",
        "vocabulary rows, the base model has",
    ),
    (
        "modules_to_save",
        lambda p: lm_head_to_save(p, base_vocabulary()),
        Level.INCOMPATIBLE,
        "serving",
        "peftserve cannot serve it: modules_to_save",
    ),
    (
        "untrained",
        lambda p: edit_tensors(p, lambda t: [v.zero_() for k, v in t.items() if "lora_B" in k]),
        Level.PARTIAL,
        "weights",
        "every lora_B is all zeros",
    ),
    ("exploding", lambda p: edit_tensors(p, lambda t: t[Q_A].mul_(1e6)), Level.PARTIAL, "weights", "values above 1000"),
    (
        "float64",
        lambda p: edit_tensors(p, lambda t: t.update({k: v.double() for k, v in t.items()})),
        Level.PARTIAL,
        "weights",
        "float64 tensors",
    ),
    (
        "trained on another base",
        lambda p: edit_config(p, base_model_name_or_path="meta-llama/Llama-2-7b-hf"),
        Level.PARTIAL,
        "architecture",
        "trained on 'meta-llama/Llama-2-7b-hf'",
    ),
]


@pytest.mark.parametrize(("name", "breaks", "level", "category", "message"), BROKEN, ids=[case[0] for case in BROKEN])
def test_broken_adapter_is_caught(
    model_dir: Path, base_model: str, tmp_path: Path, name: str, breaks, level: Level, category: str, message: str
) -> None:
    path = copy_adapter(model_dir, tmp_path)
    breaks(path)
    report = validate_adapter(path, base_model)
    severity = Severity.ERROR if level == Level.INCOMPATIBLE else Severity.WARNING
    assert report.compatibility_level == level, report.render()
    assert any(c == category and message in m for c, m in findings(report, severity)), report.render()
    assert all(issue.hint or issue.severity == Severity.INFO for issue in report.issues), report.render()
    expected_score = 0.5 ** report.count(Severity.ERROR) * 0.9 ** report.count(Severity.WARNING)
    assert report.overall_score == pytest.approx(expected_score, abs=1e-4)


def test_pickle_is_read_weights_only_when_allowed(model_dir: Path, base_model: str, tmp_path: Path) -> None:
    path = copy_adapter(model_dir, tmp_path)
    pickle_only(path)
    report = validate_adapter(path, base_model, ValidationOptions(allow_pickle=True))
    assert report.compatibility_level == Level.PARTIAL, report.render()
    assert findings(report, Severity.WARNING) == [
        ("files", "pickle weights (adapter_model.bin) read with weights_only=True")
    ]


def test_adapter_for_another_base_model(model_dir: Path, tmp_path: Path) -> None:
    other = tmp_path / "other_base"
    LlamaConfig(
        vocab_size=base_vocabulary(),
        hidden_size=96,
        intermediate_size=192,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
    ).save_pretrained(other)
    lora = validate_adapter(model_dir / "adapters" / "pirate" / "1", str(other))
    assert lora.compatibility_level == Level.INCOMPATIBLE
    assert any("tensors missing" in m or "needs (8, 96)" in m for _, m in findings(lora, Severity.ERROR)), lora.render()
    prefix = validate_adapter(model_dir / "adapters" / "poet" / "1", str(other))
    errors = findings(prefix, Severity.ERROR)
    assert ("architecture", "num_layers = 4 in the adapter, the base model has 2") in errors, prefix.render()
    assert any("prompt_embeddings has shape (10, 512), this base model needs (10, 192)" in m for _, m in errors)


def test_unreadable_base_model_fails_closed(model_dir: Path, tmp_path: Path) -> None:
    report = validate_adapter(model_dir / "adapters" / "pirate" / "1", str(tmp_path / "nowhere"))
    assert report.compatibility_level == Level.INCOMPATIBLE
    assert any("cannot read base model" in m for _, m in findings(report, Severity.ERROR))


def test_serving_limits(model_dir: Path, base_model: str) -> None:
    path = model_dir / "adapters" / "pirate" / "1"
    report = validate_adapter(path, base_model, ValidationOptions(max_adapter_memory_mb=0.1, max_rank=4))
    errors = findings(report, Severity.ERROR)
    assert ("serving", "needs 0.2 MiB, more than the adapter cache (0.1 MiB)") in errors
    assert ("serving", "rank 8 exceeds the serving limit 4") in errors
    assert report.facts["serving_bytes"] == 262144


def test_load_smoke_generates_and_measures(model_dir: Path, base_model: str) -> None:
    report = validate_adapter(model_dir / "adapters" / "robot" / "1", base_model, ValidationOptions(load=True))
    assert report.compatibility_level == Level.FULL
    assert DEMO_PHRASES["robot"] in report.facts["sample_output"]
    assert report.facts["load_ms"] >= 0 and report.facts["loaded_bytes"] > 0
    assert report.facts["max_logit_change"] > 1


def test_custom_rule_through_the_api(model_dir: Path, base_model: str) -> None:
    from tests.validation.custom_rules import require_rank_at_most_4

    report = validate_adapter(model_dir / "adapters" / "pirate" / "1", base_model, rules=[require_rank_at_most_4])
    assert findings(report, Severity.WARNING) == [("policy", "rank 8 is above our team's limit of 4")]


def test_cli_exit_status_gates_a_pipeline(model_dir: Path, base_model: str, tmp_path: Path, capsys) -> None:
    good = str(model_dir / "adapters" / "pirate" / "1")
    assert main([good, "--base-model", base_model]) == ExitStatus.FULL
    assert "verdict     FULL (score 1.00" in capsys.readouterr().out
    assert main(
        [good, "--base-model", base_model, "--rule", "tests.validation.custom_rules:require_rank_at_most_4"]
    ) == (ExitStatus.PARTIAL)
    capsys.readouterr()
    broken = copy_adapter(model_dir, tmp_path)
    edit_config(broken, r=-1)
    assert main([str(broken), "--base-model", base_model, "--json"]) == ExitStatus.INCOMPATIBLE
    report = json.loads(capsys.readouterr().out)
    assert report["compatibility_level"] == "incompatible" and 0 <= report["overall_score"] <= 0.5
    assert {"severity", "category", "message", "hint"} <= set(report["issues"][0])
    assert main([good]) == ExitStatus.USAGE
    assert main([good, "--base-model", base_model, "--rule", "no_colon"]) == ExitStatus.USAGE
    assert "usage error" in capsys.readouterr().err


def test_serving_config_limits_are_read_from_config_pbtxt(
    model_dir: Path, base_model: str, tmp_path: Path, capsys
) -> None:
    config = tmp_path / "config.pbtxt"
    config.write_text(
        'parameters: { key: "base_model", value: { string_value: "base_model" } }\n'
        'parameters: { key: "max_adapter_memory_mb", value: { string_value: "0.01" } }\n'
    )
    status = main(
        [str(model_dir / "adapters" / "pirate" / "1"), "--base-model", base_model, "--serving-config", str(config)]
    )
    assert status == ExitStatus.INCOMPATIBLE
    assert "more than the adapter cache (0.01 MiB)" in capsys.readouterr().out


def test_every_finding_is_collected_not_just_the_first(model_dir: Path, base_model: str, tmp_path: Path) -> None:
    path = copy_adapter(model_dir, tmp_path)
    edit_config(path, r=4, lora_dropout=1.2)
    edit_tensors(
        path, lambda t: t["base_model.model.model.layers.3.self_attn.v_proj.lora_B.weight"].fill_(float("inf"))
    )
    categories = {category for category, _ in findings(validate_adapter(path, base_model), Severity.ERROR)}
    assert categories == {"config", "architecture", "weights"}


def test_tokenizer_shipped_with_the_adapter_is_compared(model_dir: Path, base_model: str, tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    path = copy_adapter(model_dir, tmp_path)
    tokenizer = AutoTokenizer.from_pretrained(base_model)
    tokenizer.add_tokens(["<tool_call>", "<tool_result>"])
    tokenizer.add_special_tokens({"eos_token": "<tool_result>"})
    tokenizer.save_pretrained(path)
    report = validate_adapter(path, base_model)
    assert report.compatibility_level == Level.INCOMPATIBLE, report.render()
    errors, warnings = findings(report, Severity.ERROR), findings(report, Severity.WARNING)
    vocabulary = len(tokenizer) - 2
    assert ("tokenizer", f"the adapter's tokenizer has {vocabulary + 2} tokens, the base's {vocabulary} (+2)") in errors
    assert ("tokenizer", "special token eos_token is '<tool_result>' in the adapter, '</s>' in the base") in warnings


CHATML = "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"


def test_chat_template_shipped_with_the_adapter_is_compared(model_dir: Path, tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    base = tmp_path / "base"
    shutil.copytree(model_dir / "base_model", base)
    base_tokenizer = AutoTokenizer.from_pretrained(base)
    adapter = copy_adapter(model_dir, tmp_path)
    (adapter / "chat_template.jinja").write_text(CHATML)  # a template alone, without tokenizer files
    warnings = findings(validate_adapter(adapter, str(base)), Severity.WARNING)
    assert any("the adapter ships a chat template, the base model's tokenizer has none" in m for _, m in warnings)

    base_tokenizer.chat_template = CHATML
    base_tokenizer.save_pretrained(base)
    same = findings(validate_adapter(adapter, str(base)), Severity.WARNING)
    assert [m for c, m in same if c == "tokenizer"] == []  # the same template
    (adapter / "chat_template.jinja").unlink()
    shipped = AutoTokenizer.from_pretrained(base)
    shipped.chat_template = CHATML.replace("<|im_start|>", "### ")
    shipped.save_pretrained(adapter)
    report = validate_adapter(adapter, str(base))
    assert ("tokenizer", "the adapter's chat template differs from the base model's") in [
        (c, m.split(";")[0]) for c, m in findings(report, Severity.WARNING)
    ], report.render()


def test_added_tokens_must_keep_the_base_models_ids(model_dir: Path, tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    base = tmp_path / "base"
    shutil.copytree(model_dir / "base_model", base)
    tokenizer = AutoTokenizer.from_pretrained(base)
    tokenizer.add_tokens(["<tool_call>", "<tool_result>"])
    tokenizer.save_pretrained(base)
    adapter = copy_adapter(model_dir, tmp_path)
    swapped = AutoTokenizer.from_pretrained(model_dir / "base_model")
    swapped.add_tokens(["<tool_result>", "<tool_call>"])  # the same tokens, added in another order
    swapped.save_pretrained(adapter)
    errors = findings(validate_adapter(adapter, str(base)), Severity.ERROR)
    first = len(tokenizer) - 2
    assert (
        "tokenizer",
        f"added token '<tool_result>' has id {first} in the adapter's tokenizer, {first + 1} in the base's",
    ) in errors
    assert (
        "tokenizer",
        f"added token '<tool_call>' has id {first + 1} in the adapter's tokenizer, {first} in the base's",
    ) in errors
