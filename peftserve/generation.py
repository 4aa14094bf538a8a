"""Batched autoregressive generation where every row has its own adapter, prompt, length and sampling.

Rows are left-padded; explicit ``position_ids`` and a 2-D attention mask make each row's logits equal to
its solo run. Prompt-learning adapters enter here: virtual token embeddings are placed before the row's
prompt, prefix-tuning key/values are pre-filled into the KV cache (masked for rows without a prefix), and
positions start after the virtual tokens, as in PEFT's own forward. Rows that finish leave the batch
(KV cache and per-row deltas are compacted), so a long request does not make short ones pay for it.
"""

from __future__ import annotations

import inspect
import secrets
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from transformers import DynamicCache, PreTrainedModel

from peftserve.adapter_weights import AdapterWeights
from peftserve.batched_layers import AdapterLayers


@dataclass(frozen=True)
class SamplingParams:
    """Per-row decoding settings; temperature 0 means greedy."""

    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


@dataclass
class GenerationRow:
    prompt_ids: list[int]
    adapter: AdapterWeights | None
    max_new_tokens: int
    sampling: SamplingParams = field(default_factory=SamplingParams)
    ignore_eos: bool = False
    should_stop: Callable[[list[int]], bool] | None = None  # e.g. a stop string appeared in the text so far


@dataclass
class GeneratedSequence:
    token_ids: list[int]
    finish_reason: str  # "stop" (an end-of-sequence token) or "length"
    step_logits: list[torch.Tensor] = field(default_factory=list)  # filled when asked for (tests)


