"""``make bench-gpu`` end to end on the CPU with ``--tiny``: every run and batch reported, exactness per type."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tools.bench_gpu import MIXED_NAMES, main, peak_bandwidth_gbs


@pytest.mark.parametrize("compute", ["auto", "slot_tables"])
def test_tiny_run_reports_every_run_batch_and_adapter_type(tmp_path: Path, compute: str) -> None:
    """``slot_tables``: what a GPU runs (slot tables, here with the torch kernels), mixed batch vs solo too."""
    out = tmp_path / "reports" / "bench-gpu.json"
    argv = ["--tiny", "--device", "cpu", "--bandwidth-gbs", "20", "--adapter-compute", compute, "--out", str(out)]
    assert main(argv) == 0
    report = json.loads(out.read_text())
    assert report["shape"]["adapter_compute"] == compute
    assert report["shape"]["kv_reads"] == "gathered"  # the in-place kernel needs CUDA
    runs = ["base", "16 LoRA r16 all-linear", "64 LoRA r16 all-linear", "8 mixed types"]
    assert list(report["runs"]) == runs
    for name in runs:
        assert list(report["runs"][name]) == ["1", "8", "32", "64"]
        for result in report["runs"][name].values():
            assert result["tokens_per_second"] > 0 and result["floor_ms_per_step"] > 0
            # the report rounds each of the three to 3 decimals, the fraction from the unrounded two
            fraction = result["floor_ms_per_step"] / result["decode_ms_per_step"]
            assert result["fraction_of_floor"] == pytest.approx(fraction, abs=2e-3)
    assert report["runs"]["64 LoRA r16 all-linear"]["64"]["distinct_adapters"] == 64
    assert report["runs"]["base"]["64"]["distinct_adapters"] == 0
    for name in runs[1:]:
        assert all(ratio > 0 for ratio in report["ratios"][f"{name} / base"].values())
    types = report["exactness"]["types"]
    assert set(types) == {*MIXED_NAMES, "base"}
    for name in MIXED_NAMES:
        assert types[name]["passed"] and types[name]["adapter_effect"] > 0, (name, types[name])
    assert out.with_suffix(".png").stat().st_size > 0


def test_bandwidth_by_device_name() -> None:
    assert peak_bandwidth_gbs("NVIDIA H200") == 4800.0
    assert peak_bandwidth_gbs("NVIDIA H100 80GB HBM3") == 3350.0
    assert peak_bandwidth_gbs("NVIDIA A100-SXM4-80GB") == 2039.0
    assert peak_bandwidth_gbs("cpu") is None
