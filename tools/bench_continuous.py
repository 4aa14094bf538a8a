"""``make bench-continuous``: continuous batching against whole-request dynamic batching, side by side.

One process, one engine, the same staggered arrivals for both: requests over 8 adapters arrive at random
times with ``max_tokens`` drawn from 8 to 128 (end-of-sequence ignored, so both modes do the same work).
*Whole-request* batching is what Triton's dynamic batcher gives a non-decoupled model: take what is
waiting (up to the batch size), run it to the end of its longest request, repeat. *Continuous* batching is
``peftserve.continuous``: requests join between decoding steps and leave when done. Prints throughput and
latency (all requests, and short ones) for both, with their ratio, and writes a latency plot. The two modes
run alternately for ``--rounds`` rounds; the table shows the round of median ratio, with every round's ratio.

Then the chunked-prefill figure: four streams decode while a prompt of the maximum allowed length joins;
what the join added to the streams' waits, each piece against the same piece with nothing joining (in
decoding steps, as ``make bench-stall`` measures through Triton), with the prompt prefilled whole
(``prefill_chunk_tokens`` and ``prefill_step_share`` 0) and in chunks (the defaults), side by side.
"""

from __future__ import annotations

import argparse
import random
import statistics
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import matplotlib
from tqdm import tqdm

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from peftserve.config import ServeConfig
from peftserve.continuous import Work, run_torch_single_threaded
from peftserve.engine import Engine
from peftserve.requests import Completion, CompletionRequest
from tools.bench_engine import build_assets, prompts
from tools.bench_stream_stall import StreamGaps, StreamRun, compare_runs, print_table

SHORT_TOKENS = 16  # requests up to this many tokens count as "short"


@dataclass
class Arrival:
    at: float  # seconds after the start
    request: CompletionRequest


@dataclass
class Outcome:
    mode: str
    latencies: list[float]  # per request, arrival to answer
    short_latencies: list[float]
    tokens: int
    seconds: float  # first arrival to last answer

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / self.seconds


def arrivals(texts: list[str], adapters: list[str], *, count: int, mean_gap: float, seed: int) -> list[Arrival]:
    rng = random.Random(seed)
    at, planned = 0.0, []
    for index in range(count):
        max_tokens = rng.choice([8, 16, 32, 64, 96, 128])
        request = CompletionRequest(
            texts[index % len(texts)], adapters[index % len(adapters)], max_tokens, ignore_eos=True
        )
        planned.append(Arrival(at, request))
        at += rng.expovariate(1.0 / mean_gap)
    return planned


def replay(planned: list[Arrival], submit: Callable[[int, CompletionRequest], None]) -> float:
    """Submit each request at its arrival time; returns the start time."""
    started = time.perf_counter()
    for index, arrival in enumerate(planned):
        delay = started + arrival.at - time.perf_counter()
        if delay > 0:
            time.sleep(delay)
        submit(index, arrival.request)
    return started


def run_whole_request(engine: Engine, planned: list[Arrival], batch_size: int) -> Outcome:
    waiting: list[tuple[int, float]] = []
    answered: dict[int, float] = {}
    lock, arrived = threading.Lock(), threading.Condition()
    done = threading.Event()

    def dispatcher() -> None:
        while len(answered) < len(planned):
            with arrived:
                while not waiting:
                    arrived.wait()
                with lock:
                    batch, waiting[:] = waiting[:batch_size], waiting[batch_size:]
            engine.complete([planned[index].request for index, _ in batch])
            now = time.perf_counter()
            for index, _ in batch:
                answered[index] = now
        done.set()

    submitted: dict[int, float] = {}

    def submit(index: int, request: CompletionRequest) -> None:
        submitted[index] = time.perf_counter()
        with arrived:
            with lock:
                waiting.append((index, submitted[index]))
            arrived.notify()

    thread = threading.Thread(target=dispatcher, daemon=True)
    thread.start()
    started = replay(planned, submit)
    done.wait()
    return _outcome("whole-request batching", planned, submitted, answered, started)


