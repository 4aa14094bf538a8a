"""``make gpu-engine-check``: the engine's memory and scheduling checks on a GPU, in one prepared run.

Offline, in-process (no tritonserver): what a CUDA PyTorch image has is enough (torch, transformers,
safetensors, pydantic). Five checks, each written to ``--out`` as JSON:

1. **sliding window**: a small Mistral-style model (window shorter than the sequences) on the device in
   float32; rows join a running batch mid-generation and are prefilled in chunks; their logits are compared
   with the model's own full forward pass.
2. **KV budget**: a Llama-3-8B-shaped random bf16 model with a KV cache too small for all requests at
   once: every request must wait for blocks and then succeed; peak device memory is reported against the
   weights plus the configured cache.
3. **throughput** at batch 32 (prompt 128, 128 new tokens, end-of-sequence ignored) on the same model:
   the base model and 16 synthetic rank-16 all-linear LoRA adapters; tokens/s, time per decoding step,
   the ratio, peak memory.
4. **KV reads** at batch 32 with 1,024-token prompts on the same model: decoding steps that gather
   every row's keys and values per layer against steps that read the KV blocks in place (the paged
   attention kernel), CUDA graphs off in both: time per step of each, the speed-up, and whether their
   logits agree.
5. **decode graphs**: the same, eager decoding steps against steps replayed from CUDA graphs, at batch 1
   on the base model, batch 1 with a LoRA, and batch 32 over the 16 LoRA adapters.

``--tiny`` shrinks every model so the script runs on a CPU in a minute (how it is tested here).
"""

from __future__ import annotations

import argparse
import gc
import json
import tempfile
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

import torch
from safetensors.torch import save_file
from transformers import LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM, PreTrainedTokenizerFast

from peftserve.batched_layers import AdapterLinear
from peftserve.config import ServeConfig
from peftserve.engine import Engine
from peftserve.errors import ConfigError
from peftserve.generation import GenerationRow
from peftserve.requests import Completion, CompletionRequest

LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def word_tokenizer(directory: Path, vocab_size: int) -> PreTrainedTokenizerFast:
    """One token per word ``w<i>``: prompts of an exact length without a trained tokenizer."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    tokenizer = Tokenizer(models.WordLevel(vocab={f"w{i}": i for i in range(vocab_size)}, unk_token="w0"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="w0", eos_token="w1", pad_token="w2")
    fast.save_pretrained(directory)
    return fast


def llama_shape(tiny: bool) -> LlamaConfig:
    if tiny:
        return LlamaConfig(
            vocab_size=1000, hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=1024,
        )  # fmt: skip
    return LlamaConfig(
        vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
        num_key_value_heads=8, max_position_embeddings=8192, rope_theta=500000.0,
    )  # fmt: skip


def write_lora(directory: Path, config: LlamaConfig, *, rank: int, seed: int) -> None:
    """A rank-``rank`` all-linear LoRA adapter with random non-zero factors, as PEFT saves one."""
    generator = torch.Generator().manual_seed(seed)
    head_dim = config.hidden_size // config.num_attention_heads
    shapes = {
        "self_attn.q_proj": (config.hidden_size, config.hidden_size),
        "self_attn.k_proj": (config.hidden_size, config.num_key_value_heads * head_dim),
        "self_attn.v_proj": (config.hidden_size, config.num_key_value_heads * head_dim),
        "self_attn.o_proj": (config.hidden_size, config.hidden_size),
        "mlp.gate_proj": (config.hidden_size, config.intermediate_size),
        "mlp.up_proj": (config.hidden_size, config.intermediate_size),
        "mlp.down_proj": (config.intermediate_size, config.hidden_size),
    }
    tensors = {}
    for layer in range(config.num_hidden_layers):
        for module, (fan_in, fan_out) in shapes.items():
            key = f"base_model.model.model.layers.{layer}.{module}"
            tensors[f"{key}.lora_A.weight"] = torch.randn(rank, fan_in, generator=generator) / fan_in**0.5
            tensors[f"{key}.lora_B.weight"] = torch.randn(fan_out, rank, generator=generator) * 0.01
    directory.mkdir(parents=True)
    save_file(
        {k: v.to(torch.bfloat16).contiguous() for k, v in tensors.items()}, directory / "adapter_model.safetensors"
    )
    settings = {"peft_type": "LORA", "r": rank, "lora_alpha": 2 * rank, "target_modules": LORA_TARGETS}
    (directory / "adapter_config.json").write_text(json.dumps(settings))


def check_sliding_window(device: str, root: Path) -> dict:
    torch.manual_seed(0)
    config = MistralConfig(
        vocab_size=1000, hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, sliding_window=8, max_position_embeddings=1024,
    )  # fmt: skip
    directory = root / "mistral"
    MistralForCausalLM(config).save_pretrained(directory)
    word_tokenizer(directory, config.vocab_size)
    (directory / "adapters").mkdir()
    settings = ServeConfig(
        base_model=str(directory), adapter_repository=str(directory / "adapters"), prefill_chunk_tokens=5
    )
    engine = Engine(settings, device=device)
    reference = MistralForCausalLM.from_pretrained(directory).to(device).eval()
    rows = [
        GenerationRow([3 + (7 * i + j) % 900 for j in range(12 + 5 * i)], None, 20, ignore_eos=True, keep_logits=True)
        for i in range(4)
    ]
    results = engine.batcher.run_rows(rows)
    worst = 0.0
    for row, result in zip(rows, results, strict=True):
        ids = torch.tensor([row.prompt_ids + result.token_ids], device=device)
        with torch.no_grad():
            logits = reference(input_ids=ids).logits[0, len(row.prompt_ids) - 1 : -1].float()
        worst = max(worst, float((torch.stack(result.step_logits) - logits).abs().max()))
    engine.batcher.close()
    return {"window": 8, "sequence_tokens": [len(r.prompt_ids) + 20 for r in rows], "max_abs_logit_diff": worst,
            "passed": worst < 1e-3}  # fmt: skip


def big_engine(base_dir: Path, model, tokenizer, device: str, **settings) -> Engine:
    defaults = {
        "dtype": "bfloat16",
        "max_tokens_limit": 1024,
        "max_prompt_tokens": 4096,
        "max_prompt_bytes": 1 << 20,
        "max_loaded_adapters": 64,
        "max_adapter_memory_mb": 16384,
    }
    config = ServeConfig(
        base_model=str(base_dir), adapter_repository=str(base_dir / "adapters"), **{**defaults, **settings}
    )
    return Engine(config, device=device, base=(tokenizer, model))


def timed(engine: Engine, requests: list[CompletionRequest], device: str) -> tuple[float, int]:
    """Seconds to answer ``requests`` (device work included) and tokens generated; any failed request raises."""
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    started = time.perf_counter()
    results = engine.complete(requests)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    failed = [r for r in results if not isinstance(r, Completion)]
    if failed:
        raise RuntimeError(f"{len(failed)} of {len(requests)} requests failed: {failed[0]}")
    return time.perf_counter() - started, sum(r.output_tokens for r in results)


def prompt(length: int, seed: int) -> str:
    return " ".join(f"w{3 + (seed * 7919 + i * 104729) % 100000}" for i in range(length))


def check_kv_budget(base_dir: Path, model, tokenizer, device: str) -> dict:
    """Requests that cannot all fit at once wait for blocks, then all succeed."""
    config = model.config
    per_token = (
        2
        * config.num_hidden_layers
        * config.num_key_value_heads
        * (config.hidden_size // config.num_attention_heads)
        * 2
    )
    budget_mb = 4096 * per_token / 2**20  # 4,096 tokens of KV: 512 MiB for Llama-3-8B in bf16
    engine = big_engine(base_dir, model, tokenizer, device, kv_cache_memory_mb=budget_mb, max_running_rows=64)
    requests = [CompletionRequest(prompt(1024, i), "", 512, ignore_eos=True) for i in range(8)]  # ~12k tokens
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    started = time.perf_counter()
    results = engine.complete(requests)
    seconds = time.perf_counter() - started
    engine.batcher.close()
    answered = sum(isinstance(r, Completion) and r.output_tokens == 512 for r in results)
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    peak = torch.cuda.max_memory_allocated() if device.startswith("cuda") else 0
    return {
        "kv_cache_mb": round(budget_mb, 1), "requests": len(requests), "answered_in_full": answered,
        "seconds": round(seconds, 2), "weights_gib": round(weights / 2**30, 2), "peak_gib": round(peak / 2**30, 2),
        "passed": answered == len(requests),
    }  # fmt: skip


def check_throughput(base_dir: Path, model, tokenizer, device: str, batch: int) -> dict:
    for index in range(16):
        write_lora(base_dir / "adapters" / f"lora{index}" / "1", model.config, rank=16, seed=index)
    engine = big_engine(base_dir, model, tokenizer, device, max_running_rows=batch, prefill_chunk_tokens=4096)
    runs = {}
    for name, adapters in (("base", [""]), ("16 LoRA r16 all-linear", [f"lora{i}" for i in range(16)])):
        requests = [
            CompletionRequest(prompt(128, i), adapters[i % len(adapters)], 128, ignore_eos=True) for i in range(batch)
        ]
        engine.complete(requests[:2])  # warm-up: adapters loaded, kernels chosen
        seconds, tokens = timed(engine, requests, device)
        runs[name] = {"tokens_per_second": round(tokens / seconds, 1), "ms_per_step": round(1000 * seconds / 128, 2)}
    engine.batcher.close()
    runs["ratio_lora_to_base"] = round(
        runs["16 LoRA r16 all-linear"]["tokens_per_second"] / runs["base"]["tokens_per_second"], 3
    )
    if device.startswith("cuda"):
        runs["peak_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    return runs


def timed_decode(
    engine: Engine, make: Callable[[int], list[CompletionRequest]], new: int, device: str
) -> tuple[float, float, int, float]:
    """``make(n)``: the batch with ``n`` new tokens each. After a warm-up (adapters loaded, kernels chosen; the
    device's peak memory counted from there), the batch with one new token, then with ``new``: (prefill
    seconds, whole-run seconds, tokens, decoding ms per step with the prefill taken out). The prefill is the
    fastest of three one-token runs: one run that a hiccup slowed was once longer than the whole run on a busy
    CPU (a negative step time in CI)."""
    timed(engine, make(2), device)
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    prefill_seconds = min(timed(engine, make(1), device)[0] for _ in range(3))
    seconds, tokens = timed(engine, make(new), device)
    return prefill_seconds, seconds, tokens, 1000 * (seconds - prefill_seconds) / (new - 1)


def unwrap_layers(model: torch.nn.Module) -> None:
    """Put back the base layers an earlier engine wrapped for its adapters, so that another engine can take
    the model (it reads which layers are linear from the model as it finds it)."""
    for name, module in list(model.named_modules()):
        if isinstance(module, AdapterLinear):
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, module.base)


def compare_modes(
    base_dir: Path,
    model,
    tokenizer,
    device: str,
    setting: str,
    modes: tuple[str, str],
    *,
    batch: int,
    context: int,
    adapters: tuple[str, ...] = ("",),
    **fixed,
) -> dict:
    """Decoding steps of one engine per value of ``setting`` (``modes``: the reference, then the one timed
    against it), one engine after the other, rows spread over ``adapters``: step times, the speed-up of the
    second, whether tokens and logits agree. A mode the device cannot run is reported unavailable."""
    result: dict = {"batch": batch, "prompt_tokens": context, "adapters": len(adapters)}
    steps, logits, tokens = {}, {}, {}
    for mode in modes:
        unwrap_layers(model)
        try:
            engine = big_engine(base_dir, model, tokenizer, device, max_running_rows=batch, prefill_chunk_tokens=4096,
                                **{setting: mode, **fixed})  # fmt: skip
        except ConfigError as exc:  # no CUDA or no triton: the kernels cannot run here
            result[mode] = {"unavailable": str(exc)}
            continue
        make = lambda new: [  # noqa: E731
            CompletionRequest(prompt(context, i), adapters[i % len(adapters)], new, ignore_eos=True)
            for i in range(batch)
        ]
        _, seconds, generated, steps[mode] = timed_decode(engine, make, 33, device)
        result[mode] = {"decode_ms_per_step": round(steps[mode], 3), "tokens_per_second": round(generated / seconds, 1)}
        rows, leased = [], []
        for i in range(min(batch, 4)):
            adapter = adapters[i % len(adapters)]
            row = engine.check_request(CompletionRequest(prompt(context, i), adapter, 8, ignore_eos=True))
            row.keep_logits = True
            leased.append(engine.lease(row, adapter))  # the version's adapter attached to the row
            rows.append(row)
        answers = engine.batcher.run_rows(rows)
        for version in filter(None, leased):
            engine.cache.release(version)
        logits[mode] = torch.stack([torch.stack(a.step_logits) for a in answers]).float()
        tokens[mode] = [a.token_ids for a in answers]
        engine.batcher.close()
        del engine
        gc.collect()
        if device.startswith("cuda"):
            torch.cuda.empty_cache()
    if len(steps) == 2:
        reference, other = modes
        result[f"speedup_{other}"] = round(steps[reference] / steps[other], 3)
        result["tokens_equal"] = tokens[reference] == tokens[other]
        result["max_abs_logit_diff"] = round(float((logits[reference] - logits[other]).abs().max()), 5)
    return result


def build_parser() -> argparse.ArgumentParser:
    """The command line of ``python -m tools.gpu_engine_check`` (also read by tests/unit/test_docs.py)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--tiny", action="store_true", help="small models: a CPU smoke run of this script")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--out", type=Path, default=Path("gpu-engine-check.json"))
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    report: dict = {"device": torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu",
                    "torch": torch.__version__, "date": time.strftime("%Y-%m-%d")}  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        report["sliding_window"] = check_sliding_window(args.device, root)
        print(json.dumps(report["sliding_window"]), flush=True)
        base_dir = root / "llama"
        tokenizer = word_tokenizer(base_dir, 1000 if args.tiny else 128256)
        (base_dir / "adapters").mkdir()
        torch.manual_seed(0)
        with torch.device(args.device):
            model = LlamaForCausalLM(llama_shape(args.tiny)).to(torch.bfloat16).eval()
        report["kv_budget"] = check_kv_budget(base_dir, model, tokenizer, args.device)
        print(json.dumps(report["kv_budget"]), flush=True)
        report["throughput"] = check_throughput(base_dir, model, tokenizer, args.device, args.batch)
        print(json.dumps(report["throughput"]), flush=True)
        context = 64 if args.tiny else 1024
        compare = partial(compare_modes, base_dir, model, tokenizer, args.device, context=context)
        # In-place reads against gathered ones, without graphs (which need in-place reads) on either side.
        report["kv_reads"] = compare("kv_reads", ("gathered", "in_place"), batch=args.batch, decode_graphs="off")
        print(json.dumps(report["kv_reads"]), flush=True)
        loras = tuple(f"lora{i}" for i in range(16))  # written by check_throughput
        report["decode_graphs"] = [
            compare("decode_graphs", ("off", "on"), batch=batch, adapters=adapters)
            for batch, adapters in ((1, ("",)), (1, loras[:1]), (args.batch, loras))
        ]
        for entry in report["decode_graphs"]:
            print(json.dumps(entry), flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    print(f"report: {args.out}")
    return 0 if report["sliding_window"]["passed"] and report["kv_budget"]["passed"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
