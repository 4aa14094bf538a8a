"""``make bench-engine``: tokens/s of the engine against the base model, PEFT's mixed batch and the naive loop.

Everything runs in one process on the same prompts: a random Llama-style model (26M parameters by
default) and random, non-zero adapters of every type built with PEFT into a temporary directory. Each row
generates exactly ``--new-tokens`` greedy tokens (end-of-sequence ignored), so all runs do the same work.
Prints a table of tokens/s and ratios; speed is never asserted in a test.
"""

from __future__ import annotations

import argparse
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from peft import (
    AdaLoraConfig,
    IA3Config,
    LoHaConfig,
    LoKrConfig,
    LoraConfig,
    PeftConfig,
    PeftModel,
    PrefixTuningConfig,
    PromptTuningConfig,
    get_peft_model,
)
from tqdm import tqdm
from transformers import LlamaConfig, LlamaForCausalLM

from peftserve.config import ServeConfig
from peftserve.continuous import DEFAULT_TORCH_THREADS, run_torch_single_threaded
from peftserve.engine import Engine
from peftserve.requests import CompletionRequest

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
MIXED_TYPES: list[Callable[[], PeftConfig]] = [
    lambda: LoraConfig(r=8, lora_alpha=16, target_modules=TARGETS, init_lora_weights=False),
    lambda: LoraConfig(r=8, lora_alpha=16, use_dora=True, target_modules=TARGETS, init_lora_weights=False),
    lambda: AdaLoraConfig(init_r=8, target_r=8, total_step=1, target_modules=TARGETS, init_lora_weights=False),
    lambda: LoHaConfig(r=4, alpha=8, target_modules=TARGETS, init_weights=False),
    lambda: LoKrConfig(r=4, alpha=8, target_modules=TARGETS, init_weights=False),
    lambda: IA3Config(target_modules=TARGETS, feedforward_modules=["down_proj"], init_ia3_weights=False),
    lambda: PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=8),
    lambda: PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=8),
]


@dataclass
class Result:
    name: str
    tokens: int
    seconds: float

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / self.seconds


def build_assets(root: Path, *, hidden: int, layers: int, lora_count: int) -> tuple[Path, list[str], list[str]]:
    """A random base model plus ``lora_count`` LoRA adapters and one adapter of every type."""
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=32000,
        hidden_size=hidden,
        intermediate_size=hidden * 11 // 4,
        num_hidden_layers=layers,
        num_attention_heads=hidden // 64,
        num_key_value_heads=hidden // 128,
        max_position_embeddings=2048,
        tie_word_embeddings=True,
    )
    base_dir = root / "base"
    LlamaForCausalLM(config).save_pretrained(base_dir)
    _write_tokenizer(base_dir)
    loras = [f"lora{i}" for i in range(lora_count)]
    specs = [(name, MIXED_TYPES[0]) for name in loras] + [(f"mixed{i}", make) for i, make in enumerate(MIXED_TYPES)]
    for name, make in tqdm(specs, desc="building adapters", unit="adapter"):
        save_random_adapter(LlamaForCausalLM.from_pretrained(base_dir), make(), root / "adapters" / name / "1")
    return base_dir, loras, [f"mixed{i}" for i in range(len(MIXED_TYPES))]


def save_random_adapter(model: LlamaForCausalLM, config: PeftConfig, directory: Path) -> None:
    """Save a PEFT adapter of ``config`` for ``model`` with random non-zero weights, leaving ``model`` as it was
    (adapter layers removed again), so one large base can give every adapter without being reloaded."""
    peft_model = get_peft_model(model, config)
    with torch.no_grad():  # prompt-learning and IA3 start near identity: make every adapter matter
        for parameter in peft_model.parameters():
            if parameter.requires_grad:
                parameter.add_(torch.randn_like(parameter) * 0.02)
    peft_model.save_pretrained(directory)
    if not config.is_prompt_learning:
        peft_model.unload()
    if hasattr(model, "peft_config"):  # left by the tuner; PEFT would warn that the model was modified twice
        del model.peft_config


