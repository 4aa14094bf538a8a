"""The GPU start-up check's parts that run without Docker: log parsing, dtype report, refusing to run here."""

from __future__ import annotations

from pathlib import Path

import pytest

from tools.gpu_startup_check import CheckFailed, configured_dtype, engine_placement, main

LOG = """I1130 04:10:01.123 1 python_be.cc:2000] TRITONBACKEND_ModelInstanceInitialize: peft_llm_stream_0_0
2026-11-30 04:10:05,001 peftserve.triton INFO loading /models/peft_llm/base_model on cuda:0
I1130 04:10:09.456 1 model_lifecycle.cc:839] successfully loaded 'peft_llm_stream'
"""


def test_device_from_the_models_log_line() -> None:
    assert engine_placement(LOG).device == "cuda:0" and engine_placement(LOG).dtype is None
    with_dtype = LOG.replace("on cuda:0", "on cuda:1 as torch.bfloat16")
    assert engine_placement(with_dtype).device == "cuda:1" and engine_placement(with_dtype).dtype == "bfloat16"
    loaded = LOG + "2026-11-30 04:10:08,001 peftserve.triton INFO loaded /models/m on cuda:0 as torch.float16\n"
    assert engine_placement(loaded).device == "cuda:0" and engine_placement(loaded).dtype == "float16"
    with pytest.raises(CheckFailed, match="no 'loading <model> on <device>' line"):
        engine_placement("I1130 successfully loaded 'peft_llm'\n")


def test_configured_dtype_explains_auto(model_dir: Path, tmp_path: Path) -> None:
    assert configured_dtype(model_dir) == "auto (on a GPU: the checkpoint's dtype, float32)"
    (tmp_path / "config.pbtxt").write_text('parameters: { key: "dtype", value: { string_value: "bfloat16" } }\n')
    assert configured_dtype(tmp_path) == "bfloat16"


def test_refuses_to_run_without_docker(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))  # no docker on it
    assert main([]) == 2
    assert "docker not found" in capsys.readouterr().err


def test_refuses_to_run_without_compose_or_daemon(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys) -> None:
    docker = tmp_path / "docker"  # a docker CLI whose compose plugin is missing, as on the build machines
    docker.write_text('#!/bin/sh\n[ "$1" = compose ] && exit 1\nexit 0\n')
    docker.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}:/usr/bin:/bin")
    assert main(["--no-build"]) == 2
    assert "the docker compose plugin is missing" in capsys.readouterr().err
