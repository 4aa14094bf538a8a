"""``python -m tools.support_matrix``: which model families serve which adapter types, measured against PEFT.

For every family in :data:`peftserve.architectures.TESTED_FAMILIES` a tiny randomly initialised model is
built with transformers' own class; for each of the ten adapter types PEFT itself makes an adapter on it
(random, clearly non-zero weights), saves it (safetensors) and the engine loads it through its normal path.
A cell is

- ``exact``: the engine's logits equal ``PeftModel``'s, over the prompt and over greedy steps decoded
  through the engine's KV cache;
- ``refused``: the engine refuses the adapter with a clear ``AdapterLoadError`` (the note gives its message);
- ``peft-cannot``: PEFT itself cannot make this adapter on this family (the note gives PEFT's message).

Anything else is a failure: ``mismatch`` (logits differ) or ``error`` (any other exception). The tool prints
the Markdown table kept in docs/models.md; ``--check docs/models.md`` exits 1 when the committed table differs.
``tests/unit/test_architectures.py`` runs the same cells and compares each with the committed table.
"""

from __future__ import annotations

import argparse
import copy
import re
import sys
import tempfile
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import torch
import transformers
from peft import (
    AdaLoraConfig,
    IA3Config,
    LoHaConfig,
    LoKrConfig,
    LoraConfig,
    PeftConfig,
    PeftModel,
    PrefixTuningConfig,
    PromptEncoderConfig,
    PromptTuningConfig,
    TaskType,
    get_peft_model,
)
from tokenizers import Tokenizer, models, pre_tokenizers
from tqdm import tqdm
from transformers import AutoModelForCausalLM, PretrainedConfig, PreTrainedModel, PreTrainedTokenizerFast

from peftserve.adapter_repository import AdapterVersion
from peftserve.adapter_weights import AdapterWeights
from peftserve.architectures import TESTED_FAMILIES
from peftserve.config import ServeConfig
from peftserve.engine import Engine
from peftserve.errors import AdapterLoadError
from peftserve.generation import GenerationRow

VOCAB = 128
PROMPT = [5, 9, 17, 33, 60, 7]
GREEDY_STEPS = 4
TOLERANCE = 1e-4
# An adapter must move the logits at least this much, or a wrongly applied one could pass as exact.
MIN_EFFECT = 1e-2
START, END = "<!-- support-matrix:start -->", "<!-- support-matrix:end -->"
OUTCOME_MARKS = {"exact": "exact", "refused": "refused", "peft-cannot": "n/a"}
FAILURES = {"mismatch", "error"}

# Tiny sizes shared by every family; initializer_range 0.2 spreads the logits (about 1), so small
# effects and near-ties are rare.
_SIZES = {"initializer_range": 0.2, "vocab_size": VOCAB, "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0}
_DECODER = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4}
_GQA = {**_DECODER, "num_key_value_heads": 2}
_MOE = {**_GQA, "moe_intermediate_size": 16, "num_experts": 4, "num_experts_per_tok": 2, "head_dim": 8}
_GPT2 = {"n_embd": 32, "n_layer": 2, "n_head": 4}
# Multi-head latent attention (compressed key/values) and a dense first layer, then routed experts.
_DEEPSEEK = {
    **_DECODER,
    "num_key_value_heads": 4,
    "moe_intermediate_size": 16,
    "n_routed_experts": 4,
    "num_experts_per_tok": 2,
    "n_group": 1,
    "topk_group": 1,
    "q_lora_rank": 16,
    "kv_lora_rank": 16,
    "qk_rope_head_dim": 4,
    "qk_nope_head_dim": 4,
    "v_head_dim": 8,
    "first_k_dense_replace": 1,
}


@dataclass(frozen=True)
class Family:
    """A decoder family: its tiny config and the layers an IA3 adapter targets (PEFT has no default for
    several families; ``feedforward`` are those scaled on their input side)."""

    model_type: str
    config: Callable[[], PretrainedConfig]
    ia3_targets: tuple[str, ...] = ("k_proj", "v_proj", "down_proj")
    ia3_feedforward: tuple[str, ...] = ("down_proj",)

    @property
    def name(self) -> str:
        return TESTED_FAMILIES[self.model_type]


