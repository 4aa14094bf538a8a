"""Build the benchmark report: Markdown with tables, and PNG plots, from the sweep and locust CSVs."""

from __future__ import annotations

import csv
import statistics
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt

from loadtests.perf_sweep import SweepPoint


@dataclass(frozen=True)
class PatternFacts:
    """Which adapters a traffic pattern's requests name, and the ratio to the base model it is asked to reach."""

    label: str
    adapters: str  # ids or count, PEFT types, ranks, target modules
    target: float | None = None


@dataclass(frozen=True)
class MemoryFact:
    """One bound of the adapter cache as configured, against what the server reported during the run."""

    what: str
    configured: str
    measured: str


@dataclass(frozen=True)
class StallFacts:
    """Running streams while the first requests for adapters never requested before arrive at once."""

    streams: int
    cold_adapters: str  # which adapters arrived
    step_s: float  # a one-token piece's gap with nothing arriving (a run of the same streams before)
    worst_gap_s: float  # the streams' longest gap between pieces while the arrivals were served
    worst_added_s: float  # the most the arrivals added to one piece's gap
    steps_per_arrival: float  # the streams' whole added wait over the arrivals, in steps, per arriving request
    per_token_before_s: float  # mean time per output token before the arrivals
    per_token_during_s: float  # ... and while they were served
    outlasted: bool  # the streams were still decoding when the last arrival was answered


@dataclass
class BenchmarkFacts:
    """What the report says about the run besides the measurements."""

    settings: dict[str, str] = field(default_factory=dict)  # machine, versions, model, settings
    headline_pattern: str = "uniform-8"
    headline_level: float = 16
    naive_pattern: str = "uniform-8"  # the pattern whose adapters the naive baseline runs
    naive_tokens_per_second: float | None = None
    patterns: list[PatternFacts] = field(default_factory=list)
    memory: list[MemoryFact] = field(default_factory=list)
    stall: StallFacts | None = None
    # Each pattern's tokens/s over the base model's at the headline level, per round, each measured between
    # two base points (perf_sweep.ratios_beside_base); the report's ratios are their medians.
    ratios: dict[str, list[float]] = field(default_factory=dict)

    def ratio(self, points: list[SweepPoint], pattern: str) -> float | None:
        """The pattern's ratio to base: the median of its rounds beside base, or else the sweep's."""
        if self.ratios.get(pattern):
            return statistics.median(self.ratios[pattern])
        return headline_ratio(points, pattern, self.headline_level)


def read_locust_stats(path: Path) -> list[dict[str, str]]:
    with path.open() as handle:
        return [row for row in csv.DictReader(handle) if row["Name"] != "Aggregated"]


def _by_pattern(points: list[SweepPoint]) -> dict[str, list[SweepPoint]]:
    grouped: dict[str, list[SweepPoint]] = defaultdict(list)
    for point in points:
        grouped[point.pattern].append(point)
    return {pattern: sorted(values, key=lambda p: p.level) for pattern, values in grouped.items()}


def headline_ratio(points: list[SweepPoint], pattern: str, level: float) -> float | None:
    """Token throughput of ``pattern`` over the base model's, at the same load level."""
    lookup = {(p.pattern, p.level): p.tokens_per_second for p in points}
    base, mixed = lookup.get(("base", level)), lookup.get((pattern, level))
    return mixed / base if base and mixed is not None else None


def _line_plot(
    series: dict[str, tuple[list[float], list[float]]],
    path: Path,
    *,
    xlabel: str,
    ylabel: str,
    title: str,
    reference: float | None = None,
) -> None:
    figure, axis = plt.subplots(figsize=(7, 4.5))
    for label, (xs, ys) in series.items():
        axis.plot(xs, ys, marker="o", label=label)
    if reference is not None:
        axis.axhline(reference, color="grey", linestyle="--", linewidth=1)
    axis.set(xlabel=xlabel, ylabel=ylabel, title=title)
    axis.grid(alpha=0.3)
    axis.legend()
    _save(figure, path)


def _save(figure, path: Path) -> None:
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def plot_throughput(points: list[SweepPoint], path: Path) -> None:
    series = {
        pattern: ([p.level for p in values], [p.tokens_per_second for p in values])
        for pattern, values in _by_pattern(points).items()
    }
    _line_plot(
        series,
        path,
        xlabel=points[0].load.replace("_", " "),
        ylabel="generated tokens / s",
        title="Throughput by traffic pattern",
    )


