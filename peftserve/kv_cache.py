"""A paged key/value cache: fixed-size blocks, a block table per sequence, admission by free blocks.

Why paged: the running batch changes every few steps (requests join, finish, are cancelled). With one
padded tensor per layer, every join re-pads and concatenates the whole cache and every step appends by
reallocation, so the bytes copied grow with the cache and peak memory doubles on a join. Here the storage
is allocated once; a step writes only its new tokens into their slots, and a join or a leave changes
block tables, never the storage.

Reading: transformers' attention layers call :meth:`PagedKVCache.update` with the step's new keys and
values (the same hook a ``DynamicCache`` serves). The new tokens are written into their slots, then each
row's keys are read back right-aligned into a ``(rows, heads, kv_length, head_dim)`` view for the
attention kernel, with a 2-D mask marking the real positions, so every model family builds its masks
(causal, sliding window, ALiBi) from that mask as it does for a left-padded batch. That read is a
transient gather, freed with the layer's attention. Decoding and packed passes can instead read the blocks
in place (:attr:`PagedKVCache.reads_in_place`, :mod:`peftserve.paged_attention`): the layer writes its new
tokens and hands the block tables to a kernel that reads the pool where it is, so a pass copies nothing of
the cache.

Memory is reserved per sequence for its whole life (prompt, virtual tokens, prefix and ``max_tokens``) when
it is admitted, so a running batch never runs out of blocks mid-generation; a request that does not fit
waits, one that could never fit is refused.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from peftserve.paged_attention import (
    DecodeTables,
    InPlaceRead,
    PackedTables,
    hand_over,
    packed_tiles,
    reading_in_place,
)


@dataclass(frozen=True)
class LayerShape:
    """What one attention layer caches per token: (heads, width) of its keys and of its values. Most models
    cache ``num_key_value_heads`` x ``head_dim`` for both; latent attention (DeepSeek) caches other shapes."""

    keys: tuple[int, int]
    values: tuple[int, int]

    def elements(self) -> int:
        return self.keys[0] * self.keys[1] + self.values[0] * self.values[1]


class _ShapeProbe:
    """A stand-in cache for one forward pass of one token: records what each layer would store."""

    is_compileable = False

    def __init__(self) -> None:
        self.shapes: dict[int, LayerShape] = {}

    def update(self, key_states, value_states, layer_idx: int, *args: Any, **kwargs: Any):
        self.shapes[layer_idx] = LayerShape(
            (key_states.shape[1], key_states.shape[-1]), (value_states.shape[1], value_states.shape[-1])
        )
        return key_states, value_states

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return 0

    def get_query_offset(self, layer_idx: int = 0) -> int:
        return 0

    def get_mask_sizes(self, query_length: int, layer_idx: int = 0) -> tuple[int, int]:
        return query_length, 0


@torch.inference_mode()
def probe_layer_shapes(model: torch.nn.Module, cache_argument: str) -> dict[int, LayerShape]:
    """Run one token through ``model`` to learn what every layer caches (layers that cache nothing, such as
    linear-attention layers, are absent). Reading the config instead gets latent and multi-query caches wrong."""
    probe = _ShapeProbe()
    device = next(model.parameters()).device
    ids = torch.zeros(1, 1, dtype=torch.long, device=device)
    model(input_ids=ids, attention_mask=torch.ones_like(ids), position_ids=torch.zeros_like(ids), use_cache=True,
          logits_to_keep=1, **{cache_argument: probe})  # fmt: skip
    if not probe.shapes:
        raise ValueError(f"{type(model).__name__} cached no keys or values in a forward pass")
    return probe.shapes


@dataclass(frozen=True)
class PackedLayout:
    """Who owns each query token and each key of a packed pass (an index into its rows), and at which
    position of its sequence; the masks of every attention kind are built from these."""

    query_owner: torch.Tensor  # (T,)
    query_position: torch.Tensor  # (T,)
    key_owner: torch.Tensor  # (K,)
    key_position: torch.Tensor  # (K,)

    def allowed(self, sliding_window: int | None = None) -> torch.Tensor:
        """``(1, 1, T, K)`` bool: a token sees the keys of its own sequence up to its own position (and, with a
        sliding window, only the last ``sliding_window`` of them, itself included, as transformers counts)."""
        before = self.query_position[:, None] - self.key_position[None, :]
        allowed = (self.query_owner[:, None] == self.key_owner[None, :]) & (before >= 0)
        if sliding_window is not None:
            allowed &= before < sliding_window
        return allowed[None, None]


def _positions_within(owner: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """For entries laid out in runs of ``counts`` (``owner`` = their run), each entry's index in its run."""
    starts = torch.cumsum(counts, 0) - counts
    return torch.arange(owner.shape[0], device=owner.device) - starts[owner]


