"""perf_analyzer and locust, a few seconds each, against the real server: their CSVs parse, no errors."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

from loadtests.perf_sweep import read_csv, sweep, write_csv
from loadtests.traffic import TrafficPattern
from tools.triton_server import TritonServer

LOADTESTS = Path(__file__).resolve().parents[2] / "loadtests"


def test_perf_analyzer_sweep_writes_a_parsable_csv(triton: TritonServer, tmp_path: Path) -> None:
    patterns = [TrafficPattern("base"), TrafficPattern("uniform", ("pirate", "chef"))]
    points = sweep(triton.http_url, patterns, [2], tmp_path, max_tokens=8, measurement_ms=2000, ignore_eos=True)
    write_csv(points, tmp_path / "sweep.csv")
    again = read_csv(tmp_path / "sweep.csv")
    assert [(p.pattern, p.level) for p in again] == [("base", 2.0), ("uniform-2", 2.0)]
    assert all(p.throughput > 0 and p.tokens_per_request == 8 and p.p99_ms >= p.p50_ms for p in again)


def test_locust_runs_headless_without_failures(triton: TritonServer, tmp_path: Path) -> None:
    for protocol in ("http", "generate"):
        env = dict(os.environ, PEFTSERVE_PROTOCOL=protocol, PEFTSERVE_PATTERN="zipf",
                   PEFTSERVE_ADAPTERS="pirate,robot,chef,poet", PEFTSERVE_MAX_TOKENS="8")  # fmt: skip
        command = [str(Path(sys.executable).parent / "locust"), "-f", str(LOADTESTS / "locustfile.py"), "--headless",
                   "-u", "4", "-r", "4", "-t", "4s", "--host", f"http://{triton.http_url}",
                   "--csv", str(tmp_path / protocol), "--only-summary"]  # fmt: skip
        completed = subprocess.run(command, env=env, capture_output=True, text=True, timeout=120)
        assert completed.returncode == 0, completed.stderr[-2000:]
        with (tmp_path / f"{protocol}_stats.csv").open() as handle:
            rows = {row["Name"]: row for row in csv.DictReader(handle)}
        assert int(rows["zipf-4"]["Request Count"]) > 0
        assert rows["zipf-4"]["Failure Count"] == "0"
        assert rows["zipf-4"]["Type"] == protocol
