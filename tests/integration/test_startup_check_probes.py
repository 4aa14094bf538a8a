"""The GPU start-up check's requests and log reading, against the real (CPU) tritonserver of the tests."""

from __future__ import annotations

import pytest
from tritonclient.utils import InferenceServerException

from peftserve.adapter_repository import AdapterRepository
from tests.conftest import DEMO_PHRASES, MODEL_DIR
from tools.gpu_startup_check import engine_placement, probe_adapters, wait_ready
from tools.triton_server import TritonServer


def test_one_request_per_demo_adapter_each_served_by_it(triton: TritonServer) -> None:
    adapter_ids = AdapterRepository(MODEL_DIR / "adapters").adapter_ids()
    answers = probe_adapters(triton.http_url, adapter_ids, {})
    assert [version for _, version, _ in answers] == ["", *(f"{a}@1" for a in adapter_ids)]
    for adapter_id, _, text in answers:
        if adapter_id in ("pirate", "robot", "knight"):
            assert DEMO_PHRASES[adapter_id] in text


def test_device_read_from_the_server_log(triton: TritonServer) -> None:
    placement = engine_placement(triton.log_path.read_text())
    assert placement.device == "cpu" and placement.dtype == "float32"
    assert wait_ready(triton.http_url, timeout=10, alive=lambda: True) < 10


def test_an_adapter_the_server_cannot_serve_fails_the_check(triton: TritonServer) -> None:
    with pytest.raises(InferenceServerException, match="no-such-adapter"):
        probe_adapters(triton.http_url, ["no-such-adapter"], {})
