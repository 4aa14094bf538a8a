"""One forward pass over a set of sequences, each with its own adapter, position and sampling.

A :class:`SequenceState` is a request inside the model: its prompt (with an adapter's virtual tokens in
front), how much of it is prefilled, the tokens generated so far and the KV blocks it holds. The
:class:`ModelRunner` runs one forward pass for some of them: prompt chunks (inputs as embeddings, so
virtual tokens enter like any other position), one decoding step (the last token of each), or, where the
model allows it, both in one *packed* pass: every row's new tokens in one sequence, no padding, so a prompt
chunk joins a decoding step for about the cost of its own tokens instead of a forward pass of its own.
Positions are explicit per row and equal the token's index in its KV sequence; a prefix-tuning adapter's
key/values fill the first slots of its sequence, so its prompt starts at position ``prefix_length``, as in
PEFT.
"""

from __future__ import annotations

import inspect
import logging
import secrets
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from transformers import PreTrainedModel

from peftserve.adapter_weights import AdapterWeights
from peftserve.batched_layers import AdapterLayers, BatchDeltas
from peftserve.decode_graphs import CaptureFailed, DecodeGraphs
from peftserve.kv_cache import PagedKVCache
from peftserve.packed_masks import MaskBuilder, packed_mask_builder
from peftserve.paged_attention import ATTENTION_NAME as PAGED_ATTENTION
from peftserve.paged_attention import hand_over, reading_in_place
from peftserve.paged_attention import register as register_paged_attention

logger = logging.getLogger("peftserve.generation")


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
    keep_logits: bool = False  # record each generated token's logits (tests, smoke checks)
    keep_prompt_logits: bool = False  # record the logits over the prompt's own tokens

    @property
    def virtual_tokens(self) -> int:
        embeddings = self.adapter.virtual_embeddings if self.adapter is not None else None
        return 0 if embeddings is None else embeddings.shape[0]

    @property
    def prefix_length(self) -> int:
        return self.adapter.prefix_length if self.adapter is not None else 0

    @property
    def kv_tokens(self) -> int:
        """KV slots this row can ever use: prefix, virtual tokens, prompt and every generated token."""
        return self.prefix_length + self.virtual_tokens + len(self.prompt_ids) + self.max_new_tokens


@dataclass
class GeneratedSequence:
    token_ids: list[int]
    finish_reason: str  # "stop" (an end-of-sequence token or stop string) or "length"
    step_logits: list[torch.Tensor] = field(default_factory=list)  # when the row asked for them
    prompt_logits: torch.Tensor | None = None  # (prompt tokens, vocab) when the row asked for them


@dataclass(eq=False)
class SequenceState:
    """One row inside the model: what is prefilled, what it generated, and the caller's handle."""

    row: GenerationRow
    sequence_id: int
    handle: object = None
    generator: torch.Generator | None = None
    prefilled: int = 0  # input positions (virtual tokens + prompt) already in the KV cache
    result: GeneratedSequence = field(default_factory=lambda: GeneratedSequence(token_ids=[], finish_reason="length"))
    prompt_logit_chunks: list[torch.Tensor] = field(default_factory=list)
    pending: int = -1  # the token chosen by the last forward pass, recorded by ``ModelRunner.advance``

    @property
    def input_length(self) -> int:
        return self.row.virtual_tokens + len(self.row.prompt_ids)

    @property
    def prefill_left(self) -> int:
        return self.input_length - self.prefilled