def run_continuous(engine: Engine, planned: list[Arrival]) -> Outcome:
    batcher = engine.batcher
    submitted: dict[int, float] = {}
    answered: dict[int, float] = {}
    done = threading.Event()

    def submit(index: int, request: CompletionRequest) -> None:
        def on_done(answer, index=index) -> None:
            answered[index] = time.perf_counter()
            if len(answered) == len(planned):
                done.set()

        submitted[index] = time.perf_counter()
        batcher.submit(Work(request, on_done=on_done))

    started = replay(planned, submit)
    done.wait()
    return _outcome("continuous batching", planned, submitted, answered, started)


def measure_prefill_stall(engine: Engine, long_prompt: str, streams: int = 4) -> StreamGaps:
    """Streams decode; a maximum-length prompt joins; what does it add to the streams' waits?

    The same streams run first with nothing joining, so each piece is judged against its own undisturbed
    time (``bench_stream_stall.compare_runs``, the measurement ``make bench-stall`` makes through Triton)."""
    reference = _run_streams(engine, None, streams)
    return compare_runs(reference, _run_streams(engine, long_prompt, streams))


def _run_streams(engine: Engine, long_prompt: str | None, streams: int) -> StreamRun:
    times: list[list[float]] = [[] for _ in range(streams)]
    pieces: list[list[str]] = [[] for _ in range(streams)]
    answers: dict[object, object] = {}
    all_done = threading.Event()
    prefilled = threading.Event()
    expected = streams + (long_prompt is not None)

    def done(key: object, answer: object) -> None:  # runs on the batching loop: it must not block
        answers[key] = answer
        if key == "long":
            prefilled.set()
        if len(answers) == expected:
            all_done.set()

    def on_text(index: int, text: str) -> None:
        times[index].append(time.perf_counter())
        pieces[index].append(text)

    for index in range(streams):  # one prompt for all: compare_runs takes the streams' text to be the same
        request = CompletionRequest("w10 w20 w30", "", 120, ignore_eos=True)
        engine.batcher.submit(Work(request, on_done=partial(done, index), on_text=partial(on_text, index)))
    while min(len(t) for t in times) < 30:
        time.sleep(0.01)
    arrived = time.perf_counter()
    if long_prompt is not None:  # one token: answered once the prompt is in
        engine.batcher.submit(Work(CompletionRequest(long_prompt, "", 1), on_done=partial(done, "long")))
        prefilled.wait()
    answered = time.perf_counter()
    all_done.wait()
    failures = [answer for answer in answers.values() if not isinstance(answer, Completion)]
    if failures:
        raise RuntimeError(f"prefill stall run failed: {failures}")
    tokens = [answers[index].output_tokens for index in range(streams)]
    return StreamRun(times, pieces, tokens, arrived, answered)


def longest_prompt(tokenizer, tokens: int) -> str:
    """A prompt of exactly ``tokens`` tokens (max_prompt_tokens: the longest a request may send)."""
    ids = tokenizer(" ".join(f"w{100 + i}" for i in range(tokens))).input_ids[:tokens]
    text = tokenizer.decode(ids)
    while len(tokenizer(text).input_ids) > tokens:
        ids = ids[:-1]
        text = tokenizer.decode(ids)
    return text


def _outcome(mode, planned, submitted, answered, started) -> Outcome:
    latencies = [answered[i] - submitted[i] for i in range(len(planned))]
    short = [latencies[i] for i, a in enumerate(planned) if a.request.max_tokens <= SHORT_TOKENS]
    tokens = sum(a.request.max_tokens for a in planned)
    return Outcome(mode, latencies, short, tokens, max(answered.values()) - started)


