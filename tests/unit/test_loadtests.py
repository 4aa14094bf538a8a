"""Traffic patterns, synthetic adapters, perf_analyzer input data and the report builder."""

from __future__ import annotations

from collections import Counter
from dataclasses import replace
from pathlib import Path

import pytest

from loadtests.bench import (
    COLD_ADAPTERS,
    DEMO,
    SMOLLM2,
    bench_model,
    build_repository,
    concurrency_levels,
    describe_adapters,
    full_collections,
)
from loadtests.perf_sweep import SweepPoint, base_relative, read_csv, write_csv
from loadtests.report import BenchmarkFacts, MemoryFact, PatternFacts, StallFacts, build_report, headline_ratio
from loadtests.synthetic import LoraShape, write_random_loras
from loadtests.traffic import TrafficPattern, perf_analyzer_input_data
from tools.bench_stream_stall import PieceGap, StreamGaps, StreamRun, compare_runs

ADAPTERS = tuple(f"s{i:04d}" for i in range(64))


def test_patterns_choose_adapters_as_named() -> None:
    assert TrafficPattern("base").sample(5) == [""] * 5
    assert TrafficPattern("single", ADAPTERS).sample(3) == ["s0000"] * 3
    assert TrafficPattern("distinct", ADAPTERS[:4]).sample(6) == ["s0000", "s0001", "s0002", "s0003", "s0000", "s0001"]
    uniform = Counter(TrafficPattern("uniform", ADAPTERS[:8]).sample(8000, seed=1))
    assert set(uniform) == set(ADAPTERS[:8]) and max(uniform.values()) < 1.2 * min(uniform.values())
    trained = Counter(TrafficPattern("trained", ("pirate", "robot", "knight")).sample(3000, seed=1))
    assert set(trained) == {"pirate", "robot", "knight"} and max(trained.values()) < 1.2 * min(trained.values())
    assert TrafficPattern("trained", ("pirate", "robot", "knight")).label == "trained-3"
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
    points += [point("trained-3", 16, 36), replace(point("zipf-64", 16, 20), stable=False)]
    facts = BenchmarkFacts(
        settings={"machine": "test box"},
        headline_pattern="trained-3",
        naive_tokens_per_second=50.0,
        patterns=[
            PatternFacts("base", "none (base model)"),
            PatternFacts("trained-3", "`pirate` LoRA r8", target=0.9),
            PatternFacts("uniform-8", "8 synthetic"),
            PatternFacts("zipf-64", "64 synthetic", target=0.9),
        ],
        memory=[MemoryFact("adapter memory on the device", "`max_adapter_memory_mb` 512 MiB", "0.2 MiB")],
        stall=StallFacts(4, "20 synthetic adapters", 0.010, 0.035, 0.025, 1.5, 0.011, 0.016, outlasted=True),
    )
    assert headline_ratio(points, "uniform-8", 16) == pytest.approx(1.0)  # 40 x 10 tokens vs 100 x 4 tokens
    report = build_report(points, locust, facts, tmp_path)
    text = report.read_text()
    assert "trained-3 at concurrency 16 reaches 0.90x the base model's token throughput" in text
    assert "50 tokens/s; peftserve through Triton (uniform-8) is 8.0x faster" in text
    assert "## Ratio to base at concurrency 16" in text
    assert "| base | none (base model) | 400 | 1.00x | - | - |" in text
    assert "| trained-3 | `pirate` LoRA r8 | 360 | **0.90x** | - | >= 0.90x: met |" in text
    assert "| uniform-8 | 8 synthetic | 400 | **1.00x** | - | - |" in text
    assert "| zipf-64 | 64 synthetic | 200 (unstable) | **0.50x** | - | >= 0.90x: not met |" in text
    assert "| zipf-64 | 16 (unstable) | 20.0 | 10.0 | 200 | 10 | 20 | 30 |" in text
    assert "did not agree within 50%" in text
    assert "| adapter memory on the device | `max_adapter_memory_mb` 512 MiB | 0.2 MiB |" in text
    stall_row = "| 10.0 ms | 35.0 ms | 25.0 ms (2.5 steps) | **1.5 steps** (target <= 1: not met) | 11.0 ms | 16.0 ms |"
    assert stall_row in text
    assert "may be understated" not in text
    assert "| uniform-8 | 16 | 40.0 | 10.0 | 400 | 10 | 20 | 30 |" in text
    assert "| http | uniform-8 | 120 | 0 | 12.5 | 80 | 120 | 150 |" in text
    assert "| machine | test box |" in text
    for name in ("throughput.png", "latency.png", "overhead.png"):
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert f"({name})" in text