class ModelRunner:
    """Runs forward passes of one base model, its :class:`AdapterLayers` and a :class:`PagedKVCache`."""

    def __init__(
        self,
        model: PreTrainedModel,
        layers: AdapterLayers,
        cache: PagedKVCache,
        *,
        eos_token_ids: set[int],
        pad_token_id: int,
    ) -> None:
        self.model = model
        self.layers = layers
        self.cache = cache
        self.eos_token_ids = eos_token_ids
        self.pad_token_id = pad_token_id
        self.device = next(model.parameters()).device
        self.embed = model.get_input_embeddings()
        self.cache_argument = cache_argument(model)
        # Set by check_packing: how to mask a packed pass, once one was seen to equal separate passes.
        self.packed_masks: MaskBuilder | None = None
        # Set by the engine where decoding steps replay CUDA graphs (peftserve.decode_graphs), once checked.
        self.graphs: DecodeGraphs | None = None

    @property
    def packs(self) -> bool:
        """Whether prompt chunks and decoding rows share packed forward passes."""
        return self.packed_masks is not None

    def start(self, state: SequenceState) -> None:
        """Take the KV blocks of a new sequence (the caller checked they are free) and write its prefix."""
        row = state.row
        self.cache.reserve(state.sequence_id, row.kv_tokens)
        if row.prefix_length:
            self.cache.write_prefix(state.sequence_id, row.adapter.prefix_kv)
        state.generator = _sampler(row.sampling, self.device)

    def finish(self, state: SequenceState) -> None:
        self.cache.release(state.sequence_id)

    @torch.inference_mode()
    def prefill(self, chunks: Sequence[tuple[SequenceState, int]], deltas: BatchDeltas) -> list[SequenceState]:
        """Add the next ``n`` input positions of each ``(state, n)`` to the cache; rows whose whole prompt is
        then in get their first token. Returns those rows."""
        states = [state for state, _ in chunks]
        query_length = max(n for _, n in chunks)
        embeddings = [self._input_embeddings(state, n) for state, n in chunks]
        inputs = embeddings[0].new_zeros(len(chunks), query_length, embeddings[0].shape[-1])
        positions = torch.zeros(len(chunks), query_length, dtype=torch.long)
        for b, ((state, n), chunk) in enumerate(zip(chunks, embeddings, strict=True)):
            inputs[b, query_length - n :] = chunk
            start = state.row.prefix_length + state.prefilled
            positions[b, query_length - n :] = torch.arange(start, start + n)
        plan = [(state.sequence_id, n) for state, n in chunks]
        want_all = any(state.row.keep_prompt_logits for state in states)
        mask = self.cache.plan(plan, query_length)
        logits = self._forward(
            plan, deltas, mask, inputs_embeds=inputs, positions=positions, logits_to_keep=0 if want_all else 1
        )
        completed, last_logits = [], []
        for b, (state, n) in enumerate(chunks):
            if self._prefilled(state, n, logits[b, query_length - n :] if state.row.keep_prompt_logits else None):
                completed.append(state)
                last_logits.append(logits[b, -1])
        if completed:
            self._choose(completed, torch.stack(last_logits).float())
        return completed

    @torch.inference_mode()
    def packed(self, items: Sequence[tuple[SequenceState, int]], deltas: BatchDeltas) -> list[SequenceState]:
        """One packed pass (needs :attr:`packs`): ``(state, n)`` adds a prompt chunk of ``n`` positions for a
        row still prefilling, its last token (``n`` = 1) for a decoding row. ``deltas`` are per token, in this
        order. Returns the rows that got a next token: every decoding row, and those whose prompt is now in."""
        embeddings, positions, keep, kept = [], [], [], []
        offset = 0
        for state, n in items:
            if state.prefill_left:
                embeddings.append(self._input_embeddings(state, n))
            else:
                embeddings.append(self.embed(torch.tensor(state.result.token_ids[-1:], device=self.device)))
            start = self.cache.length(state.sequence_id)
            positions.append(torch.arange(start, start + n))
            kept.append(n if state.prefill_left and state.row.keep_prompt_logits else 1)
            keep.extend(range(offset + n - kept[-1], offset + n))
            offset += n
        plan = [(state.sequence_id, n) for state, n in items]
        layout = self.cache.plan_packed(plan)
        mask = None if self.cache.reads_in_place else self.packed_masks(layout)  # the kernel needs none
        logits = self._forward(
            plan,
            deltas,
            mask,
            inputs_embeds=torch.cat(embeddings)[None],
            positions=torch.cat(positions)[None],
            logits_to_keep=torch.tensor(keep, device=self.device),
        )[0]
        chosen, last_logits, at = [], [], 0
        for (state, n), count in zip(items, kept, strict=True):
            own = logits[at : at + count]
            if not state.prefill_left or self._prefilled(state, n, own if state.row.keep_prompt_logits else None):
                chosen.append(state)
                last_logits.append(own[-1])
            at += count
        if chosen:
            self._choose(chosen, torch.stack(last_logits).float())
        return chosen

    def _prefilled(self, state: SequenceState, n: int, chunk_logits: torch.Tensor | None) -> bool:
        """Record that ``n`` more input positions of ``state`` are in the cache (with their logits, for rows
        that keep them); True once the whole prompt is."""
        if chunk_logits is not None:
            state.prompt_logit_chunks.append(chunk_logits.float())
        state.prefilled += n
        if state.prefill_left:
            return False
        if state.row.keep_prompt_logits:
            every = torch.cat(state.prompt_logit_chunks)
            state.result.prompt_logits = every[state.row.virtual_tokens :]
            state.prompt_logit_chunks.clear()
        return True

    @torch.inference_mode()
    def decode(self, states: Sequence[SequenceState], deltas: BatchDeltas) -> None:
        """One decoding step: each row's last token goes in, its next token comes out."""
        rows = [(state.sequence_id, state.result.token_ids[-1], state.row.adapter) for state in states]
        if self.graphs is not None and self.graphs.serves(rows):
            try:
                self._choose(states, self.graphs.decode(rows).float())
                return
            except CaptureFailed as exc:  # the step did not run: it runs eagerly below, and so do later ones
                logger.warning("decoding steps run eagerly from now on: %s", exc)
                self.graphs.close()
                self.graphs = None
        ids = torch.tensor([[token] for _, token, _ in rows], device=self.device)
        positions = torch.tensor([[self.cache.length(state.sequence_id)] for state in states])
        plan = [(state.sequence_id, 1) for state in states]
        mask = self.cache.plan(plan, 1)
        logits = self._forward(plan, deltas, mask, input_ids=ids, positions=positions, logits_to_keep=1)
        self._choose(states, logits[:, -1].float())

    def _forward(
        self,
        plan: list[tuple[int, int]],
        deltas: BatchDeltas,
        mask: torch.Tensor | dict[str, torch.Tensor] | None,
        *,
        positions: torch.Tensor,
        logits_to_keep: int | torch.Tensor,
        **inputs: torch.Tensor,
    ) -> torch.Tensor:
        """The model over the cache as planned (rewound if the pass fails, so its rows can run again)."""
        try:
            deltas.install()
            return self.model(
                **inputs,
                attention_mask=mask,
                position_ids=positions.to(self.device),
                use_cache=True,
                logits_to_keep=logits_to_keep,
                **{self.cache_argument: self.cache},
            ).logits
        except BaseException:
            self.cache.rewind(plan)
            raise
        finally:
            hand_over(None)  # nothing of this pass reaches a forward pass of another cache
            reading_in_place(False)

    @torch.inference_mode()
    def check_packing(self, *, prompt_tokens: int = 12) -> bool:
        """Turn packed passes on if, on this model, one gives the logits of separate passes; call it before
        anything else uses the cache. Masks are built from the config (:mod:`peftserve.packed_masks`), and a
        model may read its inputs in ways no config states (ALiBi from a 2-D mask, a cache position of its
        own), so the rule is checked, not trusted: sequence A prefills ``prompt_tokens`` (more than a sliding
        window, if the model has one), then A's next token and B's whole prompt run as separate passes and
        as one packed pass, through the base model."""
        dtype = next(self.model.parameters()).dtype
        builder = packed_mask_builder(self.model.config, dtype)
        if builder is None:
            logger.info("prefill and decoding run in separate passes: the model's attention takes no packed mask")
            return False
        deltas = BatchDeltas(self.layers, [])
        length, ids_a, ids_b = self._check_inputs(prompt_tokens, seed=0, after_a=1, b_tokens=5)
        a, b = -1, -2  # never a request's id
        try:
            self.cache.reserve(a, length + 1)
            self.cache.reserve(b, 5)
            a_prompt, b_prompt, a_next = [(a, length)], [(b, 5)], [(a, 1)]
            self._forward(a_prompt, deltas, self.cache.plan(a_prompt, length), input_ids=ids_a[:, :length],
                          positions=torch.arange(length)[None], logits_to_keep=1)  # fmt: skip
            separate = [
                self._forward(a_next, deltas, self.cache.plan(a_next, 1), input_ids=ids_a[:, length:],
                              positions=torch.tensor([[length]]), logits_to_keep=1)[0, -1],
                self._forward(b_prompt, deltas, self.cache.plan(b_prompt, 5), input_ids=ids_b,
                              positions=torch.arange(5)[None], logits_to_keep=1)[0, -1],
            ]  # fmt: skip
            self.cache.rewind([*a_next, *b_prompt])
            both = [*a_next, *b_prompt]
            packed = self._forward(
                both,
                deltas,
                builder(self.cache.plan_packed(both)),
                input_ids=torch.cat([ids_a[:, length:], ids_b], dim=1),
                positions=torch.cat([torch.tensor([length]), torch.arange(5)])[None],
                logits_to_keep=torch.tensor([0, 5], device=self.device),
            )[0]
        except MemoryError as exc:  # a KV cache too small for the check: separate passes always fit
            logger.info("prefill and decoding run in separate passes: %s for the packing check", exc)
            return False
        except (RuntimeError, ValueError, TypeError, IndexError) as exc:  # a model refusing the packed form
            logger.info("prefill and decoding run in separate passes: a packed pass failed (%s)", exc)
            return False
        finally:
            self.cache.release(a)
            self.cache.release(b)
        error = self.check_error(packed, torch.stack(separate))
        if error is not None:
            logger.warning(
                "prefill and decoding run in separate passes: a packed pass differed from separate ones by %.2g "
                "(relative; tolerance %.0g)",
                error,
                self.check_tolerance(),
            )
            return False
        self.packed_masks = builder
        return True

    @torch.inference_mode()
    def check_reads_in_place(self, *, prompt_tokens: int = 12) -> str | None:
        """Turn in-place reads on (:mod:`peftserve.paged_attention`) if, on this model, passes read in place
        give the logits of gathered ones; returns None if they did, else why not. Call it after
        :meth:`check_packing`. Row A prefills ``prompt_tokens`` (more than a sliding window, if the model has
        one); then, where passes pack, A's next token and row B's whole prompt run as one packed pass (else B
        prefills alone); then A and B decode one token. Each pass runs gathered, then again in place."""
        if self.model.config._attn_implementation != "sdpa":
            return f"the model's attention is {self.model.config._attn_implementation!r}, not sdpa"
        register_paged_attention()
        self.model.set_attn_implementation(PAGED_ATTENTION)  # sdpa, for every pass not read in place
        deltas = BatchDeltas(self.layers, [])
        length, ids_a, ids_b = self._check_inputs(prompt_tokens, seed=1, after_a=2, b_tokens=6)
        a, b = -1, -2  # never a request's id

        def both_ways(name: str, plan: list[tuple[int, int]], run) -> None:
            self.cache.reads_in_place = False
            gathered = run().float()
            self.cache.rewind(plan)
            self.cache.reads_in_place = True
            in_place = run().float()
            error = self.check_error(in_place, gathered)
            if error is not None:
                raise _Mismatch(f"a {name} pass read in place differed from a gathered one by {error:.2g}")

        try:
            self.cache.reserve(a, length + 2)
            self.cache.reserve(b, 6)
            a_prompt = [(a, length)]
            self._forward(a_prompt, deltas, self.cache.plan(a_prompt, length), input_ids=ids_a[:, :length],
                          positions=torch.arange(length)[None], logits_to_keep=1)  # fmt: skip
            a_done = length
            if self.packs:
                plan = [(a, 1), (b, 5)]
                packed_ids = torch.cat([ids_a[:, length : length + 1], ids_b[:, :5]], 1)
                packed_positions = torch.cat([torch.tensor([length]), torch.arange(5)])[None]

                def packed() -> torch.Tensor:
                    layout = self.cache.plan_packed(plan)
                    mask = None if self.cache.reads_in_place else self.packed_masks(layout)
                    keep = torch.arange(6, device=self.device)
                    return self._forward(plan, deltas, mask, input_ids=packed_ids, positions=packed_positions,
                                         logits_to_keep=keep)[0]  # fmt: skip

                both_ways("packed", plan, packed)
                a_done += 1
            else:
                b_prompt = [(b, 5)]
                self._forward(b_prompt, deltas, self.cache.plan(b_prompt, 5), input_ids=ids_b[:, :5],
                              positions=torch.arange(5)[None], logits_to_keep=1)  # fmt: skip
            step = [(a, 1), (b, 1)]
            step_ids = torch.cat([ids_a[:, a_done : a_done + 1], ids_b[:, 5:]])
            positions = torch.tensor([[a_done], [5]])

            def decode() -> torch.Tensor:
                mask = self.cache.plan(step, 1)
                return self._forward(step, deltas, mask, input_ids=step_ids, positions=positions, logits_to_keep=1)

            both_ways("decoding", step, decode)
        except _Mismatch as exc:
            self._gathered_reads()
            return str(exc)
        except Exception as exc:  # noqa: BLE001 - any failure keeps the reads that work
            self._gathered_reads()
            return f"a pass read in place failed ({type(exc).__name__}: {exc})"
        finally:
            self.cache.release(a)
            self.cache.release(b)
        return None

    def check_tolerance(self) -> float:
        """The start-up checks' bound on the relative logit difference between two ways of computing a pass:
        half precision rounds sums taken in another order by up to ~1e-2; a wrong mask or read moves logits
        far more."""
        return 1e-3 if next(self.model.parameters()).dtype == torch.float32 else 3e-2

    def check_error(self, ours: torch.Tensor, reference: torch.Tensor) -> float | None:
        """The relative max logit difference of ``ours`` against ``reference`` if it exceeds
        :meth:`check_tolerance`, else None (NaN exceeds it)."""
        ours, reference = ours.float(), reference.float()
        error = float((ours - reference).abs().max() / reference.abs().max().clamp(min=1e-6))
        return None if error <= self.check_tolerance() else error

    def _check_inputs(
        self, prompt_tokens: int, *, seed: int, after_a: int, b_tokens: int
    ) -> tuple[int, torch.Tensor, torch.Tensor]:
        """Random token ids for the start-up checks' rows: A's prompt length (more than a sliding window, if
        the model has one), A's ids (its prompt and ``after_a`` more), B's ``b_tokens`` ids."""
        window = getattr(self.model.config, "sliding_window", None) or 0
        length = max(prompt_tokens, min(window + 4, 256))
        generator = torch.Generator().manual_seed(seed)
        vocab = self.embed.num_embeddings
        ids_a = torch.randint(vocab, (1, length + after_a), generator=generator).to(self.device)
        ids_b = torch.randint(vocab, (1, b_tokens), generator=generator).to(self.device)
        return length, ids_a, ids_b

    def _gathered_reads(self) -> None:
        self.cache.reads_in_place = False
        self.model.set_attn_implementation("sdpa")

    def _input_embeddings(self, state: SequenceState, count: int) -> torch.Tensor:
        """Embeddings of input positions ``prefilled .. prefilled + count`` (virtual tokens first)."""
        row, start, stop = state.row, state.prefilled, state.prefilled + count
        virtual = row.virtual_tokens
        parts = []
        if start < virtual:
            parts.append(row.adapter.virtual_embeddings[start : min(stop, virtual)])
        if stop > virtual:
            ids = row.prompt_ids[max(start, virtual) - virtual : stop - virtual]
            parts.append(self.embed(torch.tensor(ids, device=self.device)))
        return torch.cat(parts) if len(parts) > 1 else parts[0]

    def _choose(self, states: Sequence[SequenceState], logits: torch.Tensor) -> None:
        """Pick and record the next token of every row: greedy and sampled rows in one vectorised choice and
        one device-to-host copy per step."""
        chosen = logits.argmax(dim=-1)
        sampled = [b for b, state in enumerate(states) if state.generator is not None]
        if sampled:
            index = torch.tensor(sampled, device=logits.device)
            noise = torch.stack(
                [torch.rand(logits.shape[-1], generator=states[b].generator, device=logits.device) for b in sampled]
            )
            settings = [states[b].row.sampling for b in sampled]
            chosen = chosen.index_copy(0, index, _sample(logits.index_select(0, index), settings, noise))
        tokens = chosen.tolist()
        for b, state in enumerate(states):
            if state.row.keep_logits:
                state.result.step_logits.append(logits[b].clone())
            state.pending = tokens[b]

    def advance(self, state: SequenceState) -> bool:
        """Record the token chosen for ``state``; returns True if the row goes on."""
        token, row, result = state.pending, state.row, state.result
        if token in self.eos_token_ids and not row.ignore_eos:
            result.finish_reason = "stop"
            return False
        result.token_ids.append(token)
        if row.should_stop is not None and row.should_stop(result.token_ids):
            result.finish_reason = "stop"
            return False
        return len(result.token_ids) < row.max_new_tokens


