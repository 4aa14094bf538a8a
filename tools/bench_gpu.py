"""``make bench-gpu``: decode throughput of a Llama-3-8B-shaped model with many adapters on one GPU, offline.

In-process (no tritonserver, no network): what a CUDA PyTorch image has is enough. A random bf16 model
(built by :mod:`tools.gpu_engine_check`), 64 synthetic rank-16 all-linear LoRA adapters and one adapter of
each of 8 types built with PEFT (:mod:`tools.bench_engine`). For every run (base model, 16 LoRA, 64 LoRA,
8 mixed types) and batch size (1, 8, 32, 64), each row a 128-token prompt and 128 new tokens with
end-of-sequence ignored, it measures tokens/s, the decode step time (prefill measured apart and taken out),
the memory-bandwidth floor of a step (weights, adapters in the batch and the KV cache read once, divided by
the device's peak bandwidth) and the fraction of it reached, peak device memory; then the ratios to the base
model and, per adapter type, greedy tokens and logits of one mixed batch against each row alone.
Writes JSON to ``--out`` and a PNG plot of tokens/s by batch size next to it. ``--tiny``: a CPU smoke run.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch
from safetensors import safe_open
from tqdm import tqdm
from transformers import LlamaForCausalLM

from peftserve.engine import Engine
from peftserve.requests import CompletionRequest
from tools.bench_engine import MIXED_TYPES, save_random_adapter
from tools.gpu_engine_check import big_engine, llama_shape, prompt, timed_decode, word_tokenizer, write_lora

MIXED_NAMES = ["lora", "dora", "adalora", "loha", "lokr", "ia3", "prefix", "prompt_tuning"]  # MIXED_TYPES' order
# Peak memory bandwidth in GB/s by a part of the device name; the first match wins (more specific first).
BANDWIDTH_GBS = [
    ("H200", 4800.0),
    ("H100 NVL", 3900.0),
    ("H100 PCIe", 2000.0),
    ("H100", 3350.0),
    ("A100-SXM4-80GB", 2039.0),
    ("A100 80GB", 1935.0),
    ("A100", 1555.0),
    ("L40S", 864.0),
    ("A10G", 600.0),
]


def peak_bandwidth_gbs(device_name: str) -> float | None:
    return next((gbs for part, gbs in BANDWIDTH_GBS if part in device_name), None)


def build_adapters(base_dir: Path, model: LlamaForCausalLM, lora_count: int) -> tuple[list[str], list[str]]:
    """``lora_count`` rank-16 all-linear LoRA adapters and one adapter of every mixed type, in ``adapters/``."""
    adapters = base_dir / "adapters"
    loras = [f"lora{i}" for i in range(lora_count)]
    for index, name in enumerate(tqdm(loras, desc="LoRA adapters", unit="adapter")):
        write_lora(adapters / name / "1", model.config, rank=16, seed=index)
    mixed = [f"mixed-{name}" for name in MIXED_NAMES]
    for name, make in zip(tqdm(mixed, desc="mixed adapters (PEFT)", unit="adapter"), MIXED_TYPES, strict=True):
        save_random_adapter(model, make(), adapters / name / "1")
    model.eval()
    return loras, mixed


def adapter_bytes(directory: Path) -> int:
    """Bytes of an adapter's tensors in bf16, as the engine holds them."""
    with safe_open(directory / "adapter_model.safetensors", framework="pt") as tensors:
        return sum(2 * torch.Size(tensors.get_slice(k).get_shape()).numel() for k in tensors.keys())  # noqa: SIM118 (not iterable)


def measure(engine: Engine, adapters: list[str], batch: int, shape: dict, floor_bytes: dict) -> dict:
    """One batch of ``batch`` rows (adapters taken in turn): throughput, decode step and its bandwidth floor."""
    device, new = shape["device"], shape["new_tokens"]
    names = [adapters[i % len(adapters)] for i in range(batch)]
    make = lambda tokens: [  # noqa: E731
        CompletionRequest(prompt(shape["prompt_tokens"], i), name, tokens, ignore_eos=True)
        for i, name in enumerate(names)
    ]
    prefill_seconds, seconds, tokens, step_ms = timed_decode(engine, make, new, device)
    kv_tokens = batch * (shape["prompt_tokens"] + new / 2)  # average context while decoding
    read = floor_bytes["weights"] + sum(floor_bytes[n] for n in set(names)) + kv_tokens * floor_bytes["kv_token"]
    floor_ms = 1000 * read / (shape["bandwidth_gbs"] * 1e9) if shape["bandwidth_gbs"] else None
    return {
        "distinct_adapters": len(set(names) - {""}), "tokens_per_second": round(tokens / seconds, 1),
        "decode_ms_per_step": round(step_ms, 3), "prefill_ms": round(1000 * prefill_seconds, 2),
        "bytes_read_per_step": int(read), "floor_ms_per_step": None if floor_ms is None else round(floor_ms, 3),
        "fraction_of_floor": None if floor_ms is None else round(floor_ms / step_ms, 3),
        "peak_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2) if device.startswith("cuda") else None,
    }  # fmt: skip


