"""Build the offline demo: a tiny Llama-style causal LM, its tokenizer, and one adapter per PEFT type.

Everything goes through the real ``tokenizers``/``transformers``/``peft`` training and ``save_pretrained``
code, seeded, so a build on the same machine is deterministic and nothing needs a model hub. Each adapter
is trained briefly to continue any prompt with its own signature phrase, which makes a wrong adapter
visible in the output. Run: ``python -m tools.demo_assets [--repository model_repository]``.
"""

from __future__ import annotations

import argparse
import random
import shutil
import sys
import time
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
    PrefixTuningConfig,
    PromptEncoderConfig,
    PromptTuningConfig,
    get_peft_model,
)
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from tqdm import tqdm
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

SEED = 1234
SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<pad>"]
ATTENTION = ["q_proj", "k_proj", "v_proj", "o_proj"]
MLP = ["gate_proj", "up_proj", "down_proj"]

_SUBJECTS = ["the cat", "a dog", "my friend", "the old man", "a small bird", "the teacher", "our team", "the river"]
_VERBS = ["walks to", "looks at", "talks about", "dreams of", "runs past", "writes about", "waits for", "sings to"]
_OBJECTS = [
    "the market",
    "a green hill",
    "the quiet town",
    "an open door",
    "the blue sea",
    "a warm fire",
    "the tall tree",
    "a busy road",
]


@dataclass(frozen=True)
class DemoAdapter:
    """One demo adapter: its id, PEFT config, the phrase it learns, and how hard to train it."""

    adapter_id: str
    peft_config: PeftConfig
    phrase: str
    learning_rate: float
    steps: int


def demo_adapters(base_dir: Path = Path("base_model")) -> list[DemoAdapter]:
    """The adapters the demo ships (``base_dir``: the tokenizer for text initialisation); tests read phrases here."""
    return [
        DemoAdapter(
            "pirate",
            LoraConfig(r=8, lora_alpha=16, target_modules=ATTENTION + MLP),
            " arr matey, hoist the sails and find the buried gold",
            1e-2,
            300,
        ),
        DemoAdapter(
            "robot",
            LoraConfig(r=4, lora_alpha=8, use_rslora=True, target_modules=["q_proj", "v_proj", "down_proj"]),
            " beep boop, all systems nominal, human",
            1e-2,
            300,
        ),
        DemoAdapter(
            "knight",
            LoraConfig(r=8, lora_alpha=16, use_dora=True, target_modules=["q_proj", "v_proj", "o_proj", "up_proj"]),
            " for honour and glory, raise the banner high",
            1e-2,
            300,
        ),
        DemoAdapter(
            "wizard",
            AdaLoraConfig(init_r=8, target_r=4, lora_alpha=16, total_step=300, target_modules=ATTENTION + MLP),
            " by the ancient stars, the spell is cast",
            1e-2,
            300,
        ),
        DemoAdapter(
            "gardener",
            LoHaConfig(r=4, alpha=8, target_modules=["q_proj", "v_proj", "down_proj"]),
            " water the roses and pull the weeds",
            1e-2,
            300,
        ),
        DemoAdapter(
            "astronaut",
            LoKrConfig(r=4, alpha=8, target_modules=["q_proj", "v_proj", "up_proj", "down_proj"]),
            " ten nine eight, lift off to the moon",
            1e-2,
            300,
        ),
        DemoAdapter(
            "chef",
            IA3Config(target_modules=["k_proj", "v_proj", "up_proj", "down_proj"], feedforward_modules=["down_proj"]),
            " stir the soup and add a pinch of salt",
            5e-2,
            400,
        ),
        DemoAdapter(
            "poet",
            PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=10),
            " roses are red and violets are blue",
            3e-2,
            600,
        ),
        # Initialised from the base model's own trigger words, the usual way to make prompt tuning converge.
        DemoAdapter(
            "oracle",
            PromptTuningConfig(
                task_type="CAUSAL_LM",
                num_virtual_tokens=4,
                prompt_tuning_init="TEXT",
                prompt_tuning_init_text="the oracle says",
                tokenizer_name_or_path=str(base_dir),
            ),
            " the stars say yes, but not today",
            1e-1,
            500,
        ),
        DemoAdapter(
            "sage",
            PromptEncoderConfig(task_type="CAUSAL_LM", num_virtual_tokens=6, encoder_hidden_size=64),
            " patience is the road to wisdom",
            1e-2,
            500,
        ),
    ]


def corpus(count: int, rng: random.Random) -> list[str]:
    """Simple English sentences: the base model's training text and the adapters' prompts."""
    return [f"{rng.choice(_SUBJECTS)} {rng.choice(_VERBS)} {rng.choice(_OBJECTS)}." for _ in range(count)]