class _Mismatch(Exception):
    """A pass read in place gave other logits than the same pass gathered."""


def cache_argument(model: PreTrainedModel) -> str:
    """The forward argument that takes the cache: transformers 5.x renames ``past_key_values`` to ``cache``
    model by model."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def _sampler(sampling: SamplingParams, device: torch.device) -> torch.Generator | None:
    if sampling.greedy:
        return None
    generator = torch.Generator(device=device)
    generator.manual_seed(sampling.seed if sampling.seed is not None else secrets.randbits(63))
    return generator


def _sample(logits: torch.Tensor, settings: list[SamplingParams], noise: torch.Tensor) -> torch.Tensor:
    """Sample one token per row of ``logits`` (rows, vocab) with each row's temperature, top-k and top-p.

    ``noise`` holds one uniform draw per row and vocabulary entry from the row's own seeded generator, so a
    request samples the same tokens whatever else is in its batch. The exponential race (the smallest
    ``-log(u) / p`` wins) draws exactly from the distribution ``p``.
    """
    device = logits.device
    vocab = logits.shape[-1]
    temperature = torch.tensor([s.temperature for s in settings], device=device, dtype=logits.dtype)
    top_k = torch.tensor([s.top_k if 0 < s.top_k < vocab else vocab for s in settings], device=device)
    top_p = torch.tensor([s.top_p for s in settings], device=device, dtype=logits.dtype)
    scores = logits / temperature[:, None]
    sorted_scores, order = torch.sort(scores, dim=-1, descending=True)
    ranks = torch.arange(vocab, device=device)[None, :]
    drop = ranks >= top_k[:, None]
    probabilities = torch.softmax(sorted_scores.masked_fill(drop, float("-inf")), dim=-1)
    # Then drop a token once the tokens before it already reach top_p; the first token always stays.
    drop |= probabilities.cumsum(-1) - probabilities >= top_p[:, None]
    drop[:, 0] = False
    kept = torch.softmax(sorted_scores.masked_fill(drop, float("-inf")), dim=-1)
    probabilities = torch.zeros_like(kept).scatter(1, order, kept)
    race = -torch.log(noise.clamp(min=torch.finfo(noise.dtype).tiny)) / probabilities
    return race.argmin(dim=-1)