@dataclass
class _Sequence:
    blocks: list[int]
    slots: torch.Tensor  # every slot of its blocks, in token order (on the cache's device)
    block_ids: torch.Tensor  # its blocks, int32, on the cache's device (a row of a decoding block table)
    length: int = 0  # tokens written so far


def _block_table(sequences: list[_Sequence]) -> torch.Tensor:
    """``(rows, most blocks)`` int32: each sequence's blocks in order, padded with block 0."""
    return torch.nn.utils.rnn.pad_sequence([sequence.block_ids for sequence in sequences], batch_first=True)


@dataclass
class _Plan:
    """Where the rows of one forward pass write and read (built once, used by every layer)."""

    valid: torch.Tensor | None  # (new_tokens,) flat indices into the (rows * query_length) new keys; None: all
    write: torch.Tensor  # (new_tokens,) slots they go to
    read: torch.Tensor | None  # (rows, kv_length) slots read back, right-aligned (padding reads the zero slot)
    query_length: int
    kv_length: int
    tables: DecodeTables | PackedTables | None = None  # set instead of ``read`` where attention reads in place


class PagedKVCache:
    """Block pool for every layer of one model; sequences are identified by an integer the caller picks.

    Slot ``s`` of a layer lives at ``storage[layer][0][s]`` (keys) and ``storage[layer][1][s]`` (values).
    Block 0 is never handed out: its slots stay zero and serve as the padding that right-aligned reads
    point at.
    """

    is_compileable = False

    def __init__(
        self,
        *,
        layer_shapes: dict[int, LayerShape],
        num_blocks: int,
        block_size: int,
        dtype: torch.dtype,
        device: torch.device,
    ) -> None:
        if num_blocks < 2:
            raise ValueError(f"a paged KV cache needs at least 2 blocks, got {num_blocks}")
        self.block_size = block_size
        self.num_blocks = num_blocks
        self.bytes_per_token = self.token_bytes(layer_shapes, dtype)
        slots = num_blocks * block_size
        self.storage = {
            layer: tuple(torch.zeros(slots, *side, dtype=dtype, device=device) for side in (shape.keys, shape.values))
            for layer, shape in layer_shapes.items()
        }
        self.device = device
        self._free = list(range(num_blocks - 1, 0, -1))  # pop() hands out low blocks first
        self._sequences: dict[int, _Sequence] = {}
        self._plan: _Plan | None = None
        self.bytes_written = 0  # every byte a layer wrote into the storage (tests count it per step)
        self.bytes_gathered = 0  # every byte a layer copied out of it for a dense read
        # Set by the engine once passes read in place matched gathered ones on the model.
        self.reads_in_place = False

    @staticmethod
    def token_bytes(layer_shapes: dict[int, LayerShape], dtype: torch.dtype) -> int:
        """Bytes one token takes in the cache, over every layer."""
        return sum(shape.elements() for shape in layer_shapes.values()) * torch.empty((), dtype=dtype).element_size()

    @property
    def free_blocks(self) -> int:
        return len(self._free)

    @property
    def usable_blocks(self) -> int:
        return self.num_blocks - 1

    def blocks_for(self, tokens: int) -> int:
        return max(1, math.ceil(tokens / self.block_size))

    def reserve(self, sequence_id: int, tokens: int) -> None:
        """Hand ``sequence_id`` the blocks for ``tokens`` tokens (its whole life); raises if they are not free."""
        needed = self.blocks_for(tokens)
        if needed > len(self._free):
            raise MemoryError(f"{needed} KV blocks needed, {len(self._free)} free")
        if sequence_id in self._sequences:
            raise ValueError(f"sequence {sequence_id} already holds blocks")
        blocks = [self._free.pop() for _ in range(needed)]
        offsets = torch.arange(self.block_size)
        block_ids = torch.tensor(blocks, dtype=torch.int32)
        slots = (block_ids[:, None].long() * self.block_size + offsets).flatten().to(self.device)
        self._sequences[sequence_id] = _Sequence(blocks, slots, block_ids.to(self.device))

    def release(self, sequence_id: int) -> None:
        """Give a finished sequence's blocks back (idempotent)."""
        sequence = self._sequences.pop(sequence_id, None)
        if sequence is not None:
            self._free.extend(reversed(sequence.blocks))

    def length(self, sequence_id: int) -> int:
        return self._sequences[sequence_id].length

    def write_prefix(self, sequence_id: int, prefix_kv: torch.Tensor) -> None:
        """Store prefix-tuning keys/values, shape ``(layers, 2, heads, tokens, head_dim)``, as the first tokens."""
        sequence = self._sequences[sequence_id]
        if sequence.length:
            raise ValueError("a prefix goes before every other token of its sequence")
        tokens = prefix_kv.shape[3]
        slots = sequence.slots[:tokens]
        for layer, (keys, values) in self.storage.items():
            keys[slots] = prefix_kv[layer, 0].transpose(0, 1).to(keys.dtype)
            values[slots] = prefix_kv[layer, 1].transpose(0, 1).to(values.dtype)
        sequence.length = tokens
        self.bytes_written += tokens * self.bytes_per_token

    def _claim(self, rows: list[tuple[int, int]]) -> tuple[list[_Sequence], torch.Tensor]:
        """Advance each row's sequence by its ``n`` new tokens (all rows or, if one outgrew its blocks, none);
        returns the sequences and the slots the new tokens go to, in row order."""
        sequences = [self._sequences[sequence_id] for sequence_id, _ in rows]
        for sequence, (sequence_id, new) in zip(sequences, rows, strict=True):
            if sequence.length + new > len(sequence.slots):
                raise MemoryError(f"sequence {sequence_id} outgrew the KV blocks reserved for it")
        writes = []
        for sequence, (_, new) in zip(sequences, rows, strict=True):
            writes.append(sequence.slots[sequence.length : sequence.length + new])
            sequence.length += new
        return sequences, torch.cat(writes)

    def plan(self, rows: list[tuple[int, int]], query_length: int) -> torch.Tensor | None:
        """Prepare a forward pass in which row ``b`` = ``(sequence_id, n)`` adds ``n`` tokens, right-aligned in
        ``query_length`` query positions; returns the 2-D attention mask ``(rows, kv_length)``, or None for a
        decoding pass read in place (its kernel takes each row's length from the tables instead).

        The work is per row, never per cached token: each sequence's slots were laid out when its blocks
        were reserved, and the read index is one gather from them."""
        sequences, writes = self._claim(rows)
        valid = []  # each row's new tokens are the last ``new`` of its ``query_length`` positions
        for b, (_, new) in enumerate(rows):
            valid.extend(range((b + 1) * query_length - new, (b + 1) * query_length))
        lengths = torch.tensor([sequence.length for sequence in sequences], device=self.device)
        kv_length = max(sequence.length for sequence in sequences)
        read, tables, mask = None, None, None
        if self.reads_in_place and query_length == 1:
            tables = DecodeTables(_block_table(sequences), lengths.to(torch.int32), self.block_size, kv_length)
        else:
            offsets = torch.arange(kv_length, device=self.device)[None, :] - (kv_length - lengths)[:, None]
            present = offsets >= 0
            table = torch.nn.utils.rnn.pad_sequence([sequence.slots for sequence in sequences], batch_first=True)
            read = table.gather(1, offsets.clamp(min=0)).masked_fill(~present, 0)  # slot 0: block 0, always zero
            mask = present.long()
        self._plan = _Plan(
            valid=torch.tensor(valid, device=self.device),
            write=writes,
            read=read,
            query_length=query_length,
            kv_length=kv_length,
            tables=tables,
        )
        reading_in_place(tables is not None)
        return mask

    def plan_static(self, rows: list[tuple[int, int]], tables: DecodeTables, write: torch.Tensor, padding: int) -> None:
        """Prepare a decoding pass read in place whose tensors are fixed buffers (a CUDA graph replays the
        kernels that read them: :mod:`peftserve.decode_graphs`). Row ``b`` = ``(sequence_id, 1)``; rows past
        ``len(rows)`` up to the buffers' size are padding: sequence ``padding`` writes and reads its first
        slot there. ``tables.longest`` is the buffers' capacity, not the rows' longest, so that everything a
        layer derives from it on the host stays the same from step to step."""
        if any(new != 1 for _, new in rows):
            raise ValueError("a static decoding pass adds one token per row")
        sequences, writes = self._claim(rows)
        count, pad = len(rows), self._sequences[padding]
        try:
            block_table = _block_table(sequences)
            write[:count].copy_(writes)
            write[count:].fill_(int(pad.blocks[0]) * self.block_size)
            tables.block_table[:count, : block_table.shape[1]].copy_(block_table)
            tables.block_table[count:, 0].fill_(pad.blocks[0])
            lengths = torch.tensor([sequence.length for sequence in sequences], dtype=torch.int32)
            tables.lengths[:count].copy_(lengths, non_blocking=True)
            tables.lengths[count:].fill_(1)
        except BaseException:
            self.rewind(rows)
            raise
        self._plan = _Plan(valid=None, write=write, read=None, query_length=1, kv_length=tables.longest, tables=tables)
        reading_in_place(True)

    def blocks_of(self, sequence_id: int) -> int:
        return len(self._sequences[sequence_id].blocks)

    def plan_packed(self, rows: list[tuple[int, int]]) -> PackedLayout:
        """Prepare a packed forward pass: one sequence of every row's new tokens in order (row ``b`` =
        ``(sequence_id, n)`` adds ``n``), attending to one row of keys, every row's keys so far in order.
        Returns who owns each query and key and at which position, for the caller to build the masks (causal,
        sliding) it needs. No padding: a decoding row and a prompt chunk share the pass at their own sizes."""
        sequences, writes = self._claim(rows)
        new = torch.tensor([n for _, n in rows], device=self.device)
        after = torch.tensor([sequence.length for sequence in sequences], device=self.device)
        owners = torch.arange(len(rows), device=self.device)
        kv_length = sum(sequence.length for sequence in sequences)
        read, tables = None, None
        if self.reads_in_place:
            block_m = 16 if max(n for _, n in rows) <= 16 else 64
            runs = [
                (b, n, sequence.length - n) for b, ((_, n), sequence) in enumerate(zip(rows, sequences, strict=True))
            ]
            tiles = packed_tiles(runs, block_m, self.device)
            tables = PackedTables(_block_table(sequences), tiles, block_m, self.block_size)
        else:
            read = torch.cat([sequence.slots[: sequence.length] for sequence in sequences])[None]
        self._plan = _Plan(
            valid=None,
            write=writes,
            read=read,
            query_length=sum(n for _, n in rows),
            kv_length=kv_length,
            tables=tables,
        )
        reading_in_place(tables is not None)
        query_owner, key_owner = owners.repeat_interleave(new), owners.repeat_interleave(after)
        return PackedLayout(
            query_owner=query_owner,
            query_position=_positions_within(query_owner, new) + (after - new)[query_owner],
            key_owner=key_owner,
            key_position=_positions_within(key_owner, after),
        )

    def rewind(self, rows: list[tuple[int, int]]) -> None:
        """Undo :meth:`plan` for a forward pass that failed, so the rows can be run again."""
        for sequence_id, new in rows:
            if sequence_id in self._sequences:
                self._sequences[sequence_id].length -= new
        self._plan = None

    # The part of transformers' cache interface that attention layers and mask builders call.
    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Write the new keys/values ``(rows, heads, query_length, head_dim)`` of ``layer_idx`` into their slots
        and return every row's keys/values so far, right-aligned: ``(rows, heads, kv_length, head_dim)``; for
        a pass that reads in place, return the new ones as they came and hand the pool to the attention."""
        plan, storage = self._plan, self.storage[layer_idx]
        rows, _, query_length, _ = key_states.shape
        read = []
        for states, cached in zip((key_states, value_states), storage, strict=True):
            if (states.shape[1], states.shape[-1]) != tuple(cached.shape[1:]):
                raise ValueError(
                    f"layer {layer_idx} produced states of shape {tuple(states.shape)}; the KV cache holds "
                    f"{tuple(cached.shape[1:])} per token"
                )
            new = states.transpose(1, 2).reshape(rows * query_length, *cached.shape[1:])
            if plan.valid is not None:
                new = new.index_select(0, plan.valid)
            cached.index_copy_(0, plan.write, new.to(cached.dtype))
            self.bytes_written += new.numel() * cached.element_size()
            if plan.read is None:
                continue
            # index_select over the flat read index, not ``cached[plan.read]``: on CPU the advanced-indexing
            # kernel took 3.5x as long for 16 rows of 400 keys (332 us against 95 us, 2 threads).
            gathered = cached.index_select(0, plan.read.view(-1)).view(*plan.read.shape, *cached.shape[1:])
            self.bytes_gathered += gathered.numel() * gathered.element_size()
            read.append(gathered.to(states.dtype).transpose(1, 2))
        if plan.tables is not None:
            hand_over(InPlaceRead(key_states, *storage, plan.tables))
            return key_states, value_states
        hand_over(None)
        return read[0], read[1]

    def get_seq_length(self, layer_idx: int = 0) -> int:
        plan = self._plan
        return 0 if plan is None else plan.kv_length - plan.query_length

    def get_query_offset(self, layer_idx: int = 0) -> int:
        return self.get_seq_length(layer_idx)

    def get_mask_sizes(self, query_length: int, layer_idx: int = 0) -> tuple[int, int]:
        return (query_length if self._plan is None else self._plan.kv_length), 0