def test_ratios_beside_base_judge_each_pattern_against_the_base_points_around_it(tmp_path: Path) -> None:
    """The machine slows down by half during the rounds: each ratio, against the base points measured just
    before and after it, stays what the patterns cost; the sweep's one early base point would halve them."""
    measured = [
        point("base", 16, 100),
        point("zipf-64", 16, 90),  # base 100 then 80 beside it: 90 / 90
        point("base", 16, 80),
        point("distinct-1000", 16, 56),  # 56 / 70
        point("base", 16, 60),
        point("zipf-64", 16, 50),  # 50 / 55
        point("base", 16, 50),
    ]
    ratios = base_relative(measured)
    assert ratios.keys() == {"zipf-64", "distinct-1000"}
    assert ratios["zipf-64"] == pytest.approx([1.0, 50 / 55])
    assert ratios["distinct-1000"] == pytest.approx([0.8])
    with pytest.raises(ValueError, match="alternate"):
        base_relative(measured[:-1])
    facts = BenchmarkFacts(
        headline_pattern="zipf-64",
        patterns=[PatternFacts("base", "none"), PatternFacts("zipf-64", "64 synthetic", target=0.9)],
        ratios=ratios,
    )
    text = build_report([point("base", 16, 100), point("zipf-64", 16, 50)], [], facts, tmp_path).read_text()
    median = (1.0 + 50 / 55) / 2
    assert f"zipf-64 at concurrency 16 reaches {median:.2f}x" in text
    assert f"| zipf-64 | 64 synthetic | 500 | **{median:.2f}x** | 1.00 / 0.91 | >= 0.90x: met |" in text
    assert "the median of 2 rounds" in text


def test_a_gap_is_judged_against_its_own_piece_undisturbed() -> None:
    """A piece that holds two tokens (an end-of-sequence token sends no text) waits two steps by itself: only
    what the arrival added to it is a stall."""
    gaps = StreamGaps(
        before=[PieceGap(0.010, 0.010), PieceGap(0.021, 0.020), PieceGap(0.011, 0.010)],
        during=[PieceGap(0.015, 0.010), PieceGap(0.045, 0.020)],
        outlasted=True,
        step=0.010,
    )
    assert gaps.worst_during == pytest.approx(0.045)
    assert gaps.worst_added == pytest.approx(0.025)
    assert gaps.extra_steps == pytest.approx(2.5)
    assert gaps.stall_ratio == pytest.approx(3.5)
    assert gaps.total_added_steps == pytest.approx(3.0)  # 0.005 + 0.025 over one stream, in 0.010 s steps
    assert gaps.per_token_before == pytest.approx(0.042 / 4)  # 1 + 2 + 1 tokens
    assert gaps.per_token_during == pytest.approx(0.060 / 3)


def test_runs_are_compared_piece_by_piece_until_a_stream_diverges() -> None:
    """Stream 0 streams the undisturbed pieces; stream 1's third piece differs, so from there its pieces count
    as one token each. The step is the undisturbed time per token: 5 tokens over 0.050 s."""
    reference = StreamRun(
        times=[[0.0, 0.010, 0.030, 0.040], [0.0, 0.010, 0.030, 0.040]],
        pieces=[["a", "b", "c", "d"]] * 2,
        tokens=[6, 6],
        arrived=1.0,
        answered=1.0,
    )
    measured = StreamRun(
        times=[[0.0, 0.010, 0.045, 0.055], [0.0, 0.010, 0.045, 0.085]],
        pieces=[["a", "b", "c", "d"], ["a", "b", "x", "y"]],
        tokens=[6, 6],
        arrived=0.015,
        answered=0.050,
    )
    gaps = compare_runs(reference, measured)
    assert gaps.step == pytest.approx(0.008)
    assert gaps.diverged == 1
    assert [gap.undisturbed for gap in gaps.before] == pytest.approx([0.010, 0.010])
    assert [gap.seconds for gap in gaps.during] == pytest.approx([0.035, 0.010, 0.035, 0.040])
    assert [gap.undisturbed for gap in gaps.during] == pytest.approx([0.020, 0.010, 0.008, 0.008])
    assert gaps.worst_added == pytest.approx(0.032)


