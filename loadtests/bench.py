"""``make bench``: start tritonserver on a benchmark repository, run perf_analyzer and locust, write a report.

The repository is the demo model plus 1,000 synthetic LoRA adapters (``s0000`` ...), so traffic patterns
over 1, 8, 64 and 1,000 registered adapters can be compared with the base model alone. ``--profile long``
sweeps more concurrency levels with longer windows and runs a 10-minute sustained locust profile.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import peft
import torch
import transformers
from tqdm import tqdm

from loadtests.perf_sweep import PROMPTS, sweep, write_csv
from loadtests.report import BenchmarkFacts, build_report, read_locust_stats
from loadtests.synthetic import write_random_loras
from loadtests.traffic import TrafficPattern
from tools.triton_server import TritonServer, free_port

PROFILES = {
    "short": {"levels": [1, 4, 16], "measurement_ms": 3000, "locust_seconds": 15},
    "long": {"levels": [1, 2, 4, 8, 16, 32], "measurement_ms": 10000, "locust_seconds": 600},
}
MAX_TOKENS = 16
LOADTESTS = Path(__file__).resolve().parent


def build_repository(source: Path, target: Path, adapter_count: int) -> list[str]:
    """Copy the demo models (config, code, base model, demo adapters) and add synthetic adapters."""
    for model in ("peft_llm", "peft_llm_stream"):
        shutil.copytree(source / model, target / model, ignore=shutil.ignore_patterns("__pycache__"))
    model_dir = target / "peft_llm"
    return write_random_loras(model_dir / "base_model", model_dir / "adapters", adapter_count, prefix="s")


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


def memory_facts(server: TritonServer) -> dict[str, str]:
    with urllib.request.urlopen(f"http://127.0.0.1:{server.metrics_port}/metrics", timeout=10) as response:
        page = response.read().decode()
    facts = {}
    for line in page.splitlines():
        for name in ("peftserve_adapters_loaded", "peftserve_adapter_memory_bytes"):
            if line.startswith(name + "{"):
                facts[name] = line.rsplit(" ", 1)[1]
    facts["server resident memory (tritonserver + both model stubs)"] = (
        f"{_group_rss(server.process.pid) / 2**20:.0f} MiB"
    )
    return facts


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


def settings(profile: str, adapter_count: int) -> dict[str, str]:
    return {
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, {platform.platform()}",
        "versions": f"tritonserver 2.51 (nvidia-pytriton), torch {torch.__version__}, "
        f"transformers {transformers.__version__}, peft {peft.__version__}",
        "model": "demo Llama-style model (0.7M parameters), float32 on CPU",
        "adapters registered": f"{adapter_count} synthetic rank-2 LoRA + 10 demo adapters",
        "requests": f"{len(PROMPTS)} prompts, greedy, exactly {MAX_TOKENS} new tokens each (ignore_eos)",
        "profile": f"{profile}: {PROFILES[profile]}",
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--profile", choices=sorted(PROFILES), default="short")
    parser.add_argument("--repository", type=Path, default=Path("model_repository"))
    parser.add_argument("--adapters", type=int, default=1000, help="synthetic adapters to register")
    parser.add_argument("--out", type=Path, default=Path("loadtests/reports/latest"))
    args = parser.parse_args(argv)
    profile = PROFILES[args.profile]
    args.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        synthetic = build_repository(args.repository, root / "repository", args.adapters)
        patterns = [
            TrafficPattern("base"),
            TrafficPattern("single", tuple(synthetic[:1])),
            TrafficPattern("uniform", tuple(synthetic[:8])),
            TrafficPattern("zipf", tuple(synthetic[:64])),
            TrafficPattern("distinct", tuple(synthetic)),
        ]
        server = TritonServer(
            root / "repository",
            http_port=free_port(),
            grpc_port=free_port(),
            metrics_port=free_port(),
            log_path=root / "server.log",
            address="127.0.0.1",
        )
        print(f"starting tritonserver with {len(synthetic) + 10} adapters ...")
        with server:
            points = sweep(
                server.http_url,
                patterns,
                profile["levels"],
                root,
                max_tokens=MAX_TOKENS,
                ignore_eos=True,
                measurement_ms=profile["measurement_ms"],
            )
            write_csv(points, args.out / "perf_sweep.csv")
            print(f"locust: {profile['locust_seconds']} s, 8 users, uniform over 8 adapters ...")
            locust_csv = run_locust(
                server, synthetic[:8], profile["locust_seconds"], args.out, sustained=args.profile == "long"
            )
            memory = memory_facts(server)
        model_dir = root / "repository" / "peft_llm"
        for _ in tqdm(range(1), desc="naive baseline", unit="run"):
            naive = naive_tokens_per_second(model_dir / "base_model", model_dir / "adapters", synthetic[:8])
    facts = BenchmarkFacts(
        settings=settings(args.profile, args.adapters),
        headline_pattern="uniform-8",
        headline_level=16,
        naive_tokens_per_second=naive,
        memory=memory,
    )
    rows = read_locust_stats(locust_csv) if locust_csv.exists() else []
    report = build_report(points, rows, facts, args.out)
    print(f"report: {report}")
    print(report.read_text().split("\n## Run")[0])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