def _family(model_type: str, config_class: str, *ia3: tuple[str, ...], **sizes) -> Family:
    def make() -> PretrainedConfig:
        return getattr(transformers, config_class)(**{**sizes, **_SIZES})

    return Family(model_type, make, *ia3)


_FUSED = (("query_key_value", "dense_4h_to_h"), ("dense_4h_to_h",))
_MOE_ATTENTION = (("k_proj", "v_proj", "o_proj"), ("o_proj",))
FAMILIES: dict[str, Family] = {
    family.model_type: family
    for family in [
        _family("llama", "LlamaConfig", **_GQA),
        _family("mistral", "MistralConfig", **_GQA),
        _family("mixtral", "MixtralConfig", *_MOE_ATTENTION, **_GQA, num_local_experts=4, num_experts_per_tok=2),
        _family("qwen2", "Qwen2Config", **_GQA),
        _family("qwen2_moe", "Qwen2MoeConfig", **_MOE, shared_expert_intermediate_size=32),
        _family("qwen3", "Qwen3Config", **_GQA, head_dim=8),
        _family("qwen3_moe", "Qwen3MoeConfig", *_MOE_ATTENTION, **_MOE),
        _family("gemma", "GemmaConfig", **_GQA, head_dim=8),
        _family("gemma2", "Gemma2Config", **_GQA, head_dim=8, sliding_window=4),
        _family("gemma3_text", "Gemma3TextConfig", **_GQA, head_dim=8, sliding_window=4),
        _family("phi3", "Phi3Config", ("qkv_proj", "down_proj"), ("down_proj",), **_GQA),
        _family("gpt2", "GPT2Config", ("c_attn", "mlp.c_proj"), ("mlp.c_proj",), **_GPT2),
        _family("gpt_neox", "GPTNeoXConfig", *_FUSED, **_DECODER),
        _family(
            "gptj",
            "GPTJConfig",
            ("q_proj", "v_proj", "fc_out"),
            ("fc_out",),
            n_embd=32,
            n_layer=2,
            n_head=4,
            rotary_dim=4,
        ),
        _family(
            "opt", "OPTConfig", ("k_proj", "v_proj", "fc2"), ("fc2",), **_DECODER, ffn_dim=64, word_embed_proj_dim=32
        ),
        _family("falcon", "FalconConfig", *_FUSED, hidden_size=32, num_hidden_layers=2, num_attention_heads=4),
        _family("bloom", "BloomConfig", *_FUSED, hidden_size=32, n_layer=2, n_head=4),
        _family("starcoder2", "Starcoder2Config", ("k_proj", "v_proj", "c_proj"), ("c_proj",), **_GQA),
        _family("gpt_bigcode", "GPTBigCodeConfig", ("c_attn", "mlp.c_proj"), ("mlp.c_proj",), **_GPT2),
        _family("phi", "PhiConfig", ("k_proj", "v_proj", "fc2"), ("fc2",), **_DECODER),
        _family("olmo2", "Olmo2Config", **_GQA),
        _family("granite", "GraniteConfig", **_GQA),
        _family("cohere", "CohereConfig", **_GQA),
        _family("stablelm", "StableLmConfig", **_GQA),
        _family("phimoe", "PhimoeConfig", *_MOE_ATTENTION, **_GQA, num_local_experts=4, num_experts_per_tok=2),
        _family("deepseek_v3", "DeepseekV3Config", *_MOE_ATTENTION, **_DEEPSEEK),
        _family(
            "gpt_oss",
            "GptOssConfig",
            *_MOE_ATTENTION,
            **_GQA,
            num_local_experts=4,
            num_experts_per_tok=2,
            head_dim=8,
            sliding_window=4,
        ),
    ]
}


def _lora(**options) -> Callable[[Family], PeftConfig]:
    # init_lora_weights=False: B is random too, so the adapter is not a no-op.
    return lambda family: LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False, **options)