def check_exactness(engine: Engine, mixed: list[str], shape: dict, tolerance: float) -> dict:
    """Greedy tokens and logits of every mixed type: all in one batch (with a base row) vs each row alone.
    Logits are compared up to the first step whose tokens differ (later steps read different inputs);
    ``adapter_effect`` (first step's max |logit diff| against the base model) shows the adapter matters."""
    new = min(32, shape["new_tokens"])

    def run(rows_of: list[tuple[int, str]], tokens: int = new) -> list:
        rows, versions = [], []
        for seed, name in rows_of:
            request = CompletionRequest(prompt(shape["prompt_tokens"], seed), "", tokens, ignore_eos=True)
            row = engine.check_request(request)
            row.keep_logits = True
            versions.append(engine.lease(row, name))
            rows.append(row)
        try:
            return engine.batcher.run_rows(rows)
        finally:
            for version in versions:
                if version is not None:
                    engine.cache.release(version)

    entries = list(enumerate([*mixed, ""]))
    together = run(entries)
    types = {}
    for (seed, name), batched in tqdm(list(zip(entries, together, strict=True)), desc="solo runs", unit="row"):
        (solo,) = run([(seed, name)])
        (base,) = run([(seed, "")], tokens=1)
        pairs = enumerate(zip(batched.token_ids, solo.token_ids, strict=True))  # ignore_eos: both have `new`
        equal = next((i for i, (a, b) in pairs if a != b), None)
        steps = new if equal is None else equal + 1
        compared = zip(batched.step_logits[:steps], solo.step_logits[:steps], strict=True)
        diff = max(float((a.float() - b.float()).abs().max()) for a, b in compared)
        types[name.removeprefix("mixed-") or "base"] = {
            "tokens_equal": equal is None, "first_differing_step": equal, "max_abs_logit_diff": round(diff, 5),
            "adapter_effect": round(float((solo.step_logits[0].float() - base.step_logits[0].float()).abs().max()), 5),
            "passed": equal is None or diff <= tolerance,
        }  # fmt: skip
    return {"new_tokens": new, "batch": len(entries), "tolerance": tolerance, "types": types}


