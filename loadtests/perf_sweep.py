"""Sweep perf_analyzer over traffic patterns and concurrency (or request rate); one CSV row per point.

``python -m loadtests.perf_sweep --url 127.0.0.1:8000 --pattern uniform --adapters a,b,c --concurrency 1,4,16``
"""

from __future__ import annotations

import argparse
import csv
import json
import subprocess
import tempfile
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from tqdm import tqdm

from loadtests.traffic import PATTERNS, TrafficPattern, perf_analyzer_input_data
from tools.client import build_inputs
from tools.triton_server import perf_analyzer_env, perf_analyzer_path

PROMPTS = ["the cat looks at", "a dog", "my friend writes about", "the river", "our team waits for"]
# perf_analyzer cycles through its entries: at least this many, and one per adapter, so that a pattern over
# 1,000 adapters names all 1,000 rather than the first 64.
INPUT_ENTRIES = 64


def mean_output_tokens(url: str, input_data: dict, protocol: str) -> float:
    """Send the first ``INPUT_ENTRIES`` input-data entries once, a few at a time, and average their
    ``output_tokens`` answers (exact under ``ignore_eos``; a sample of the cycle otherwise)."""
    module = grpcclient if protocol == "grpc" else httpclient

    def output_tokens(entry: dict) -> int:
        inputs = build_inputs(
            module,
            entry["text_input"][0],
            entry["adapter_id"][0],
            entry["max_tokens"][0],
            always_send_adapter=True,
            ignore_eos=bool(entry.get("ignore_eos", [False])[0]),
        )
        answer = module.InferenceServerClient(url).infer("peft_llm", inputs)
        return int(answer.as_numpy("output_tokens")[0, 0])

    with ThreadPoolExecutor(max_workers=8) as pool:
        counts = list(pool.map(output_tokens, input_data["data"][:INPUT_ENTRIES]))
    return sum(counts) / len(counts)


@dataclass
class SweepPoint:
    pattern: str
    load: str  # "concurrency" or "request_rate"
    level: float
    throughput: float  # inferences per second
    tokens_per_request: float  # mean output_tokens over the input-data entries perf_analyzer cycles through
    p50_ms: float
    p90_ms: float
    p99_ms: float
    stable: bool = True  # perf_analyzer's windows agreed within the stability percentage

    @property
    def tokens_per_second(self) -> float:
        return self.throughput * self.tokens_per_request


class PerfAnalyzerError(RuntimeError):
    pass


# perf_analyzer's exit status when its windows never agreed within the stability percentage.
STABILITY_ERROR = 2
# Stability percentage of each try at a point, with its window length as a multiple of the asked one: on 2
# shared cores a pattern that loads adapters all the time (distinct over 1,000) may never agree within 50%;
# the last try takes its windows' average whatever their spread, and the point is marked unstable.
TRIES = ((1, 50), (2, 50), (2, 10_000))


def run_point(
    url: str, input_data: Path, *, load: str, level: float, measurement_ms: int, protocol: str
) -> tuple[dict, bool]:
    """One perf_analyzer measurement: its CSV row, and whether its windows agreed (see ``TRIES``)."""
    for scale, stability in TRIES:
        completed, row = _perf_analyzer(url, input_data, load, level, measurement_ms * scale, stability, protocol)
        if row is not None:
            return row, stability == TRIES[0][1]
        if completed.returncode != STABILITY_ERROR:
            break
    raise PerfAnalyzerError(
        f"perf_analyzer failed ({completed.returncode}): {completed.stdout[-1500:]}{completed.stderr[-1500:]}"
    )


def _perf_analyzer(
    url: str, input_data: Path, load: str, level: float, measurement_ms: int, stability: int, protocol: str
) -> tuple[subprocess.CompletedProcess, dict | None]:
    with tempfile.TemporaryDirectory() as tmp:
        result_csv = Path(tmp) / "result.csv"
        load_args = (
            ["--concurrency-range", str(int(level))] if load == "concurrency" else ["--request-rate-range", str(level)]
        )
        command = [
            str(perf_analyzer_path()), "-m", "peft_llm", "-u", url, "-i", protocol, "--input-data", str(input_data),
            *load_args, "--measurement-interval", str(measurement_ms),
            # 2 shared cores: looser stability, bounded trials, so a point always finishes.
            "--stability-percentage", str(stability), "--max-trials", "4", "-f", str(result_csv),
        ]  # fmt: skip
        completed = subprocess.run(command, env=perf_analyzer_env(), capture_output=True, text=True, timeout=900)
        if completed.returncode != 0 or not result_csv.exists():
            return completed, None
        with result_csv.open() as handle:
            return completed, next(csv.DictReader(handle))


