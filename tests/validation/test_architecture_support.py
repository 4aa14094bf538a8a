"""Validation reports, before anything is served, what the support matrix established for a base model:
the family, the attention implementation, the layers recognised, and adapters the engine refuses."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import transformers
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM

from tools.support_matrix import FAMILIES, Family, FamilyBench
from validation import Level, Severity, validate_adapter
from validation.report import ValidationReport


@pytest.fixture(scope="module")
def benches(tmp_path_factory: pytest.TempPathFactory):
    built: dict[str, FamilyBench] = {}
    transformers.utils.logging.disable_progress_bar()

    def get(family: Family) -> FamilyBench:
        if family.model_type not in built:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                built[family.model_type] = FamilyBench(family, tmp_path_factory.mktemp(family.model_type))
        return built[family.model_type]

    return get


def errors(report: ValidationReport) -> list[tuple[str, str]]:
    return [(i.category, i.message) for i in report.issues if i.severity == Severity.ERROR]


@pytest.mark.parametrize(
    ("family", "attention", "layers"),
    [("gpt2", "sdpa", "8 Conv1D, 1 Linear"), ("falcon", "sdpa", "8 FalconLinear, 1 Linear"), ("bloom", "eager", "")],
)
def test_recognised_family_layers_and_attention_are_reported(benches, family, attention, layers) -> None:
    bench = benches(FAMILIES[family])
    report = validate_adapter(bench.make_adapter("LoRA"), str(bench.directory / "base"))
    assert report.compatibility_level == Level.FULL, report.render()
    assert report.facts["architecture"] == f"{family} ({FAMILIES[family].name})"
    assert report.facts["attn_implementation"] == attention
    assert layers in report.facts["linear_layers"]


def test_moe_expert_parameters_are_refused_before_serving(benches) -> None:
    bench = benches(FAMILIES["mixtral"])
    report = validate_adapter(bench.make_adapter("LoRA"), str(bench.directory / "base"))
    assert report.compatibility_level == Level.INCOMPATIBLE
    assert any(category == "serving" and "target_parameters" in message for category, message in errors(report))


def test_prefix_on_multi_query_falcon_is_refused_saying_why(benches) -> None:
    bench = benches(FAMILIES["falcon"])
    report = validate_adapter(bench.make_adapter("prefix"), str(bench.directory / "base"))
    assert report.compatibility_level == Level.INCOMPATIBLE
    hints = [i.hint for i in report.issues if i.severity == Severity.ERROR]
    assert hints and all("caches 1 key/value heads (multi-query attention)" in hint for hint in hints), hints


def test_targets_that_are_not_linear_layers_are_named(benches, tmp_path: Path) -> None:
    bench = benches(FAMILIES["llama"])
    model = AutoModelForCausalLM.from_pretrained(bench.directory / "base")
    config = LoraConfig(r=2, target_modules=["q_proj", "embed_tokens"], init_lora_weights=False)
    get_peft_model(model, config).save_pretrained(tmp_path / "embedding_lora")
    report = validate_adapter(tmp_path / "embedding_lora", str(bench.directory / "base"))
    assert (
        "architecture",
        "1 targeted layers are not linear layers peftserve can adapt, e.g. model.embed_tokens (Embedding)",
    ) in errors(report), report.render()
    assert report.compatibility_level == Level.INCOMPATIBLE


def test_a_family_outside_the_matrix_is_a_warning(tmp_path: Path) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        config = transformers.OlmoConfig(
            hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4
        )
        model = AutoModelForCausalLM.from_config(config)
    model.save_pretrained(tmp_path / "base")
    adapter = get_peft_model(model, LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights=False))
    adapter.save_pretrained(tmp_path / "adapter")
    report = validate_adapter(tmp_path / "adapter", str(tmp_path / "base"))
    assert report.compatibility_level == Level.PARTIAL, report.render()
    assert report.facts["architecture"] == "olmo (not in the support matrix)"
