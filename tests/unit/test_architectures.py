"""The support matrix: every tested family x every adapter type equals PEFT or is refused clearly, as the
the table of docs/models.md says (tools/support_matrix.py builds the tiny models and adapters)."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch
import transformers
from peft import LoraConfig

from peftserve.adapter_types import convert_adapter
from peftserve.adapter_weights import BaseModelShape
from peftserve.architectures import TESTED_FAMILIES
from peftserve.errors import UnsupportedAdapterError
from tools.support_matrix import (
    ADAPTER_TYPES,
    FAILURES,
    FAMILIES,
    TOLERANCE,
    Cell,
    FamilyBench,
    committed_section,
    parse_table,
    render_table,
)

MATRIX_PAGE = Path(__file__).resolve().parents[2] / "docs" / "models.md"
CELLS = [(family, adapter_type) for family in FAMILIES for adapter_type in ADAPTER_TYPES]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny matmuls: with several threads on a busy 2-core machine they spend their time waiting (10x slower)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def committed() -> dict[tuple[str, str], Cell]:
    return parse_table(committed_section(MATRIX_PAGE.read_text()))


@pytest.fixture(scope="module")
def bench(tmp_path_factory: pytest.TempPathFactory):
    """One bench (tiny base model on disk + engine) per family, built on first use; cells ran once."""
    benches: dict[str, FamilyBench] = {}
    results: dict[tuple[str, str], Cell] = {}
    transformers.utils.logging.disable_progress_bar()

    def get(family: str) -> tuple[FamilyBench, dict[tuple[str, str], Cell]]:
        if family not in benches:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                benches[family] = FamilyBench(FAMILIES[family], tmp_path_factory.mktemp(family))
        return benches[family], results

    return get


def run_cell(bench, family: str, adapter_type: str) -> Cell:
    family_bench, results = bench(family)
    if (family, adapter_type) not in results:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            results[(family, adapter_type)] = family_bench.run(adapter_type)
    return results[(family, adapter_type)]


@pytest.mark.parametrize(("family", "adapter_type"), CELLS, ids=[f"{f}-{t}" for f, t in CELLS])
def test_cell_equals_peft_or_is_refused_as_the_readme_says(bench, committed, family: str, adapter_type: str) -> None:
    cell = run_cell(bench, family, adapter_type)
    assert cell.outcome not in FAILURES, cell.note
    assert cell == committed[(family, adapter_type)], (
        "the support matrix of docs/models.md is out of date: run `python -m tools.support_matrix` and paste its table"
    )


@pytest.mark.parametrize("family", FAMILIES)
def test_mixed_batch_of_every_served_type_equals_solo_runs(bench, committed, family: str) -> None:
    """Rows of different lengths (right-aligned KV reads, per-row positions: OPT's offset, Bloom's alibi, a
    prefix and a sliding window together on Gemma 2 and GPT-OSS) and flattened MLP inputs with many rows."""
    for adapter_type in ADAPTER_TYPES:
        run_cell(bench, family, adapter_type)
    family_bench, _ = bench(family)
    served = [t for t in ADAPTER_TYPES if committed[(family, t)].outcome == "exact"]
    assert sorted(family_bench.loaded) == sorted(served)
    assert family_bench.mixed_batch_difference() <= TOLERANCE


@pytest.mark.parametrize("family", ["mixtral", "qwen3_moe"])
@pytest.mark.parametrize("use_dora", [False, True])
def test_moe_lora_on_attention_layers_serves(bench, family: str, use_dora: bool) -> None:
    """What docs/models.md tells MoE users whose all-linear LoRA is refused: target the attention layers."""
    family_bench, _ = bench(family)
    config = LoraConfig(
        r=4, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"], init_lora_weights=False, use_dora=use_dora
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cell = family_bench.run(f"attention-{'dora' if use_dora else 'lora'}", config)
    assert cell.outcome == "exact", cell.note


def test_routed_expert_linears_are_refused_they_see_only_their_tokens() -> None:
    """Older MoE layouts keep one nn.Linear per expert; its input rows are routed tokens, not batch rows."""
    module = "model.layers.0.mlp.experts.3.w1"
    shape = BaseModelShape({module: (8, 8)}, 1, 1, 8, 8, torch.float32, torch.device("cpu"))
    tensors = {
        f"base_model.model.{module}.lora_A.weight": torch.ones(2, 8),
        f"base_model.model.{module}.lora_B.weight": torch.ones(8, 2),
    }
    with pytest.raises(
        UnsupportedAdapterError, match=r"targets 'model.layers.0.mlp.experts.3.w1', a routed MoE expert"
    ):
        convert_adapter({"peft_type": "LORA", "r": 2, "lora_alpha": 2}, tensors, shape)


def test_committed_table_is_what_the_tool_renders(committed) -> None:
    """With the per-cell tests above, the committed section equals a fresh run's rendering."""
    assert render_table(committed.values()) == committed_section(MATRIX_PAGE.read_text())
    assert set(committed) == set(CELLS)


def test_matrix_covers_every_tested_family_and_at_least_fourteen() -> None:
    assert list(FAMILIES) == list(TESTED_FAMILIES)
    assert len(FAMILIES) >= 14 and len(ADAPTER_TYPES) == 10
