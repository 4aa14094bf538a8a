import json
from pathlib import Path

import pytest
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2

from peftserve.config import from_parameters, triton_model_config
from peftserve.errors import ConfigError
from tests.conftest import REPO_ROOT


def test_triton_parameters_are_converted_and_paths_resolved(tmp_path: Path) -> None:
    (tmp_path / "base").mkdir()
    config = from_parameters(
        {
            "base_model": {"string_value": "base"},
            "max_tokens_limit": {"string_value": "64"},
            "preload": {"string_value": "a, b,"},
            "EXECUTION_ENV_PATH": {"string_value": "/opt/env"},
        },
        model_dir=tmp_path,
    )
    assert config.base_model == str(tmp_path / "base")
    assert config.adapter_repository == str(tmp_path / "adapters")
    assert config.max_tokens_limit == 64
    assert config.preload == ("a", "b")


def test_hub_id_is_left_unchanged(tmp_path: Path) -> None:
    assert from_parameters({"base_model": "meta-llama/Llama-3.2-1B"}, model_dir=tmp_path).base_model == (
        "meta-llama/Llama-3.2-1B"
    )


def test_all_bad_keys_are_reported_together(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as excinfo:
        from_parameters(
            {"base_model": "m", "max_tokens_limit": "lots", "dtype": "float8", "colour": "red"}, model_dir=tmp_path
        )
    message = str(excinfo.value)
    assert "max_tokens_limit" in message and "'lots'" in message
    assert "dtype" in message and "float8" in message
    assert "colour" in message


def test_default_above_limit_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"default_max_tokens \(99\) exceeds max_tokens_limit \(10\)"):
        from_parameters({"base_model": "m", "default_max_tokens": "99", "max_tokens_limit": "10"}, model_dir=tmp_path)


def test_missing_base_model_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="base_model"):
        from_parameters({}, model_dir=tmp_path)


def _initialize_args(model_dir: Path, **parameters: str) -> dict:
    """What Triton hands a Python model's initialize(): its config as JSON and its directory."""
    config = {"parameters": {key: {"string_value": value} for key, value in parameters.items()}}
    return {"model_config": json.dumps(config), "model_repository": str(model_dir)}


def test_both_models_read_the_one_set_of_settings() -> None:
    forwarder = triton_model_config(_initialize_args(REPO_ROOT / "model_repository" / "peft_llm", **_shipped()))
    stream = REPO_ROOT / "model_repository" / "peft_llm_stream"
    engine = triton_model_config(_initialize_args(stream, engine_config="../peft_llm"))
    assert forwarder == engine
    assert engine.max_running_rows == int(_shipped()["max_running_rows"])
    assert (engine.engine_model, engine.served_model, engine.forwarding_threads) == ("peft_llm_stream", "peft_llm", 64)


def test_settings_beside_engine_config_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"sets \['max_running_rows'\] beside engine_config"):
        triton_model_config(_initialize_args(tmp_path, engine_config="../peft_llm", max_running_rows="8"))


def test_settings_left_out_take_their_defaults(tmp_path: Path) -> None:
    config = from_parameters({"base_model": "m"}, model_dir=tmp_path)
    assert (config.max_running_rows, config.join_group, config.join_every, config.loader_threads) == (32, 4, 8, 2)
    with pytest.raises(ConfigError, match="loader_threads"):
        from_parameters({"base_model": "m", "loader_threads": "0"}, model_dir=tmp_path)


def test_a_model_cannot_forward_to_itself(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="served_model and engine_model are both 'peft_llm'"):
        from_parameters({"base_model": "m", "engine_model": "peft_llm"}, model_dir=tmp_path)


def _shipped() -> dict[str, str]:
    parsed = text_format.Parse(
        (REPO_ROOT / "model_repository" / "peft_llm" / "config.pbtxt").read_text(), model_config_pb2.ModelConfig()
    )
    return {key: value.string_value for key, value in parsed.parameters.items()}