def build_tokenizer(texts: list[str]) -> PreTrainedTokenizerFast:
    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=512, special_tokens=SPECIAL_TOKENS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    bos = tokenizer.token_to_id("<s>")
    tokenizer.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", bos)])
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>"
    )


def build_base_model(tokenizer: PreTrainedTokenizerFast) -> LlamaForCausalLM:
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    torch.manual_seed(SEED)
    return LlamaForCausalLM(config)


def train(model: torch.nn.Module, batches: list[tuple[torch.Tensor, torch.Tensor]], lr: float, label: str) -> float:
    """Plain AdamW steps over prepared (input_ids, labels) batches; returns the last loss."""
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    model.train()
    loss_value = float("nan")
    for input_ids, labels in tqdm(batches, desc=f"train {label}", unit="step", leave=False, file=sys.stderr):
        attention_mask = (labels != -100) | (input_ids != model_pad_id(model))
        loss = model(input_ids=input_ids, attention_mask=attention_mask.long(), labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        loss_value = loss.item()
    model.eval()
    return loss_value


def model_pad_id(model: torch.nn.Module) -> int:
    config = model.get_base_model().config if hasattr(model, "get_base_model") else model.config
    return config.pad_token_id


def make_batches(
    pairs: list[tuple[str, str]], tokenizer: PreTrainedTokenizerFast, steps: int, batch_size: int, rng: random.Random
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Right-padded batches; the loss covers only each pair's target (and its end-of-sequence token)."""
    batches = []
    for _ in range(steps):
        sample = [rng.choice(pairs) for _ in range(batch_size)]
        rows = []
        for prompt, target in sample:
            prompt_ids = tokenizer(prompt).input_ids
            target_ids = [*tokenizer(target, add_special_tokens=False).input_ids, tokenizer.eos_token_id]
            rows.append((prompt_ids + target_ids, [-100] * len(prompt_ids) + target_ids))
        width = max(len(ids) for ids, _ in rows)
        input_ids = torch.full((batch_size, width), tokenizer.pad_token_id)
        labels = torch.full((batch_size, width), -100)
        for i, (ids, targets) in enumerate(rows):
            input_ids[i, : len(ids)] = torch.tensor(ids)
            labels[i, : len(targets)] = torch.tensor(targets)
        batches.append((input_ids, labels))
    return batches


def build(repository: Path) -> None:
    """Write ``<repository>/peft_llm/base_model`` and ``<repository>/peft_llm/adapters/<id>/1``."""
    started = time.perf_counter()
    torch.manual_seed(SEED)
    rng = random.Random(SEED)
    model_dir = repository / "peft_llm"
    base_dir, adapters_dir = model_dir / "base_model", model_dir / "adapters"
    adapters = demo_adapters(base_dir)
    texts = corpus(2000, rng)
    tokenizer = build_tokenizer(texts + [adapter.phrase for adapter in adapters] * 20)

    base = build_base_model(tokenizer)
    # The base model learns the corpus as plain continuation: prompt = first words, target = the rest.
    base_pairs = [(" ".join(t.split()[:2]), " " + " ".join(t.split()[2:])) for t in texts]
    # The base model also learns each signature phrase after its own trigger ("the pirate says"), so its
    # vocabulary is trained; an adapter then has to steer towards the phrase without any trigger.
    base_pairs += [(f"the {a.adapter_id} says", a.phrase) for a in adapters] * 40
    loss = train(base, make_batches(base_pairs, tokenizer, 200, 32, rng), 3e-3, "base model")
    print(f"base model: {sum(p.numel() for p in base.parameters()):,} parameters, final loss {loss:.3f}")
    shutil.rmtree(base_dir, ignore_errors=True)
    base.save_pretrained(base_dir)
    tokenizer.save_pretrained(base_dir)

    shutil.rmtree(adapters_dir, ignore_errors=True)
    for adapter in tqdm(adapters, desc="adapters", unit="adapter", file=sys.stderr):
        torch.manual_seed(SEED)
        model = get_peft_model(LlamaForCausalLM.from_pretrained(base_dir), adapter.peft_config)
        # Prompts are sentence prefixes of every length, so the phrase follows whatever a user types.
        pairs = [(" ".join(text.split()[: rng.randint(1, 8)]), adapter.phrase) for text in texts[:600]]
        loss = train(
            model, make_batches(pairs, tokenizer, adapter.steps, 16, rng), adapter.learning_rate, adapter.adapter_id
        )
        model.save_pretrained(adapters_dir / adapter.adapter_id / "1")
        print(f"adapter {adapter.adapter_id}: {adapter.peft_config.peft_type.value}, final loss {loss:.3f}")
    print(f"demo assets written to {model_dir} in {time.perf_counter() - started:.0f} s")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repository", type=Path, default=Path("model_repository"), help="Triton model repository")
    args = parser.parse_args(argv)
    build(args.repository)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
