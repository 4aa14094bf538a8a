"""Traffic patterns, perf_analyzer input data and the report builder."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest

from loadtests.perf_sweep import SweepPoint
from loadtests.report import BenchmarkFacts, build_report, headline_ratio
from loadtests.traffic import TrafficPattern, perf_analyzer_input_data

ADAPTERS = tuple(f"s{i:04d}" for i in range(64))


def test_patterns_choose_adapters_as_named() -> None:
    assert TrafficPattern("base").sample(5) == [""] * 5
    assert TrafficPattern("single", ADAPTERS).sample(3) == ["s0000"] * 3
    assert TrafficPattern("distinct", ADAPTERS[:4]).sample(6) == ["s0000", "s0001", "s0002", "s0003", "s0000", "s0001"]
    uniform = Counter(TrafficPattern("uniform", ADAPTERS[:8]).sample(8000, seed=1))
    assert set(uniform) == set(ADAPTERS[:8]) and max(uniform.values()) < 1.2 * min(uniform.values())
    zipf = Counter(TrafficPattern("zipf", ADAPTERS).sample(8000, seed=1))
    assert zipf.most_common(1)[0][0] == "s0000"
    assert zipf["s0000"] > 5 * zipf["s0010"] > 0
    assert TrafficPattern("zipf", ADAPTERS).sample(50, seed=3) == TrafficPattern("zipf", ADAPTERS).sample(50, seed=3)


def test_bad_patterns_are_refused() -> None:
    with pytest.raises(ValueError, match="unknown traffic pattern 'random'"):
        TrafficPattern("random", ADAPTERS)
    with pytest.raises(ValueError, match="needs at least one adapter"):
        TrafficPattern("uniform")


def test_input_data_sends_every_input_in_every_entry() -> None:
    data = perf_analyzer_input_data(TrafficPattern("base"), ["a", "b"], max_tokens=8, count=4)
    assert data["data"][1] == {"text_input": ["b"], "adapter_id": [""], "max_tokens": [8]}
    equal_work = perf_analyzer_input_data(
        TrafficPattern("single", ADAPTERS), ["a"], max_tokens=8, count=2, ignore_eos=True
    )
    assert equal_work["data"][0] == {
        "text_input": ["a"],
        "adapter_id": ["s0000"],
        "max_tokens": [8],
        "ignore_eos": [True],
    }
    labels = {p.label for p in [TrafficPattern("zipf", ADAPTERS), TrafficPattern("single", ADAPTERS)]}
    assert labels == {"zipf-64", "single"}


def point(pattern: str, level: float, throughput: float, tokens: float = 10.0) -> SweepPoint:
    return SweepPoint(pattern, "concurrency", level, throughput, tokens, 10.0, 20.0, 30.0)


def test_report_has_headline_tables_and_plots(tmp_path: Path) -> None:
    points = [
        point("base", 1, 10),
        point("base", 16, 100, tokens=4),
        point("uniform-8", 1, 8),
        point("uniform-8", 16, 40),
    ]
    locust = [{"Type": "http", "Name": "uniform-8", "Request Count": "120", "Failure Count": "0", "Requests/s": "12.5",
               "50%": "80", "95%": "120", "99%": "150"}]  # fmt: skip
    facts = BenchmarkFacts(settings={"machine": "test box"}, naive_tokens_per_second=50.0, memory={"rss": "1 MiB"})
    assert headline_ratio(points, "uniform-8", 16) == pytest.approx(1.0)  # 40 x 10 tokens vs 100 x 4 tokens
    report = build_report(points, locust, facts, tmp_path)
    text = report.read_text()
    assert "reaches 1.00x the base model's token throughput" in text
    assert "50 tokens/s; peftserve through Triton is 8.0x faster" in text
    assert "| uniform-8 | 16 | 40.0 | 10.0 | 400 | 10 | 20 | 30 |" in text
    assert "| http | uniform-8 | 120 | 0 | 12.5 | 80 | 120 | 150 |" in text
    assert "| machine | test box |" in text
    for name in ("throughput.png", "latency.png", "overhead.png"):
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert f"({name})" in text