# What a user would write for each type; "all-linear" wherever PEFT offers it.
ADAPTER_TYPES: dict[str, Callable[[Family], PeftConfig]] = {
    "LoRA": _lora(),
    "rsLoRA": _lora(use_rslora=True),
    "DoRA": _lora(use_dora=True),
    "AdaLoRA": lambda family: AdaLoraConfig(init_r=4, target_r=2, total_step=10, target_modules="all-linear"),
    "LoHa": lambda family: LoHaConfig(r=4, alpha=8, target_modules="all-linear", init_weights=False),
    "LoKr": lambda family: LoKrConfig(r=4, alpha=8, target_modules="all-linear", init_weights=False),
    "IA3": lambda family: IA3Config(
        target_modules=list(family.ia3_targets), feedforward_modules=list(family.ia3_feedforward)
    ),
    "prefix": lambda family: PrefixTuningConfig(num_virtual_tokens=3),
    "prompt": lambda family: PromptTuningConfig(num_virtual_tokens=3),
    "P-tuning": lambda family: PromptEncoderConfig(num_virtual_tokens=3, encoder_hidden_size=16),
}


@dataclass(frozen=True)
class Cell:
    family: str  # model_type
    adapter_type: str
    outcome: str  # exact | refused | peft-cannot | mismatch | error
    note: str = ""  # the refusal message, or what went wrong


def _tokenizer() -> PreTrainedTokenizerFast:
    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3} | {f"w{i}": i for i in range(4, VOCAB)}
    tokenizer = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>"
    )


def _first_line(exc: BaseException) -> str:
    return f"{str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__}"