def _write_tokenizer(base_dir: Path) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {f"w{i}": i for i in range(32000)}
    tokenizer = Tokenizer(models.WordLevel(vocab=vocab, unk_token="w0"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, unk_token="w0", eos_token="w1", pad_token="w2", bos_token="w3"
    ).save_pretrained(base_dir)


def prompts(count: int, length: int) -> list[str]:
    generator = torch.Generator().manual_seed(1)
    return [
        " ".join(f"w{int(t)}" for t in torch.randint(4, 32000, (length + i % 5,), generator=generator))
        for i in range(count)
    ]


def timed_together(runs: list[tuple[str, Callable[[], object]]], tokens: int, repeats: int) -> list[Result]:
    """Best of ``repeats`` for each run, interleaved round-robin so that machine noise hits all runs alike."""
    for _, run in runs:
        run()  # warm-up
    best = {name: float("inf") for name, _ in runs}
    for _ in tqdm(range(repeats), desc="timing rounds", unit="round"):
        for name, run in runs:
            started = time.perf_counter()
            run()
            best[name] = min(best[name], time.perf_counter() - started)
    return [Result(name, tokens, best[name]) for name, _ in runs]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=4)
    args = parser.parse_args(argv)
    run_torch_single_threaded()  # the engine's loop gets the cores; PEFT's runs get them in own_threads
    torch.manual_seed(0)
    texts = prompts(args.prompts, 12)
    tokens = args.prompts * args.new_tokens
    with tempfile.TemporaryDirectory() as tmp:
        base_dir, loras, mixed = build_assets(Path(tmp), hidden=args.hidden, layers=args.layers, lora_count=16)
        engine = Engine(
            ServeConfig(
                base_model=str(base_dir),
                adapter_repository=str(Path(tmp) / "adapters"),
                max_tokens_limit=args.new_tokens,
                max_loaded_adapters=64,
            )
        )
        engine.runner.eos_token_ids = set()  # every row generates exactly new_tokens

        def ours(adapter_ids: list[str]) -> Callable[[], object]:
            requests = [
                CompletionRequest(
                    text, adapter_ids[i % len(adapter_ids)] if adapter_ids else "", max_tokens=args.new_tokens
                )
                for i, text in enumerate(texts)
            ]
            return lambda: engine.complete(requests)

        runs = [("base model, batched (ceiling)", ours([]))]
        runs += [(f"engine, {n} LoRA per batch", ours(loras[:n])) for n in (1, 4, 16)]
        runs += [(f"engine, {len(mixed)} mixed types per batch", ours(mixed))]
        runs += peft_baselines(base_dir, Path(tmp) / "adapters", loras[:4], texts, args, engine)
        results = timed_together(runs, tokens, args.repeats)
    print_table(results, args)
    return 0


def peft_baselines(
    base_dir: Path, adapters: Path, loras: list[str], texts: list[str], args, engine: Engine
) -> list[tuple[str, Callable[[], object]]]:
    """PEFT's own mixed batch (``adapter_names``, LoRA only) and the naive set_adapter loop."""
    model = PeftModel.from_pretrained(
        LlamaForCausalLM.from_pretrained(base_dir), adapters / loras[0] / "1", adapter_name=loras[0]
    )
    for name in loras[1:]:
        model.load_adapter(adapters / name / "1", adapter_name=name)
    model.eval()
    tokenizer = engine.tokenizer
    tokenizer.padding_side = "left"
    batch = tokenizer(texts, return_tensors="pt", padding=True)
    names = [loras[i % len(loras)] for i in range(len(texts))]
    settings = {
        "max_new_tokens": args.new_tokens,
        "min_new_tokens": args.new_tokens,
        "do_sample": False,
        "pad_token_id": tokenizer.pad_token_id,
    }

    @torch.inference_mode()
    def mixed() -> None:
        model.generate(**batch, adapter_names=names, **settings)

    @torch.inference_mode()
    def naive() -> None:
        for text, name in zip(texts, names, strict=True):
            model.set_adapter(name)
            model.generate(**tokenizer([text], return_tensors="pt"), **settings)

    return [("PEFT adapter_names, 4 LoRA", own_threads(mixed)), ("naive set_adapter loop, 4 LoRA", own_threads(naive))]


def own_threads(run: Callable[[], None]) -> Callable[[], None]:
    """``run`` on a fresh thread with torch's default intra-op threads, as the engine's loop has them; the
    thread's OpenMP team ends with it, so it never slows the loop's own operations down afterwards."""

    def in_thread() -> None:
        def body() -> None:
            torch.set_num_threads(DEFAULT_TORCH_THREADS)
            run()

        thread = threading.Thread(target=body)
        thread.start()
        thread.join()

    return in_thread


def print_table(results: list[Result], args) -> None:
    base = results[0].tokens_per_second
    naive = results[-1].tokens_per_second
    print(
        f"\n{args.prompts} prompts x {args.new_tokens} new tokens, hidden {args.hidden}, {args.layers} layers, "
        f"{DEFAULT_TORCH_THREADS} threads, torch {torch.__version__}"
    )
    print(f"{'run':<40}{'tokens/s':>10}{'vs base':>10}{'vs naive':>10}")
    for result in results:
        rate = result.tokens_per_second
        print(f"{result.name:<40}{rate:>10.0f}{rate / base:>9.2f}x{rate / naive:>9.1f}x")


if __name__ == "__main__":
    raise SystemExit(main())