class PointRunner:
    """perf_analyzer points over some traffic patterns against one server: each pattern's input data, written
    once, and its tokens per request."""

    def __init__(
        self,
        url: str,
        patterns: list[TrafficPattern],
        workdir: Path,
        *,
        load: str = "concurrency",
        max_tokens: int = 16,
        ignore_eos: bool = False,
        measurement_ms: int = 3000,
        protocol: str = "http",
    ) -> None:
        self.url, self.load, self.measurement_ms, self.protocol = url, load, measurement_ms, protocol
        self.data: dict[str, Path] = {}
        self.tokens: dict[str, float] = {}
        for pattern in tqdm(patterns, desc="tokens per request", unit="pattern"):
            entries = perf_analyzer_input_data(
                pattern, PROMPTS, max_tokens=max_tokens, count=max(INPUT_ENTRIES, len(pattern.adapters)),
                ignore_eos=ignore_eos,
            )  # fmt: skip
            self.data[pattern.label] = workdir / f"{pattern.label}.json"
            self.data[pattern.label].write_text(json.dumps(entries))
            # Greedy answers are fixed, so one pass over the entries gives each pattern's tokens per request:
            # patterns whose answers stop early at end-of-sequence do less work, and tokens/s compares fairly.
            self.tokens[pattern.label] = mean_output_tokens(url, entries, protocol)

    def point(self, pattern: TrafficPattern, level: float) -> SweepPoint:
        row, stable = run_point(
            self.url, self.data[pattern.label], load=self.load, level=level, measurement_ms=self.measurement_ms,
            protocol=self.protocol,
        )  # fmt: skip
        return SweepPoint(
            pattern=pattern.label,
            load=self.load,
            level=level,
            throughput=float(row["Inferences/Second"]),
            tokens_per_request=self.tokens[pattern.label],
            p50_ms=float(row["p50 latency"]) / 1000,
            p90_ms=float(row["p90 latency"]) / 1000,
            p99_ms=float(row["p99 latency"]) / 1000,
            stable=stable,
        )


def sweep(runner: PointRunner, patterns: list[TrafficPattern], levels: Iterable[float]) -> list[SweepPoint]:
    """Every pattern at every level, pattern by pattern."""
    plan = [(pattern, level) for pattern in patterns for level in levels]
    return [runner.point(pattern, level) for pattern, level in tqdm(plan, desc="perf_analyzer", unit="point")]


def ratios_beside_base(
    runner: PointRunner, base: TrafficPattern, patterns: list[TrafficPattern], level: float, rounds: int
) -> dict[str, list[float]]:
    """Each pattern's tokens/s over the base model's, once per round, each pattern measured between two base
    points (base, first, base, second, ..., base) and judged against their mean.

    A machine whose speed drifts while a sweep runs pattern after pattern moves every ratio with it: on the
    2-core build machines the same code gave Zipf-64 0.54x and 0.89x in two runs, the base model's own rate
    1,672-2,423 tokens/s. Base points on both sides of each pattern cancel a drift that is slow beside a point.
    """
    order = [base, *[point for _ in range(rounds) for pattern in patterns for point in (pattern, base)]]
    measured = [runner.point(pattern, level) for pattern in tqdm(order, desc="ratios beside base", unit="point")]
    return base_relative(measured)


def base_relative(measured: list[SweepPoint]) -> dict[str, list[float]]:
    """From points that alternate base, pattern, base, pattern, ..., base: each pattern's tokens/s over the
    mean of the base points beside it, in the order measured."""
    bases, others = measured[::2], measured[1::2]
    if len(bases) != len(others) + 1 or len({p.pattern for p in bases}) > 1:
        raise ValueError("points must alternate base, pattern, base, ..., base")
    ratios: dict[str, list[float]] = {}
    for before, point, after in zip(bases, others, bases[1:], strict=False):
        beside = (before.tokens_per_second + after.tokens_per_second) / 2
        ratios.setdefault(point.pattern, []).append(point.tokens_per_second / beside)
    return ratios


def write_csv(points: list[SweepPoint], path: Path) -> None:
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=[f.name for f in fields(SweepPoint)])
        writer.writeheader()
        writer.writerows(asdict(point) for point in points)


def read_csv(path: Path) -> list[SweepPoint]:
    with path.open() as handle:
        return [
            SweepPoint(
                row["pattern"], row["load"], float(row["level"]), float(row["throughput"]),
                float(row["tokens_per_request"]), float(row["p50_ms"]), float(row["p90_ms"]), float(row["p99_ms"]),
                row.get("stable", "True") == "True",
            )
            for row in csv.DictReader(handle)
        ]  # fmt: skip


def build_parser() -> argparse.ArgumentParser:
    """The command line of ``python -m loadtests.perf_sweep`` (also read by tests/unit/test_docs.py)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", default="127.0.0.1:8000", help="HTTP (or gRPC with --protocol grpc) address")
    parser.add_argument("--protocol", choices=["http", "grpc"], default="http")
    parser.add_argument("--pattern", action="append", choices=PATTERNS, required=True)
    parser.add_argument("--adapters", default="", help="comma-separated adapter ids the patterns draw from")
    parser.add_argument("--concurrency", default="", help="comma-separated concurrency levels")
    parser.add_argument("--request-rate", default="", help="comma-separated request rates (instead of concurrency)")
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--ignore-eos", action="store_true", help="every request generates exactly max_tokens")
    parser.add_argument("--measurement-ms", type=int, default=3000)
    parser.add_argument("--out", type=Path, default=Path("perf_sweep.csv"))
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    adapters = tuple(a for a in args.adapters.split(",") if a)
    patterns = [TrafficPattern(kind, () if kind == "base" else adapters) for kind in args.pattern]
    load, levels = (
        ("request_rate", args.request_rate) if args.request_rate else ("concurrency", args.concurrency or "1")
    )
    with tempfile.TemporaryDirectory() as tmp:
        runner = PointRunner(
            args.url,
            patterns,
            Path(tmp),
            load=load,
            max_tokens=args.max_tokens,
            ignore_eos=args.ignore_eos,
            measurement_ms=args.measurement_ms,
            protocol=args.protocol,
        )
        points = sweep(runner, patterns, [float(v) for v in levels.split(",")])
    write_csv(points, args.out)
    print(f"{len(points)} points written to {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