class BatchGenerator:
    """Runs batches of :class:`GenerationRow` through one base model and its :class:`AdapterLayers`."""

    def __init__(self, model: PreTrainedModel, layers: AdapterLayers, *, eos_token_ids: set[int], pad_token_id: int):
        self.model = model
        self.layers = layers
        self.eos_token_ids = eos_token_ids
        self.pad_token_id = pad_token_id
        self.device = next(model.parameters()).device
        # transformers 5.x renames the forward argument ``past_key_values`` to ``cache`` model by model.
        self.cache_argument = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"

    @torch.inference_mode()
    def prompt_logits(self, rows: Sequence[GenerationRow]) -> list[torch.Tensor]:
        """Logits over each row's own prompt tokens, shape ``(len(prompt_ids), vocab)`` per row."""
        with self.layers.activated([row.adapter for row in rows]):
            inputs = self._prefill_inputs(rows)
            logits = self.model(**inputs, use_cache=True).logits.float()
        lengths = [len(row.prompt_ids) for row in rows]
        return [logits[i, logits.shape[1] - n :] for i, n in enumerate(lengths)]

    @torch.inference_mode()
    def generate(self, rows: Sequence[GenerationRow], *, keep_logits: bool = False) -> list[GeneratedSequence]:
        """Generate for all rows together; row ``i`` of the result answers ``rows[i]``.

        Rows are run sorted by adapter, so the rows of one adapter are a contiguous slice of the batch and
        its low-rank pair is applied to that slice without gathering copies of it.
        """
        order = sorted(range(len(rows)), key=lambda i: id(rows[i].adapter))
        outputs = self._generate([rows[i] for i in order], keep_logits=keep_logits)
        results: list[GeneratedSequence] = [None] * len(rows)  # type: ignore[list-item]
        for position, index in enumerate(order):
            results[index] = outputs[position]
        return results

    def _generate(self, rows: Sequence[GenerationRow], *, keep_logits: bool) -> list[GeneratedSequence]:
        results = [GeneratedSequence(token_ids=[], finish_reason="length") for _ in rows]
        generators = [self._generator(row.sampling) for row in rows]
        active = list(range(len(rows)))  # original index of each row still in the batch
        with self.layers.activated([row.adapter for row in rows]) as deltas:
            inputs = self._prefill_inputs(rows)
            cache: DynamicCache = inputs[self.cache_argument]
            mask, positions = inputs["attention_mask"], inputs["position_ids"][:, -1:]
            logits = self.model(**inputs, use_cache=True, logits_to_keep=1).logits[:, -1].float()
            while True:
                tokens = self._choose_all(logits, [rows[i].sampling for i in active], [generators[i] for i in active])
                keep = []
                for b, (i, token) in enumerate(zip(active, tokens, strict=True)):
                    result = results[i]
                    if keep_logits:
                        result.step_logits.append(logits[b].clone())
                    if token in self.eos_token_ids and not rows[i].ignore_eos:
                        result.finish_reason = "stop"
                        continue
                    result.token_ids.append(token)
                    if rows[i].should_stop is not None and rows[i].should_stop(result.token_ids):
                        result.finish_reason = "stop"
                    elif len(result.token_ids) < rows[i].max_new_tokens:
                        keep.append(b)
                if not keep:
                    break
                next_ids = torch.tensor(tokens, device=self.device)[:, None]
                if len(keep) < len(active):
                    index = torch.tensor(keep, device=self.device)
                    cache.batch_select_indices(index)
                    deltas.keep_rows(index)
                    mask, positions, next_ids = mask[index], positions[index], next_ids[index]
                    active = [active[b] for b in keep]
                mask = torch.cat([mask, mask.new_ones(len(active), 1)], dim=1)
                positions = positions + 1
                step = {
                    "input_ids": next_ids,
                    "attention_mask": mask,
                    "position_ids": positions,
                    self.cache_argument: cache,
                }
                logits = self.model(**step, use_cache=True).logits[:, -1].float()
        return results

    def _prefill_inputs(self, rows: Sequence[GenerationRow]) -> dict[str, torch.Tensor | DynamicCache]:
        embed = self.model.get_input_embeddings()
        sequences = []
        for row in rows:
            embeddings = embed(torch.tensor(row.prompt_ids, device=self.device))
            if row.adapter is not None and row.adapter.virtual_embeddings is not None:
                embeddings = torch.cat([row.adapter.virtual_embeddings, embeddings])
            sequences.append(embeddings)
        batch, length = len(rows), max(len(s) for s in sequences)
        inputs_embeds = sequences[0].new_zeros(batch, length, sequences[0].shape[-1])
        mask = torch.zeros(batch, length, dtype=torch.long, device=self.device)
        for i, seq in enumerate(sequences):
            inputs_embeds[i, length - len(seq) :] = seq
            mask[i, length - len(seq) :] = 1
        prefix_lengths = torch.tensor([row.adapter.prefix_length if row.adapter else 0 for row in rows])
        positions = (mask.cumsum(1) - 1).clamp(min=0) + prefix_lengths.to(self.device)[:, None]
        cache = DynamicCache(config=self.model.config)
        prefix_mask = self._fill_prefixes(cache, rows, int(prefix_lengths.max()))
        return {
            "inputs_embeds": inputs_embeds,
            "attention_mask": torch.cat([prefix_mask, mask], dim=1),
            "position_ids": positions,
            self.cache_argument: cache,
        }

    def _fill_prefixes(self, cache: DynamicCache, rows: Sequence[GenerationRow], width: int) -> torch.Tensor:
        """Pre-fill prefix-tuning key/values, right-aligned in ``width`` slots; returns their mask."""
        mask = torch.zeros(len(rows), width, dtype=torch.long, device=self.device)
        if width == 0:
            return mask
        prefixed = [
            (i, row.adapter.prefix_kv) for i, row in enumerate(rows) if row.adapter and row.adapter.prefix_length
        ]
        layers, _, heads, _, head_dim = prefixed[0][1].shape
        kv = prefixed[0][1].new_zeros(layers, 2, len(rows), heads, width, head_dim)
        for i, prefix in prefixed:
            kv[:, :, i, :, width - prefix.shape[3] :] = prefix
            mask[i, width - prefix.shape[3] :] = 1
        for layer in range(layers):
            cache.update(kv[layer, 0], kv[layer, 1], layer)
        return mask

    def _generator(self, sampling: SamplingParams) -> torch.Generator | None:
        if sampling.greedy:
            return None
        generator = torch.Generator(device=self.device)
        generator.manual_seed(sampling.seed if sampling.seed is not None else secrets.randbits(63))
        return generator

    @classmethod
    def _choose_all(
        cls, logits: torch.Tensor, samplings: list[SamplingParams], generators: list[torch.Generator | None]
    ) -> list[int]:
        """Next token of every row: one argmax for the whole batch, then sampling for the sampled rows."""
        tokens = logits.argmax(dim=-1).tolist()
        for row, generator in enumerate(generators):
            if generator is not None:
                tokens[row] = cls._sample(logits[row], samplings[row], generator)
        return tokens

    @staticmethod
    def _sample(logits: torch.Tensor, sampling: SamplingParams, generator: torch.Generator) -> int:
        scores = logits / sampling.temperature
        if 0 < sampling.top_k < scores.shape[0]:
            threshold = torch.topk(scores, sampling.top_k).values[-1]
            scores = scores.masked_fill(scores < threshold, float("-inf"))
        if sampling.top_p < 1.0:
            sorted_scores, order = torch.sort(scores, descending=True)
            cumulative = torch.softmax(sorted_scores, dim=-1).cumsum(-1)
            # Drop a token once the tokens before it already reach top_p; the first token always stays.
            drop = cumulative - torch.softmax(sorted_scores, dim=-1) >= sampling.top_p
            scores = scores.masked_fill(torch.zeros_like(drop).scatter(0, order, drop), float("-inf"))
        probabilities = torch.softmax(scores, dim=-1)
        return int(torch.multinomial(probabilities, 1, generator=generator))