def median_pair(pairs: list[tuple[Outcome, Outcome]]) -> tuple[Outcome, Outcome]:
    """The round whose throughput ratio is the median: a shared machine's noise moves single rounds a lot."""
    ratios = [c.tokens_per_second / w.tokens_per_second for w, c in pairs]
    print("throughput ratio by round (run alternately): " + ", ".join(f"{r:.2f}x" for r in ratios))
    return sorted(pairs, key=lambda pair: pair[1].tokens_per_second / pair[0].tokens_per_second)[len(pairs) // 2]


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def print_comparison(whole: Outcome, continuous: Outcome) -> None:
    rows = [
        ("throughput, tokens/s", whole.tokens_per_second, continuous.tokens_per_second),
        ("latency p50, all requests (s)", statistics.median(whole.latencies), statistics.median(continuous.latencies)),
        ("latency p95, all requests (s)", percentile(whole.latencies, 0.95), percentile(continuous.latencies, 0.95)),
        (
            f"latency p50, short requests <= {SHORT_TOKENS} tokens (s)",
            statistics.median(whole.short_latencies),
            statistics.median(continuous.short_latencies),
        ),
        (
            "latency p95, short requests (s)",
            percentile(whole.short_latencies, 0.95),
            percentile(continuous.short_latencies, 0.95),
        ),
    ]
    print(f"\n{'':<44}{'whole-request':>15}{'continuous':>13}{'ratio':>8}")
    for name, a, b in rows:
        print(f"{name:<44}{a:>15.2f}{b:>13.2f}{b / a:>8.2f}")
    print(
        f"\ncontinuous / whole-request throughput: {continuous.tokens_per_second / whole.tokens_per_second:.2f}x; "
        f"short requests' median latency: {statistics.median(whole.short_latencies):.2f} s -> "
        f"{statistics.median(continuous.short_latencies):.2f} s"
    )


def plot(whole: Outcome, continuous: Outcome, planned: list[Arrival], path: Path) -> None:
    figure, axis = plt.subplots(figsize=(7, 4.5))
    for outcome, marker in ((whole, "o"), (continuous, "x")):
        axis.scatter([a.request.max_tokens for a in planned], outcome.latencies, marker=marker, label=outcome.mode)
    axis.set_xlabel("max_tokens of the request")
    axis.set_ylabel("latency, arrival to answer (s)")
    axis.set_title("Latency by request length: whole-request vs continuous batching")
    axis.legend()
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=120)
    print(f"plot: {path}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--mean-gap-ms", type=float, default=40.0, help="mean time between arrivals")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=3, help="whole/continuous pairs, run alternately")
    parser.add_argument("--out", type=Path, default=Path("loadtests/reports/continuous.png"))
    parser.add_argument("--max-prompt-tokens", type=int, default=1024)
    args = parser.parse_args(argv)
    run_torch_single_threaded()
    with tempfile.TemporaryDirectory() as tmp:
        base_dir, loras, _ = build_assets(Path(tmp), hidden=args.hidden, layers=args.layers, lora_count=8)

        def engine_with(**settings) -> Engine:
            return Engine(
                ServeConfig(
                    base_model=str(base_dir),
                    adapter_repository=str(Path(tmp) / "adapters"),
                    max_tokens_limit=128,
                    max_prompt_tokens=args.max_prompt_tokens,
                    max_prompt_bytes=16 * args.max_prompt_tokens,
                    **settings,
                )
            )

        engine = engine_with(max_running_rows=args.batch_size)
        planned = arrivals(prompts(16, 12), loras, count=args.requests, mean_gap=args.mean_gap_ms / 1000, seed=7)
        engine.complete([a.request for a in planned[:8]])  # warm-up: adapters loaded, kernels touched
        pairs = []
        for _ in tqdm(range(args.rounds), desc="whole/continuous rounds", unit="round"):
            pairs.append((run_whole_request(engine, planned, args.batch_size), run_continuous(engine, planned)))
        whole, continuous = median_pair(pairs)
        print_comparison(whole, continuous)
        plot(whole, continuous, planned, args.out)
        long_prompt = longest_prompt(engine.tokenizer, args.max_prompt_tokens)
        whole_prompt = {"prefill_chunk_tokens": 0, "prefill_step_share": 0.0}
        stalls = [
            (name, measure_prefill_stall(engine_with(**settings), long_prompt))
            for name, settings in (("whole prompt", whole_prompt), ("chunked (default)", {}))
        ]
    print(f"\nstreams' waits while a {args.max_prompt_tokens}-token prompt joins (max_prompt_tokens):")
    print_table(stalls, arrivals=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