def plot(report: dict, path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        from matplotlib import pyplot
    except ImportError:
        print("matplotlib missing: no plot")
        return
    figure, axes = pyplot.subplots(figsize=(7, 4.5))
    for name, batches in report["runs"].items():
        sizes = [int(b) for b in batches]
        axes.plot(sizes, [batches[str(b)]["tokens_per_second"] for b in sizes], marker="o", label=name)
    axes.set_xscale("log", base=2)
    axes.set(xlabel="batch size", ylabel="tokens/s", title=f"{report['device']}, {report['shape']['model']}")
    axes.legend()
    figure.savefig(path, dpi=120, bbox_inches="tight")
    print(f"plot: {path}")


def print_report(report: dict) -> None:
    print(f"\n{report['device']}, {report['shape']}")
    print(f"{'run':<26}{'batch':>6}{'tok/s':>10}{'step ms':>9}{'floor ms':>9}{'of floor':>9}{'peak GiB':>9}")
    for name, batches in report["runs"].items():
        for batch, r in batches.items():
            floor = "-" if r["floor_ms_per_step"] is None else f"{r['floor_ms_per_step']:.2f}"
            fraction = "-" if r["fraction_of_floor"] is None else f"{r['fraction_of_floor']:.2f}"
            peak = "-" if r["peak_gib"] is None else f"{r['peak_gib']:.1f}"
            print(f"{name:<26}{batch:>6}{r['tokens_per_second']:>10.1f}{r['decode_ms_per_step']:>9.2f}"
                  f"{floor:>9}{fraction:>9}{peak:>9}")  # fmt: skip
    for name, ratios in report["ratios"].items():
        print(f"{name}: " + ", ".join(f"batch {b} {r:.3f}" for b, r in ratios.items()))
    exact = report["exactness"]
    print(
        f"mixed batch of {exact['batch']} vs solo, greedy, {exact['new_tokens']} tokens, "
        f"tolerance {exact['tolerance']}:"
    )
    for name, r in exact["types"].items():
        print(f"  {name:<14} tokens equal {r['tokens_equal']!s:<6} max |logit diff| {r['max_abs_logit_diff']:.5f}"
              f"  effect {r['adapter_effect']:.4f}  {'ok' if r['passed'] else 'FAILED'}")  # fmt: skip


def build_parser() -> argparse.ArgumentParser:
    """The command line of ``python -m tools.bench_gpu`` (also read by tests/unit/test_docs.py)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--tiny", action="store_true", help="small model and few tokens: a CPU smoke run")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32, 64])
    parser.add_argument("--bandwidth-gbs", type=float, help="peak memory bandwidth (default: by device name)")
    parser.add_argument("--logit-tolerance", type=float, default=0.25, help="bf16 max |logit diff| when tokens differ")
    parser.add_argument(
        "--adapter-compute",
        choices=["auto", "per_row", "slot_tables"],
        default="auto",
        help="the engine's adapter_compute setting (auto: slot tables and triton kernels on CUDA)",
    )
    parser.add_argument(
        "--kv-reads",
        choices=["auto", "gathered", "in_place"],
        default="auto",
        help="the engine's kv_reads setting (auto: the KV blocks read in place on CUDA)",
    )
    parser.add_argument(
        "--decode-graphs",
        choices=["auto", "off", "on"],
        default="auto",
        help="the engine's decode_graphs setting (auto: decoding steps replay CUDA graphs on CUDA)",
    )
    parser.add_argument("--out", type=Path, default=Path("loadtests/reports/bench-gpu.json"))
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    name = torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu"
    config = llama_shape(args.tiny)
    shape = {
        "model": "tiny Llama" if args.tiny else "Llama-3-8B-shaped, random, bf16", "device": args.device,
        "prompt_tokens": 16 if args.tiny else 128, "new_tokens": 16 if args.tiny else 128,
        "bandwidth_gbs": args.bandwidth_gbs or peak_bandwidth_gbs(name), "adapter_compute": args.adapter_compute,
    }  # fmt: skip
    report: dict = {"device": name, "torch": torch.__version__, "date": time.strftime("%Y-%m-%d"), "shape": shape}
    with tempfile.TemporaryDirectory() as tmp:
        base_dir = Path(tmp) / "llama"
        tokenizer = word_tokenizer(base_dir, config.vocab_size)
        torch.manual_seed(0)
        with torch.device(args.device):
            model = LlamaForCausalLM(config).to(torch.bfloat16).eval()
        loras, mixed = build_adapters(base_dir, model, 64)
        head_dim = config.hidden_size // config.num_attention_heads
        floor_bytes = {name: adapter_bytes(base_dir / "adapters" / name / "1") for name in loras + mixed}
        floor_bytes[""] = 0
        floor_bytes["kv_token"] = 2 * config.num_hidden_layers * config.num_key_value_heads * head_dim * 2
        # every weight is read once per step except the embedding table, of which only the batch's rows are
        floor_bytes["weights"] = sum(
            p.numel() * p.element_size() for n, p in model.named_parameters() if "embed_tokens" not in n
        )
        engine = big_engine(base_dir, model, tokenizer, args.device, max_running_rows=max(args.batches),
                            prefill_chunk_tokens=4096, max_loaded_adapters=len(loras) + len(mixed),
                            adapter_compute=args.adapter_compute, kv_reads=args.kv_reads,
                            decode_graphs=args.decode_graphs)  # fmt: skip
        shape["kv_reads"] = "in_place" if engine.kv_cache.reads_in_place else "gathered"
        shape["decode_graphs"] = "on" if engine.runner.graphs is not None else "off"
        runs = {"base": [""], "16 LoRA r16 all-linear": loras[:16], "64 LoRA r16 all-linear": loras,
                "8 mixed types": mixed}  # fmt: skip
        report["runs"] = {name: {} for name in runs}
        progress = tqdm([(n, b) for n in runs for b in args.batches], desc="throughput", unit="run")
        for run_name, batch in progress:
            progress.set_postfix_str(f"{run_name}, batch {batch}")
            report["runs"][run_name][str(batch)] = measure(engine, runs[run_name], batch, shape, floor_bytes)
        report["ratios"] = {
            f"{run_name} / base": {
                str(b): round(r[str(b)]["tokens_per_second"] / report["runs"]["base"][str(b)]["tokens_per_second"], 3)
                for b in args.batches
            }
            for run_name, r in report["runs"].items()
            if run_name != "base"
        }
        report["exactness"] = check_exactness(engine, mixed, shape, args.logit_tolerance)
        engine.batcher.close()
        if args.device.startswith("cuda"):  # the largest of every run's peak and the exactness check's
            peaks = [r["peak_gib"] for batches in report["runs"].values() for r in batches.values()]
            report["peak_gib"] = max(*peaks, round(torch.cuda.max_memory_allocated() / 2**30, 2))
    print_report(report)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    print(f"report: {args.out}")
    plot(report, args.out.with_suffix(".png"))
    return 0 if all(r["passed"] for r in report["exactness"]["types"].values()) else 1


if __name__ == "__main__":
    raise SystemExit(main())