def plot_latency(points: list[SweepPoint], path: Path) -> None:
    top = max(p.level for p in points)
    at_top = [p for p in points if p.level == top]
    figure, axis = plt.subplots(figsize=(7, 4.5))
    width = 0.25
    for offset, (name, attribute) in enumerate([("p50", "p50_ms"), ("p90", "p90_ms"), ("p99", "p99_ms")]):
        xs = [i + (offset - 1) * width for i in range(len(at_top))]
        axis.bar(xs, [getattr(p, attribute) for p in at_top], width, label=name)
    axis.set_xticks(range(len(at_top)), [p.pattern for p in at_top])
    axis.set(ylabel="latency (ms)", title=f"Latency percentiles at {points[0].load.replace('_', ' ')} {top:g}")
    axis.legend()
    _save(figure, path)


def plot_overhead(points: list[SweepPoint], path: Path) -> None:
    base = {p.level: p.tokens_per_second for p in points if p.pattern == "base"}
    series = {}
    for pattern, values in _by_pattern(points).items():
        kept = [p for p in values if base.get(p.level)]
        if pattern != "base" and kept:
            series[pattern] = ([p.level for p in kept], [p.tokens_per_second / base[p.level] for p in kept])
    _line_plot(
        series,
        path,
        xlabel=points[0].load.replace("_", " "),
        ylabel="tokens/s relative to the base model",
        title="Cost of adapters relative to the base model",
        reference=1.0,
    )


def build_report(points: list[SweepPoint], locust_rows: list[dict[str, str]], facts: BenchmarkFacts, out: Path) -> Path:
    """Write ``report.md`` and its plots into ``out``; returns the Markdown path."""
    out.mkdir(parents=True, exist_ok=True)
    plot_throughput(points, out / "throughput.png")
    plot_latency(points, out / "latency.png")
    plot_overhead(points, out / "overhead.png")
    ratio = facts.ratio(points, facts.headline_pattern)
    lines = ["# peftserve benchmark", ""]
    if ratio is not None:
        lines.append(
            f"**Headline: {facts.headline_pattern} at {points[0].load.replace('_', ' ')} {facts.headline_level:g} "
            f"reaches {ratio:.2f}x the base model's token throughput** (same run, same server)."
        )
    naive = next((p for p in points if p.pattern == facts.naive_pattern and p.level == facts.headline_level), None)
    if facts.naive_tokens_per_second and naive:
        speedup = naive.tokens_per_second / facts.naive_tokens_per_second
        lines.append(
            f"Naive baseline (one request at a time, PEFT `set_adapter` then `generate`, in process, the "
            f"{facts.naive_pattern} adapters and prompts): {facts.naive_tokens_per_second:.0f} tokens/s; peftserve "
            f"through Triton ({facts.naive_pattern}) is {speedup:.1f}x faster."
        )
    lines += ratio_table(points, facts)
    lines += stall_section(facts.stall)
    lines += memory_section(facts.memory)
    lines += ["", "## Run", "", "| setting | value |", "|---|---|"]
    lines += [f"| {key} | {value} |" for key, value in facts.settings.items()]
    lines += [
        "",
        "## perf_analyzer",
        "",
        "![throughput](throughput.png)",
        "",
        "![overhead](overhead.png)",
        "",
        "![latency](latency.png)",
        "",
        "| pattern | load | inferences/s | tokens/request | tokens/s | p50 ms | p90 ms | p99 ms |",
        "|---|---|---|---|---|---|---|---|",
    ]
    lines += [_sweep_row(p) for p in points]
    if not all(p.stable for p in points):
        lines += [
            "",
            "(unstable): perf_analyzer's windows did not agree within 50%, even twice as long; the point is "
            "their average.",
        ]
    if locust_rows:
        lines += [
            "",
            "## locust",
            "",
            "| protocol | pattern | requests | failures | req/s | p50 ms | p95 ms | p99 ms |",
            "|---|---|---|---|---|---|---|---|",
        ]
        lines += [
            f"| {r['Type']} | {r['Name']} | {r['Request Count']} | {r['Failure Count']} | {float(r['Requests/s']):.1f} "
            f"| {r['50%']} | {r['95%']} | {r['99%']} |"
            for r in locust_rows
        ]
    lines += [
        "",
        "This report measures whole requests through peft_llm. Time to first token: the server's "
        "`peftserve_time_to_first_token_seconds` histogram, or `perf_analyzer -i grpc --streaming` on peft_llm_stream.",
        "",
    ]
    report = out / "report.md"
    report.write_text("\n".join(lines))
    return report