@dataclass
class FamilyBench:
    """One family's tiny base model on disk, an engine over it, and the adapters made so far."""

    family: Family
    directory: Path
    base: PreTrainedModel = field(init=False)
    engine: Engine = field(init=False)
    loaded: dict[str, tuple[Path, AdapterWeights]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        torch.manual_seed(0)
        self.base = AutoModelForCausalLM.from_config(self.family.config()).eval()
        base_dir = self.directory / "base"
        self.base.save_pretrained(base_dir)
        _tokenizer().save_pretrained(base_dir)
        repository = self.directory / "adapters"
        repository.mkdir(parents=True, exist_ok=True)
        self.engine = Engine(ServeConfig(base_model=str(base_dir), adapter_repository=str(repository)))

    def run(self, adapter_type: str, config: PeftConfig | None = None) -> Cell:
        """Make the adapter with PEFT (``config``, or the type's usual one), load it in the engine, compare;
        never raises."""
        cell = lambda outcome, note="": Cell(self.family.model_type, adapter_type, outcome, note)  # noqa: E731
        try:
            adapter_dir = self.make_adapter(adapter_type, config)
        except Exception as exc:  # noqa: BLE001 - whatever PEFT raises, it cannot make this adapter
            return cell("peft-cannot", _first_line(exc))
        try:
            _, weights = self.engine.prepare_version(AdapterVersion(adapter_type.lower(), 1, adapter_dir))
        except AdapterLoadError as exc:
            return cell("refused", str(exc))
        except Exception as exc:  # noqa: BLE001 - an internal error is the failure this matrix exists to find
            return cell("error", f"loading: {type(exc).__name__}: {_first_line(exc)}")
        try:
            difference, effect = self._compare(adapter_dir, weights)
        except Exception as exc:  # noqa: BLE001
            return cell("error", f"generating: {type(exc).__name__}: {_first_line(exc)}")
        if difference > TOLERANCE:
            return cell("mismatch", f"logits differ from PEFT's by {difference:.2e}")
        if effect < MIN_EFFECT:
            return cell("error", f"the adapter moves the logits by only {effect:.2e}; the comparison proves nothing")
        self.loaded[adapter_type] = (adapter_dir, weights)
        return cell("exact")

    def make_adapter(self, adapter_type: str, config: PeftConfig | None = None) -> Path:
        """Make one adapter of ``adapter_type`` with PEFT (random, non-trivial weights) and save it; returns its
        version directory."""
        torch.manual_seed(1)
        config = config or ADAPTER_TYPES[adapter_type](self.family)
        config.task_type = TaskType.CAUSAL_LM
        peft_model = get_peft_model(copy.deepcopy(self.base), config)
        with torch.no_grad():  # away from every identity init (lora_B = 0, IA3 = 1, AdaLoRA's E = 0)
            for parameter in peft_model.parameters():
                if parameter.requires_grad:
                    parameter.add_(torch.randn_like(parameter) * 0.3)
        adapter_dir = self.directory / "adapters" / adapter_type.lower() / "1"
        peft_model.save_pretrained(adapter_dir)
        return adapter_dir

    def reference(self, adapter_dir: Path | None) -> PreTrainedModel:
        base = copy.deepcopy(self.base)
        return (PeftModel.from_pretrained(base, adapter_dir) if adapter_dir else base).eval()

    def _compare(self, adapter_dir: Path, weights: AdapterWeights) -> tuple[float, float]:
        """Largest logit difference from PEFT (prompt, then greedy steps), and how far the adapter moves them."""
        row = GenerationRow(
            list(PROMPT), weights, GREEDY_STEPS, ignore_eos=True, keep_logits=True, keep_prompt_logits=True
        )
        (generated,) = self.engine.batcher.run_rows([row])
        prompt_logits = generated.prompt_logits
        ids = torch.tensor([PROMPT + generated.token_ids[:-1]])
        with torch.no_grad():
            expected = self.reference(adapter_dir)(input_ids=ids, attention_mask=torch.ones_like(ids)).logits[0]
            base = self.base(input_ids=ids).logits[0]
        expected = expected[-ids.shape[1] :]  # prompt-learning references also return the virtual positions
        steps = torch.stack(generated.step_logits)
        difference = max(
            float((prompt_logits - expected[: len(PROMPT)]).abs().max()),
            float((steps - expected[len(PROMPT) - 1 :]).abs().max()),
        )
        return difference, float((expected - base).abs().max())

    def mixed_batch_difference(self) -> float:
        """Every exact adapter of this family plus the base model in one batch, prompts of different lengths
        (per-row positions, right-aligned KV reads), against each row run alone: the largest logit difference
        beyond ``TOLERANCE`` times the logit's size, i.e. ``|alone - mixed| <= TOLERANCE * (1 + |alone|)`` when
        this is at most ``TOLERANCE`` (the engine's own mixed-vs-solo tests use the same bound). Rows of several
        adapters go through other kernels than a row alone (masked pairs, stacks), whose float32 sums run in
        another order: about 1e-6 of a module's output, which a row's large random adapter can magnify through
        attention (measured: 1.1e-4 on logits of 4.3 for Qwen2's LoRA row, 1-2e-6 for every other row)."""
        adapters: list[AdapterWeights | None] = [None] + [weights for _, weights in self.loaded.values()]
        rows = [
            GenerationRow(
                PROMPT[: 2 + index % len(PROMPT)] * 2, weights, GREEDY_STEPS, ignore_eos=True, keep_logits=True
            )
            for index, weights in enumerate(adapters)
        ]
        together = self.engine.batcher.run_rows(rows)
        worst = 0.0
        for row, mixed in zip(rows, together, strict=True):
            alone = self.engine.batcher.run_rows([row])[0]
            if alone.token_ids != mixed.token_ids:
                return float("inf")
            alone_logits, mixed_logits = torch.stack(alone.step_logits), torch.stack(mixed.step_logits)
            beyond = (alone_logits - mixed_logits).abs() - TOLERANCE * alone_logits.abs()
            worst = max(worst, float(beyond.max()))
        return worst


def run_matrix(directory: Path, families: Iterable[str] = FAMILIES) -> list[Cell]:
    cells = []
    for model_type in tqdm(list(families), desc="families"):
        bench = FamilyBench(FAMILIES[model_type], directory / model_type)
        cells += [bench.run(adapter_type) for adapter_type in ADAPTER_TYPES]
    return cells


def render_table(cells: Iterable[Cell]) -> str:
    """The docs/models.md section: one row per family, one column per adapter type, numbered notes below."""
    by_key = {(cell.family, cell.adapter_type): cell for cell in cells}
    notes: list[str] = []
    lines = [
        START,
        "| family | " + " | ".join(ADAPTER_TYPES) + " |",
        "|---|" + "---|" * len(ADAPTER_TYPES),
    ]
    for model_type in FAMILIES:
        marks = []
        for adapter_type in ADAPTER_TYPES:
            cell = by_key[(model_type, adapter_type)]
            mark = OUTCOME_MARKS.get(cell.outcome, f"**{cell.outcome.upper()}**")
            if cell.note:
                if cell.note not in notes:
                    notes.append(cell.note)
                mark += f" [{notes.index(cell.note) + 1}]"
            marks.append(mark)
        lines.append(f"| {FAMILIES[model_type].name} (`{model_type}`) | " + " | ".join(marks) + " |")
    lines.append("")
    lines += [f"{number}. {_escape(note)}" for number, note in enumerate(notes, 1)]
    lines.append(END)
    return "\n".join(lines)


def _escape(note: str) -> str:
    return note.replace("|", "\\|").replace("<", "&lt;").replace(">", "&gt;")


def _unescape(note: str) -> str:
    return note.replace("&gt;", ">").replace("&lt;", "<").replace("\\|", "|")


def committed_section(page: str) -> str:
    start, end = page.find(START), page.find(END)
    if start < 0 or end < start:
        raise ValueError(f"the page holds no support matrix between {START} and {END}")
    return page[start : end + len(END)]


def parse_table(section: str) -> dict[tuple[str, str], Cell]:
    """The cells a rendered section states (the inverse of :func:`render_table`)."""
    notes = dict(re.findall(r"^(\d+)\. (.*)$", section, flags=re.MULTILINE))
    marks = {mark: outcome for outcome, mark in OUTCOME_MARKS.items()}
    cells = {}
    for line in section.splitlines():
        match = re.fullmatch(r"\| .* \(`(?P<type>[a-z0-9_]+)`\) \| (?P<cells>.*) \|", line)
        if not match:
            continue
        for adapter_type, text in zip(ADAPTER_TYPES, match["cells"].split(" | "), strict=True):
            mark, _, number = text.partition(" [")
            note = _unescape(notes[number.rstrip("]")]) if number else ""
            outcome = marks.get(mark, mark.strip("*").lower())
            cells[(match["type"], adapter_type)] = Cell(match["type"], adapter_type, outcome, note)
    return cells


def build_parser() -> argparse.ArgumentParser:
    """The command line of ``python -m tools.support_matrix`` (also read by tests/unit/test_docs.py)."""
    parser = argparse.ArgumentParser(prog="python -m tools.support_matrix", description=__doc__.splitlines()[0])
    parser.add_argument("--check", type=Path, metavar="PAGE", help="exit 1 if this file's table differs")
    parser.add_argument("--family", action="append", choices=sorted(FAMILIES), help="only these families")
    return parser


def run(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="support-matrix-") as directory:
        cells = run_matrix(Path(directory), args.family or FAMILIES)
    if args.family:
        for cell in cells:
            print(f"{cell.family:12s} {cell.adapter_type:9s} {cell.outcome:12s} {cell.note}")
        return 1 if any(cell.outcome in FAILURES for cell in cells) else 0
    table = render_table(cells)
    print(table)
    if args.check and committed_section(args.check.read_text()) != table:
        print(f"\n{args.check}: the committed support matrix differs from this run", file=sys.stderr)
        return 1
    return 1 if any(cell.outcome in FAILURES for cell in cells) else 0


def main() -> None:
    torch.set_num_threads(1)  # tiny matmuls: more threads only wait for each other on a busy machine
    warnings.filterwarnings("ignore")
    transformers.utils.logging.disable_progress_bar()
    transformers.logging.set_verbosity_error()
    raise SystemExit(run(sys.argv[1:]))


if __name__ == "__main__":
    main()
