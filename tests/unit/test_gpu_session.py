"""``tools/gpu_session.sh``, the one prepared run for a lent GPU, run end to end here small and on the CPU,
so that a GPU session's minutes are not spent finding a broken step."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_every_step_runs_and_leaves_its_report(tmp_path: Path) -> None:
    env = {
        **os.environ,
        "OUT": str(tmp_path),
        "PYTHON": sys.executable,
        "TOOL_ARGS": "--tiny --device cpu",
        "WHEELS": str(tmp_path / "no-wheels"),  # the wheels are for the GPU host's Python
    }
    result = subprocess.run(
        ["bash", "tools/gpu_session.sh"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stderr
    for step in ("cuda-kernel-tests", "gpu-engine-check", "bench-gpu"):
        assert f"== {step}: exit 0 after" in result.stdout, result.stdout
    engine = json.loads((tmp_path / "gpu-engine-check.json").read_text())
    assert engine["sliding_window"]["passed"] and engine["kv_budget"]["passed"]
    reads = engine["kv_reads"]
    assert reads["gathered"]["decode_ms_per_step"] > 0
    assert "kv_reads=in_place" in reads["in_place"]["unavailable"]  # the kernels need CUDA (or the interpreter)
    for graphs in engine["decode_graphs"]:  # eager steps timed; graphs need CUDA
        assert graphs["off"]["decode_ms_per_step"] > 0
        assert "decode_graphs=on: CUDA graphs need a CUDA device" in graphs["on"]["unavailable"]
    assert [graphs["adapters"] for graphs in engine["decode_graphs"]] == [1, 1, 16]
    bench = json.loads((tmp_path / "bench-gpu.json").read_text())
    assert bench["shape"]["kv_reads"] == "gathered"
    assert (tmp_path / "bench-gpu.png").stat().st_size > 0
    assert "torch" in (tmp_path / "versions.txt").read_text()
