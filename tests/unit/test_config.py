from pathlib import Path

import pytest

from peftserve.config import from_parameters
from peftserve.errors import ConfigError


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
