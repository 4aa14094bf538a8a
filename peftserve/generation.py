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
from peftserve.batched_layers import AdapterLayers, BatchDeltas


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
        """Generate for all rows together; row ``i`` of the result answers ``rows[i]``."""
        batch = RunningBatch(self, keep_logits=keep_logits)
        active = [ActiveRow(row) for row in rows]
        try:
            batch.join(active)
            while len(batch):
                batch.step()
        finally:
            batch.close()
        return [entry.result for entry in active]

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


@dataclass(eq=False)
class ActiveRow:
    """One row in a :class:`RunningBatch`: its request, what it generated so far, and the caller's handle."""

    row: GenerationRow
    handle: object = None
    result: GeneratedSequence = field(default_factory=lambda: GeneratedSequence(token_ids=[], finish_reason="length"))
    generator: torch.Generator | None = None


class RunningBatch:
    """Rows that decode together, one forward pass per step; rows join between steps and leave when done.

    A joining group is prefilled on its own (its prompts, virtual tokens and prefixes) and then merged into
    the running batch: key/value caches are left-padded to a common length and masked, positions stay
    per row, so each row's logits stay those of its solo run. Rows are kept sorted by adapter, so the rows
    of one adapter are a contiguous slice and its low-rank pair applies to that slice without copies.
    Finished or cancelled rows leave at once; their cache rows (and leading all-padding columns) are dropped.
    """

    def __init__(self, generator: BatchGenerator, *, keep_logits: bool = False) -> None:
        self.generator = generator
        self.keep_logits = keep_logits
        self.rows: list[ActiveRow] = []
        self.cache: DynamicCache | None = None
        self.mask = self.positions = self.next_ids = None
        self.deltas: BatchDeltas | None = None

    def __len__(self) -> int:
        return len(self.rows)

    @torch.inference_mode()
    def join(self, rows: Sequence[ActiveRow]) -> list[ActiveRow]:
        """Prefill ``rows``, choose their first tokens, merge those that go on; returns the ones already done."""
        if not rows:
            return []
        gen = self.generator
        rows = sorted(rows, key=lambda entry: id(entry.row.adapter))
        for entry in rows:
            entry.generator = gen._generator(entry.row.sampling)
        deltas = BatchDeltas(gen.layers, [entry.row.adapter for entry in rows])
        deltas.install()
        inputs = gen._prefill_inputs([entry.row for entry in rows])
        logits = gen.model(**inputs, use_cache=True, logits_to_keep=1).logits[:, -1].float()
        keep = self._advance(rows, logits)
        done = [entry for b, entry in enumerate(rows) if b not in keep]
        if keep:
            index = torch.tensor(keep, device=gen.device)
            cache: DynamicCache = inputs[gen.cache_argument]
            if len(keep) < len(rows):
                cache.batch_select_indices(index)
            tokens = torch.tensor([rows[b].result.token_ids[-1] for b in keep], device=gen.device)[:, None]
            self._merge(
                [rows[b] for b in keep],
                cache,
                inputs["attention_mask"][index],
                inputs["position_ids"][index, -1:],
                tokens,
            )
        elif self.deltas is not None:
            self.deltas.install()
        return done

    @torch.inference_mode()
    def step(self) -> list[ActiveRow]:
        """One decoding step for every running row; returns the rows that finished with it."""
        gen = self.generator
        self.deltas.install()  # another user of the layers (a smoke check) may have replaced them meanwhile
        self.mask = torch.cat([self.mask, self.mask.new_ones(len(self.rows), 1)], dim=1)
        self.positions = self.positions + 1
        step = {
            "input_ids": self.next_ids,
            "attention_mask": self.mask,
            "position_ids": self.positions,
            gen.cache_argument: self.cache,
        }
        logits = gen.model(**step, use_cache=True).logits[:, -1].float()
        keep = self._advance(self.rows, logits)
        done = [entry for b, entry in enumerate(self.rows) if b not in keep]
        self.next_ids = torch.tensor([entry.result.token_ids[-1] for entry in self.rows], device=gen.device)[:, None]
        self._keep(keep)
        return done

    def remove(self, leaving: Sequence[ActiveRow]) -> None:
        """Take rows out between steps (a cancelled request); the others go on."""
        leaving_ids = {id(entry) for entry in leaving}
        self._keep([b for b, entry in enumerate(self.rows) if id(entry) not in leaving_ids])

    def close(self) -> None:
        for layer in self.generator.layers.wrapped.values():
            layer.rows = None

    def _advance(self, rows: Sequence[ActiveRow], logits: torch.Tensor) -> list[int]:
        """Choose each row's next token and record it; returns the batch positions of rows that go on."""
        tokens = self.generator._choose_all(
            logits, [entry.row.sampling for entry in rows], [entry.generator for entry in rows]
        )
        keep = []
        for b, (entry, token) in enumerate(zip(rows, tokens, strict=True)):
            result, row = entry.result, entry.row
            if self.keep_logits:
                result.step_logits.append(logits[b].clone())
            if token in self.generator.eos_token_ids and not row.ignore_eos:
                result.finish_reason = "stop"
                continue
            result.token_ids.append(token)
            if row.should_stop is not None and row.should_stop(result.token_ids):
                result.finish_reason = "stop"
            elif len(result.token_ids) < row.max_new_tokens:
                keep.append(b)
        return keep

    def _keep(self, keep: list[int]) -> None:
        if len(keep) == len(self.rows):
            return
        self.rows = [self.rows[b] for b in keep]
        if not keep:
            self.cache = self.mask = self.positions = self.next_ids = self.deltas = None
            self.close()
            return
        index = torch.tensor(keep, device=self.generator.device)
        self.cache.batch_select_indices(index)
        # Rebuilt rather than filtered: cheaper here, and the rows of each adapter stay one contiguous slice.
        self.deltas = BatchDeltas(self.generator.layers, [entry.row.adapter for entry in self.rows])
        self.deltas.install()
        self.mask, self.positions, self.next_ids = self.mask[index], self.positions[index], self.next_ids[index]
        self._trim_padding()

    def _trim_padding(self) -> None:
        """Drop leading cache columns that every remaining row masks out (left by rows that left)."""
        used = self.mask.any(dim=0).nonzero()
        start = int(used[0]) if len(used) else 0
        if start == 0:
            return
        self.mask = self.mask[:, start:]
        for layer in self.cache.layers:
            layer.keys, layer.values = layer.keys[:, :, start:], layer.values[:, :, start:]

    def _merge(
        self,
        rows: list[ActiveRow],
        cache: DynamicCache,
        mask: torch.Tensor,
        positions: torch.Tensor,
        next_ids: torch.Tensor,
    ) -> None:
        if not self.rows:
            self.rows, self.cache, self.mask, self.positions, self.next_ids = rows, cache, mask, positions, next_ids
        else:
            width = max(self.mask.shape[1], mask.shape[1])
            for mine, theirs in zip(self.cache.layers, cache.layers, strict=True):
                mine.keys = torch.cat([_left_pad(mine.keys, width), _left_pad(theirs.keys, width)])
                mine.values = torch.cat([_left_pad(mine.values, width), _left_pad(theirs.values, width)])
            self.mask = torch.cat([_left_pad(self.mask, width, dim=1), _left_pad(mask, width, dim=1)])
            self.positions = torch.cat([self.positions, positions])
            self.next_ids = torch.cat([self.next_ids, next_ids])
            self.rows = self.rows + rows
        order = sorted(range(len(self.rows)), key=lambda b: id(self.rows[b].row.adapter))
        if order != list(range(len(self.rows))):
            index = torch.tensor(order, device=self.generator.device)
            self.cache.batch_select_indices(index)
            self.mask, self.positions, self.next_ids = self.mask[index], self.positions[index], self.next_ids[index]
            self.rows = [self.rows[b] for b in order]
        self.deltas = BatchDeltas(self.generator.layers, [entry.row.adapter for entry in self.rows])
        self.deltas.install()


def _left_pad(tensor: torch.Tensor, width: int, *, dim: int = 2) -> torch.Tensor:
    missing = width - tensor.shape[dim]
    if missing == 0:
        return tensor
    shape = list(tensor.shape)
    shape[dim] = missing
    return torch.cat([tensor.new_zeros(shape), tensor], dim=dim)