def _sweep_row(p: SweepPoint) -> str:
    level = f"{p.level:g}" + ("" if p.stable else " (unstable)")
    return (
        f"| {p.pattern} | {level} | {p.throughput:.1f} | {p.tokens_per_request:.1f} | {p.tokens_per_second:.0f} "
        f"| {p.p50_ms:.0f} | {p.p90_ms:.0f} | {p.p99_ms:.0f} |"
    )


def ratio_table(points: list[SweepPoint], facts: BenchmarkFacts) -> list[str]:
    """Every pattern's tokens/s over the base model's at the headline level, with the adapters it names."""
    if not facts.patterns:
        return []
    level = facts.headline_level
    tokens = {p.pattern: p.tokens_per_second for p in points if p.level == level}
    unstable = {p.pattern for p in points if p.level == level and not p.stable}
    lines = [
        "",
        f"## Ratio to base at {points[0].load.replace('_', ' ')} {level:g}",
        "",
    ]
    if facts.ratios:
        rounds = len(next(iter(facts.ratios.values())))
        lines += [
            f"Each ratio is the median of {rounds} rounds; in each round every pattern was measured between two "
            "points of the base model, and its tokens/s is judged against their mean (a machine whose speed "
            "drifts during the run moves a ratio taken from the sweep's one base point). Tokens/s: the sweep's.",
            "",
        ]
    lines += ["| pattern | adapters | tokens/s | ratio to base | rounds | target |", "|---|---|---|---|---|---|"]
    for pattern in facts.patterns:
        ratio = facts.ratio(points, pattern.label)
        measured = f"{tokens[pattern.label]:.0f}" if pattern.label in tokens else "-"
        if pattern.label in unstable:
            measured += " (unstable)"
        shown = "1.00x" if pattern.label == "base" else (f"**{ratio:.2f}x**" if ratio is not None else "-")
        rounds = " / ".join(f"{r:.2f}" for r in facts.ratios.get(pattern.label, [])) or "-"
        if pattern.target is None:
            target = "-"
        else:
            verdict = "met" if ratio is not None and ratio >= pattern.target else "not met"
            target = f">= {pattern.target:.2f}x: {verdict}"
        lines.append(f"| {pattern.label} | {pattern.adapters} | {measured} | {shown} | {rounds} | {target} |")
    return lines


def stall_section(stall: StallFacts | None) -> list[str]:
    """The cold-adapter stall: the streams' gaps and time per output token, before and during the arrivals."""
    if stall is None:
        return []
    extra_steps = max(stall.worst_added_s, 0.0) / stall.step_s
    lines = [
        "",
        "## Cold adapters arriving while streams decode",
        "",
        f"{stall.streams} gRPC streams decode on the base model (same server, after the sweep) while the first "
        f"requests for {stall.cold_adapters} arrive at once. A piece of text can hold several tokens (an "
        "end-of-sequence token under `ignore_eos` sends no text), so each gap is judged against the same piece's "
        "gap in a run of the same streams with nothing arriving; the step is that run's time per token. The "
        "target: each arriving request delays the streams by at most one step.",
        "",
        "| step | worst gap during | most added to one piece | delay per arriving request | "
        "time per output token before | during |",
        "|---|---|---|---|---|---|",
        f"| {1000 * stall.step_s:.1f} ms | {1000 * stall.worst_gap_s:.1f} ms | {1000 * stall.worst_added_s:.1f} ms "
        f"({extra_steps:.1f} steps) | **{stall.steps_per_arrival:.1f} steps** (target <= 1: "
        f"{'met' if stall.steps_per_arrival <= 1 else 'not met'}) | {1000 * stall.per_token_before_s:.1f} ms | "
        f"{1000 * stall.per_token_during_s:.1f} ms |",
    ]
    if not stall.outlasted:
        lines += ["", "Some streams finished before the last arrival was answered: the worst gap may be understated."]
    return lines


def memory_section(memory: list[MemoryFact]) -> list[str]:
    if not memory:
        return []
    lines = ["", "## Memory", "", "| what | configured bound | measured (peak during the run) |", "|---|---|---|"]
    return lines + [f"| {fact.what} | {fact.configured} | {fact.measured} |" for fact in memory]
