"""What ``python -m tools.reference_docs`` generates from the contract table and ServeConfig is committed as
generated, and one edit of the table reaches the config files, the docs and the request type."""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

import pytest
from google.protobuf import text_format
from pydantic import BaseModel, Field
from tritonclient.grpc import model_config_pb2

from peftserve.contract import INPUTS, MODEL_INPUTS, MODEL_OUTPUTS, OUTPUTS, STREAM, TensorSpec
from peftserve.requests import Completion, CompletionRequest
from tests.conftest import REPO_ROOT
from tools import reference_docs

EXTRA = TensorSpec("presence_penalty", "TYPE_FP32", (1,), "a made-up input", optional=True, default=0.0)


def test_committed_files_are_what_the_generator_writes() -> None:
    for path, text in reference_docs.generated_files(REPO_ROOT).items():
        committed = (REPO_ROOT / path).read_text() if (REPO_ROOT / path).exists() else None
        assert committed == text, (
            f"{path} is not what the contract and ServeConfig give: run `{reference_docs.COMMAND}`"
        )


@pytest.mark.parametrize("model", list(MODEL_INPUTS))
def test_triton_reads_the_table_from_each_config_pbtxt(model: str) -> None:
    """Parsed as Triton parses it, each model's config declares exactly the table's tensors, in order."""
    config = text_format.Parse(
        (REPO_ROOT / reference_docs.config_file(model)).read_text(), model_config_pb2.ModelConfig()
    )
    assert config.name == model

    def declared(tensor) -> tuple:
        return tensor.name, model_config_pb2.DataType.Name(tensor.data_type), tuple(tensor.dims)

    assert [(*declared(t), t.optional) for t in config.input] == [
        (s.name, s.data_type, s.dims, s.optional) for s in MODEL_INPUTS[model]
    ]
    assert [declared(t) for t in config.output] == [(s.name, s.data_type, s.dims) for s in MODEL_OUTPUTS[model]]


def test_an_added_tensor_reaches_the_config_and_the_page_and_the_rest_is_kept() -> None:
    path = REPO_ROOT / reference_docs.config_file("peft_llm")
    before = path.read_text()
    after = reference_docs.with_tensor_blocks(before, "peft_llm", (*INPUTS, EXTRA), OUTPUTS)
    last = next(line for line in before.splitlines() if f'name: "{INPUTS[-1].name}"' in line)
    new = '  { name: "presence_penalty", data_type: TYPE_FP32, dims: [ 1 ], optional: true }'
    assert after == before.replace(f"{last}\n", f"{last},\n{new}\n")  # every other byte of the file kept
    page = reference_docs.contract_page({"peft_llm": (*INPUTS, EXTRA)}, {"peft_llm": OUTPUTS})
    assert "| `presence_penalty` | input | TYPE_FP32 (FP32) | [1] | yes | `0.0` | a made-up input |" in page


def test_a_config_without_the_blocks_is_refused() -> None:
    with pytest.raises(ValueError, match="needs one `input \\[` block followed by one `output \\[` block"):
        reference_docs.with_tensor_blocks('name: "peft_llm"\n', "peft_llm")


def test_check_names_a_stale_file_and_the_command_rewrites_it(tmp_path: Path) -> None:
    for model in MODEL_INPUTS:
        (tmp_path / reference_docs.config_file(model)).parent.mkdir(parents=True)
        shutil.copy(REPO_ROOT / reference_docs.config_file(model), tmp_path / reference_docs.config_file(model))
    config = tmp_path / reference_docs.config_file("peft_llm_stream")
    config.write_text(
        config.read_text().replace('{ name: "stream", data_type: TYPE_BOOL', '{ name: "stream", data_type: TYPE_INT32')
    )
    assert reference_docs.main(["--check", "--root", str(tmp_path)]) == 1
    assert set(reference_docs.stale_files(tmp_path)) == {
        reference_docs.config_file("peft_llm_stream"),
        reference_docs.CONTRACT_PAGE,
        reference_docs.CONFIGURATION_PAGE,
    }
    assert reference_docs.main(["--root", str(tmp_path)]) == 0
    assert reference_docs.stale_files(tmp_path) == []
    assert 'name: "stream", data_type: TYPE_BOOL' in config.read_text()


def test_a_setting_without_a_description_stops_the_generator() -> None:
    class Settings(BaseModel):
        described: int = Field(1, description="has one")
        silent: int = 2

    with pytest.raises(ValueError, match=r"Settings.silent has no description"):
        reference_docs._settings_rows(Settings)


def test_the_request_and_answer_types_are_the_table() -> None:
    request_fields = [(f.name, f.default) for f in dataclasses.fields(CompletionRequest)]
    assert request_fields == [
        (spec.attribute, dataclasses.MISSING if not spec.optional else spec.default) for spec in INPUTS
    ]
    assert STREAM.attribute is None  # one flag per Triton request, not a row field
    assert [f.name for f in dataclasses.fields(Completion)] == [spec.attribute for spec in OUTPUTS] + ["finish_reason"]


@pytest.mark.parametrize(
    ("data_type", "dims", "message"),
    [("TYPE_FP16", (1,), "data_type TYPE_FP16 is not one of"), ("TYPE_INT32", (2,), r"dims \[2\] are neither")],
)
def test_a_table_entry_the_parser_cannot_read_is_refused(data_type: str, dims: tuple, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        TensorSpec("penalty", data_type, dims, "a made-up input", optional=True)