def test_synthetic_adapters_copy_the_trained_loras_shape(model_dir: Path, tmp_path: Path) -> None:
    shape = LoraShape.of(model_dir / "adapters" / "pirate" / "1")
    assert (shape.rank, shape.alpha) == (8, 16)
    assert shape.target_modules == ("down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj")
    with pytest.raises(ValueError, match="not a plain LoRA adapter"):
        LoraShape.of(model_dir / "adapters" / "knight" / "1")  # DoRA
    ids = write_random_loras(model_dir / "base_model", tmp_path, 2, shape=shape, prefix="s", start=5)
    assert ids == ["s0005", "s0006"]
    assert all(LoraShape.of(tmp_path / adapter_id / "1") == shape for adapter_id in ids)
    weights = [(tmp_path / adapter_id / "1" / "adapter_model.safetensors").read_bytes() for adapter_id in ids]
    assert weights[0] != weights[1]
    described = describe_adapters(tmp_path, tuple(ids))
    assert (
        described
        == "`s0005` LoRA r8 on down,gate,k,o,q,up,v (all layers); `s0006` LoRA r8 on down,gate,k,o,q,up,v (all layers)"
    )
    trained = describe_adapters(model_dir / "adapters", ("pirate", "robot", "knight"))
    assert "`robot` rsLoRA r4 on down,q,v" in trained and "`knight` DoRA r8 on o,q,up,v" in trained


def test_bench_picks_the_models_trained_adapters_and_headline(tmp_path: Path) -> None:
    assert bench_model(tmp_path) is DEMO
    (tmp_path / "peft_llm").mkdir()
    (tmp_path / "peft_llm" / "smollm2_build.json").write_text("{}")
    assert bench_model(tmp_path) is SMOLLM2
    assert concurrency_levels("", "short", DEMO) == [1, 4, 16]
    assert concurrency_levels("", "short", SMOLLM2) == [1, 4, 8]
    assert concurrency_levels("8,2", "short", SMOLLM2) == [2, 8]


def test_bench_repository_adds_synthetic_and_cold_adapters_beside_the_trained(model_dir: Path, tmp_path: Path) -> None:
    config, synthetic, cold = build_repository(model_dir.parent, tmp_path, DEMO, 3)
    assert synthetic == ["s0000", "s0001", "s0002"]
    assert cold == [f"s{i:04d}" for i in range(3, 3 + COLD_ADAPTERS)]
    adapters = Path(config.adapter_repository)
    assert adapters == tmp_path / "adapters" and Path(config.base_model) == model_dir / "base_model"
    assert {"pirate", "robot", "knight", *synthetic, *cold} <= {p.name for p in adapters.iterdir()}
    assert LoraShape.of(adapters / cold[-1] / "1") == LoraShape.of(model_dir / "adapters" / "pirate" / "1")


def test_sweep_csv_keeps_whether_a_point_was_stable(tmp_path: Path) -> None:
    points = [point("base", 16, 100), replace(point("distinct-1000", 16, 40), stable=False)]
    write_csv(points, tmp_path / "sweep.csv")
    assert read_csv(tmp_path / "sweep.csv") == points


def test_full_collections_are_read_from_the_gc_pause_histogram_of_generation_2() -> None:
    series = 'model="peft_llm",generation="{}"'
    page = "\n".join(
        [
            "# TYPE peftserve_gc_pause_seconds histogram",
            f"peftserve_gc_pause_seconds_count{{{series.format(0)}}} 500",
            f"peftserve_gc_pause_seconds_sum{{{series.format(0)}}} 0.5",
            f"peftserve_gc_pause_seconds_count{{{series.format(2)}}} 4",
            f"peftserve_gc_pause_seconds_sum{{{series.format(2)}}} 0.06",
            f'peftserve_gc_pause_seconds_bucket{{{series.format(2)},le="0.01"}} 1',
            f'peftserve_gc_pause_seconds_bucket{{{series.format(2)},le="0.025"}} 4',
            f'peftserve_gc_pause_seconds_bucket{{{series.format(2)},le="0.05"}} 4',
            f'peftserve_gc_pause_seconds_bucket{{{series.format(2)},le="+Inf"}} 4',
        ]
    )
    assert full_collections(page) == "4, mean 15.0 ms, longest <= 25 ms (`peftserve_gc_pause_seconds`)"
    assert full_collections(page.split("\n", 3)[3].replace('generation="2"', 'generation="1"')) == "none"
