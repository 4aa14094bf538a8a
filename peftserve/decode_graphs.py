"""Decoding steps replayed from CUDA graphs: one captured graph per batch-size bucket.

A decoding step of a 7-8B model launches over a thousand kernels (more with adapters, triton kernels
per module and rank bucket); at small batches the GPU finishes each faster than Python issues the next,
so the step costs host time, not device time. A CUDA graph records the step's kernels once and replays
them with one launch. A replay runs exactly the kernels of its capture, on exactly the tensors of its
capture, with the scalars of its capture: everything that changes between steps must live in fixed
buffers that the step's kernels read, and nothing the host decides during the forward pass may depend on
the step. Here:

- **Batch sizes** are bucketed (:func:`graph_batch_sizes`): a step of ``n`` rows replays the graph of the
  smallest bucket that holds them; rows past ``n`` are padding, decoding one dummy token into a block of
  their own (:meth:`PagedKVCache.plan_static`), their logits dropped.
- **Inputs** (token ids, positions, the slots the new keys go to, block tables, lengths, each token's
  adapter slot per rank bucket and scale table) are copied into buffers allocated once for the largest
  bucket; a bucket's graph reads their first rows.
- **Attention** reads the paged cache in place (``kv_reads``): its kernels take lengths and blocks from the
  tables on the device; the number of splits per row is chosen for the longest row the tables can hold,
  and the kernel spreads a row's actual positions over them.
- **Adapters** go through the slot tables, each module running the ops that any adapter assigned to the
  tables uses there, whatever the step's rows hold: a row of another adapter changes slot indices, not
  which kernels run. Assigning the first adapter that uses an op in a module (or releasing the last),
  growing a rank bucket or wrapping more layers changes that, so every graph captured before is dropped
  and captured again on first use (:meth:`DecodeGraphs.decode` compares a signature each step). A fleet of
  LoRA adapters on the same modules changes it only as rank buckets grow.

Graphs are captured on first use of a bucket (a warm-up pass first, which compiles the triton kernels and
lets cuBLAS set up, then the capture) into one memory pool shared by every bucket. What the engine serves
through graphs is checked at start against eager steps on the loaded model (:meth:`DecodeGraphs.verify`).

With ``capture`` off the same buffers and passes run eagerly: the CPU tests use that to show that a
static step computes what an eager one does, and that its recorded operations are the same at every step
of a bucket, which is what makes a replay equal to running it again.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING

import torch

from peftserve.adapter_weights import AdapterWeights
from peftserve.batched_layers import BatchDeltas, RowDeltas
from peftserve.lora_kernels import NO_SLOT, TokenSlots
from peftserve.paged_attention import DecodeTables, hand_over, reading_in_place
from peftserve.slot_tables import BatchSlots

if TYPE_CHECKING:
    from peftserve.generation import ModelRunner

logger = logging.getLogger(__name__)

PADDING_SEQUENCE = -3  # the padding rows' sequence in the KV cache (never a request's id; the checks use -1, -2)

DecodeRow = tuple[int, int, AdapterWeights | None]  # (sequence id, its last token, its adapter)


def graph_batch_sizes(max_rows: int) -> list[int]:
    """The batch-size buckets: 1, 2, 4, 8, then every multiple of 8, up to ``max_rows`` (the last bucket
    is ``max_rows`` itself). A step of more than 8 rows is padded by at most 7."""
    sizes = [size for size in (1, 2, 4) if size < max_rows]
    sizes += list(range(8, max_rows, 8))
    return [*sizes, max_rows]


class CaptureFailed(RuntimeError):
    """Capturing a bucket's graph failed (memory, an operation a capture refuses): the step was not run and
    the cache is as before it, so the caller can run it eagerly."""


@dataclass
class _Captured:
    graph: torch.cuda.CUDAGraph
    logits: torch.Tensor  # (size, vocab): the graph's output, overwritten by each replay


class DecodeGraphs:
    """Static decoding steps for one :class:`ModelRunner` (whose layers compute every batch through slot
    tables and whose cache reads in place), captured as CUDA graphs when ``capture``."""

    def __init__(
        self,
        runner: ModelRunner,
        *,
        max_rows: int,
        longest_tokens: int,
        capture: bool,
        on_capture: Callable[[int], None] = lambda size: None,
    ) -> None:
        cache, path = runner.cache, runner.layers.slot_path
        if path is None or runner.layers.slots_from != 0:
            raise ValueError("static decoding steps need every batch's adapters in slot tables")
        if not cache.reads_in_place:
            raise ValueError("static decoding steps need the KV cache read in place")
        self.runner = runner
        self.sizes = graph_batch_sizes(max_rows)
        self.max_blocks = min(cache.blocks_for(longest_tokens), cache.usable_blocks - 1)
        self.capture = capture
        self.on_capture = on_capture  # told each bucket size captured (the engine's metrics)
        # Wraps each forward pass run eagerly (capture off); tests record the pass's operations with it.
        self.around_forward: Callable[[int], AbstractContextManager] = lambda size: nullcontext()
        self.steps: Counter[int] = Counter()  # decoding steps served, per bucket
        self.captures = 0
        device, rows = cache.device, self.sizes[-1]
        self._ids = torch.zeros(rows, 1, dtype=torch.long, device=device)
        self._positions = torch.zeros(rows, 1, dtype=torch.long, device=device)
        self._write = torch.zeros(rows, dtype=torch.long, device=device)
        self._block_table = torch.zeros(rows, self.max_blocks, dtype=torch.int32, device=device)
        self._lengths = torch.ones(rows, dtype=torch.int32, device=device)
        self._tables = {
            size: DecodeTables(
                self._block_table[:size], self._lengths[:size], cache.block_size, self.max_blocks * cache.block_size
            )
            for size in self.sizes
        }
        self._low_rank_slots: dict[int, torch.Tensor] = {}  # rank bucket -> (rows,) int32
        self._scale_slots = torch.zeros(rows, dtype=torch.int32, device=device)
        self._graphs: dict[int, _Captured] = {}
        self._signature: tuple | None = None
        self._pool = torch.cuda.graph_pool_handle() if capture else None
        cache.reserve(PADDING_SEQUENCE, 1)

    def close(self) -> None:
        """Free the graphs and the padding rows' block."""
        self._graphs.clear()
        self.runner.cache.release(PADDING_SEQUENCE)

    def serves(self, rows: Sequence[DecodeRow]) -> bool:
        """Whether a decoding step of these rows can run static: few enough rows, none longer than the
        tables hold, every adapter in its slots (the batch's deltas assigned them)."""
        cache, tables = self.runner.cache, self.runner.layers.slot_path.tables
        return (
            0 < len(rows) <= self.sizes[-1]
            and all(cache.blocks_of(sequence) <= self.max_blocks for sequence, _, _ in rows)
            and all(adapter is None or tables.slots_of(adapter) is not None for _, _, adapter in rows)
        )

    @torch.inference_mode()
    def decode(self, rows: Sequence[DecodeRow]) -> torch.Tensor:
        """One decoding step of ``rows`` (:meth:`serves` said yes); returns their next-token logits
        ``(rows, vocab)``, valid until the next step."""
        size = next(size for size in self.sizes if size >= len(rows))
        cache = self.runner.cache
        self._check_signature()
        plan = [(sequence, 1) for sequence, _, _ in rows]
        positions = [cache.length(sequence) for sequence, _, _ in rows]
        cache.plan_static(plan, self._tables[size], self._write[:size], PADDING_SEQUENCE)  # undone if it raises
        try:
            self._fill(rows, positions, size)
            if not self.capture:
                with self.around_forward(size):
                    logits = self._forward(size)
            else:
                captured = self._graphs.get(size)
                if captured is None:
                    try:
                        captured = self._capture(size)
                    except Exception as exc:
                        raise CaptureFailed(f"capturing the decoding graph of batch size {size} failed: {exc}") from exc
                captured.graph.replay()
                cache.bytes_written += size * cache.bytes_per_token  # what the replayed layers wrote
                logits = captured.logits
        except BaseException:
            cache.rewind(plan)
            raise
        finally:
            hand_over(None)
            reading_in_place(False)
        self.steps[size] += 1
        return logits[: len(rows)]

    def signature(self) -> tuple:
        """What a captured graph depends on beyond its buffers: the adapter stacks it reads (reallocated when a
        rank bucket is added or grows, which changes its capacity, or more layers are wrapped) and the ops it
        runs per module (those that any assigned adapter uses). A graph captured under another signature must
        not replay."""
        tables = self.runner.layers.slot_path.tables
        return (
            tables.ops_in_use_changes,
            tuple(tables.rank_capacity.items()),
            len(tables.modules),
            len(self.runner.layers.wrapped),
        )

    def _check_signature(self) -> None:
        """Drop every graph captured under another :meth:`signature`; make slot buffers for new rank buckets."""
        tables = self.runner.layers.slot_path.tables
        signature = self.signature()
        if signature == self._signature:
            return
        if self._graphs:
            logger.info(
                "adapter stacks or the ops in use changed: %d decoding graphs will be captured again", len(self._graphs)
            )
        self._graphs.clear()
        self._signature = signature
        for bucket in tables.rank_capacity:
            if bucket not in self._low_rank_slots:
                self._low_rank_slots[bucket] = torch.zeros_like(self._scale_slots)

    def _fill(self, rows: Sequence[DecodeRow], positions: list[int], size: int) -> None:
        """The step's inputs into the buffers; padding rows get token 0 at position 0 and no adapter."""
        tables = self.runner.layers.slot_path.tables
        slots = [tables.slots_of(adapter) if adapter is not None else None for _, _, adapter in rows]
        padding = [0] * (size - len(rows))
        columns = [[token for _, token, _ in rows] + padding, positions + padding]
        buckets = list(tables.rank_capacity)
        for bucket in buckets:
            columns.append([NO_SLOT if s is None else s.low_rank.get(bucket, NO_SLOT) for s in slots] + padding)
        columns.append([NO_SLOT if s is None else s.scale for s in slots] + padding)
        host = torch.tensor(columns, dtype=torch.long)  # one copy to the device for every small input
        device = host.to(self._ids.device, non_blocking=True)
        self._ids[:size, 0].copy_(device[0])
        self._positions[:size, 0].copy_(device[1])
        for bucket, values in zip(buckets, device[2:-1], strict=True):
            self._low_rank_slots[bucket][:size].copy_(values)
        self._scale_slots[:size].copy_(device[-1])

    def _forward(self, size: int) -> torch.Tensor:
        """The model over the buffers' first ``size`` rows (the cache planned already): ``(size, vocab)``."""
        runner, path = self.runner, self.runner.layers.slot_path
        tables = path.tables
        # Every slot counts as present: a module's op is skipped only where no adapter in the tables uses it
        # (the signature changes when that does), never for what this step's rows hold.
        indices = BatchSlots(
            low_rank={
                bucket: TokenSlots.build(self._low_rank_slots[bucket][:size], capacity + 1, without_sort=True)
                for bucket, capacity in tables.rank_capacity.items()
            },
            low_rank_present={bucket: set(range(1, capacity + 1)) for bucket, capacity in tables.rank_capacity.items()},
            scale=TokenSlots.build(self._scale_slots[:size], tables.scale_capacity + 1, without_sort=True)
            if tables.scale_capacity
            else None,
            scale_present=set(range(1, tables.scale_capacity + 1)),
        )
        for name, layer in runner.layers.wrapped.items():
            layer.rows = RowDeltas(size, through_slots=partial(path.forward, name, indices=indices))
        return runner.model(
            input_ids=self._ids[:size],
            position_ids=self._positions[:size],
            attention_mask=None,
            use_cache=True,
            logits_to_keep=1,
            **{runner.cache_argument: runner.cache},
        ).logits[:, -1]

    def _capture(self, size: int) -> _Captured:
        """Warm up, then capture the bucket's step (the cache is planned for this step: the warm-up writes
        its keys and values, which the replay that follows writes again)."""
        cache = self.runner.cache
        written = cache.bytes_written
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            self._forward(size)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        # One pool for every bucket: a later capture may reuse what an earlier one freed, which is safe because
        # replays never overlap and each replay's logits are read before the next replay.
        # thread_local: loader threads may copy adapters to the device meanwhile; they are not in the graph.
        with torch.cuda.graph(graph, pool=self._pool, capture_error_mode="thread_local"):
            logits = self._forward(size)
        cache.bytes_written = written
        self.captures += 1
        self.on_capture(size)
        logger.info("captured the decoding graph of batch size %d", size)
        self._graphs[size] = captured = _Captured(graph, logits)
        return captured

    @torch.inference_mode()
    def verify(self, *, prompt_tokens: int = 12) -> str | None:
        """Compare static steps with eager ones on the loaded model; returns None if they agree, else why
        not. Rows A and B prefill, then decode three steps: A and B (captures the bucket of 2), A and B again
        (replays it at other lengths and tokens), B alone (the bucket of 1); with one running row at most,
        A, A again, then B."""
        runner, cache = self.runner, self.runner.cache
        deltas = BatchDeltas(runner.layers, [])
        length, ids_a, ids_b = runner._check_inputs(prompt_tokens, seed=2, after_a=3, b_tokens=8)
        a, b = -1, -2
        try:
            cache.reserve(a, length + 3)
            cache.reserve(b, 8)
            for sequence, ids in ((a, ids_a[:, :length]), (b, ids_b[:, :5])):
                prompt = [(sequence, ids.shape[1])]
                runner._forward(prompt, deltas, cache.plan(prompt, ids.shape[1]), input_ids=ids,
                                positions=torch.arange(ids.shape[1])[None], logits_to_keep=1)  # fmt: skip
            pair = [a, b][: self.sizes[-1]]
            given = {a: ids_a[0, length:].tolist(), b: ids_b[0, 5:].tolist()}  # each row's next tokens
            for sequences in (pair, pair, [b]):
                step = [(sequence, given[sequence].pop(0)) for sequence in sequences]
                plan = [(sequence, 1) for sequence, _ in step]
                positions = torch.tensor([[cache.length(sequence)] for sequence, _ in step])
                ids = torch.tensor([[token] for _, token in step], device=cache.device)
                mask = cache.plan(plan, 1)
                eager = runner._forward(plan, deltas, mask, input_ids=ids, positions=positions, logits_to_keep=1)
                cache.rewind(plan)
                static = self.decode([(sequence, token, None) for sequence, token in step])
                error = runner.check_error(static, eager[:, -1])
                if error is not None:
                    return f"a static step of {len(step)} rows differed from an eager one by {error:.2g}"
        except Exception as exc:  # noqa: BLE001 - any failure keeps eager steps
            return f"a static decoding step failed ({type(exc).__name__}: {exc})"
        finally:
            cache.release(a)
            cache.release(b)
            self.steps.clear()
        return None
