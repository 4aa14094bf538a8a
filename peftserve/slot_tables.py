"""Adapters resident on the device in preallocated per-module stacks, addressed by a slot per token.

Each wrapped module gets, once: for every rank bucket (powers of two, 8 and up) an A stack
``(slots, in, R)`` and a B stack ``(slots, R, out)`` (a smaller rank is zero-padded, which adds exact
zeros), and input/output scale tables ``(slots, features)`` with a bias flag per slot. Slot
:data:`~peftserve.lora_kernels.NO_SLOT` of every stack is the identity (zeros, ones). A released slot keeps
its adapter's values until the slot is assigned again, when :meth:`SlotTables.assign` overwrites them or, in a
module the new adapter leaves alone, resets them: no token names a free slot, and with many distinct adapters
(one per customer) slots turn over every few steps, where resetting on release as well cost ~12% of the
serving loop (demo, 1,000 distinct adapters, in process).

Assigning an adapter writes its weights into one slot per rank bucket it uses and one scale slot; after
that a batch joining or leaving only changes the per-token slot indices (:meth:`SlotTables.indices`),
and every op reads the stacks through them (:mod:`peftserve.lora_kernels`). Memory is taken when a module
or a rank bucket is added, never per adapter or per batch (:attr:`SlotTables.nbytes`, for the adapter
cache's accounting).
"""

from __future__ import annotations

import weakref
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.nn import functional as F

from peftserve.adapter_weights import AdapterWeights, ModuleDelta, linear_features, linear_weight
from peftserve.errors import CacheFullError, ConfigError, UnsupportedAdapterError
from peftserve.lora_kernels import NO_SLOT, LoraKernels, TokenSlots

SMALLEST_RANK_BUCKET = 8


def rank_bucket(rank: int) -> int:
    """The stack a rank is padded into: the power of two covering it, at least 8."""
    return max(SMALLEST_RANK_BUCKET, 1 << (rank - 1).bit_length())


def rank_buckets_of(adapter: AdapterWeights) -> set[int]:
    """The rank buckets an adapter's low-rank pairs need a slot in."""
    return {rank_bucket(delta.lora_a.shape[1]) for delta in adapter.modules.values() if delta.lora_a is not None}


@dataclass(frozen=True)
class AdapterSlots:
    """Where one assigned adapter lives: its slot in each rank bucket it uses, and its scale slot."""

    low_rank: Mapping[int, int]  # rank bucket -> slot
    scale: int = NO_SLOT  # NO_SLOT when none of its modules scales


@dataclass
class ModuleStacks:
    """One wrapped module's stacks, and which slots hold something other than the identity in it (kept on
    the host, so a batch skips the ops that would only apply identities without reading the device)."""

    a: dict[int, torch.Tensor]  # rank bucket -> (slots, in, R)
    b: dict[int, torch.Tensor]  # rank bucket -> (slots, R, out)
    in_scale: torch.Tensor  # (scale slots, in)
    out_scale: torch.Tensor  # (scale slots, out)
    bias_scaled: torch.Tensor  # (scale slots,) bool: IA3 scales the bias with the output, DoRA does not
    low_rank_slots: dict[int, set[int]] = field(default_factory=dict)
    in_scaled_slots: set[int] = field(default_factory=set)
    out_scaled_slots: set[int] = field(default_factory=set)
    # Slots whose values are not the identity, assigned or released since: (rank bucket, slot) for the
    # low-rank stacks, ("in" | "out", slot) for the scale tables.
    written: set[tuple[int | str, int]] = field(default_factory=set)

    def tensors(self) -> list[torch.Tensor]:
        return [*self.a.values(), *self.b.values(), self.in_scale, self.out_scale, self.bias_scaled]


@dataclass(frozen=True)
class BatchSlots:
    """The per-token slot indices of one batch, per rank bucket and for the scale tables, with the slots
    present (host-side sets, for skipping modules none of the batch's adapters touch)."""

    low_rank: dict[int, TokenSlots]
    low_rank_present: dict[int, set[int]]
    scale: TokenSlots | None
    scale_present: set[int]


class SlotTables:
    """Preallocated adapter stacks for a fixed set of linear-like modules.

    ``rank_capacity`` maps each rank bucket to how many adapters it holds at once; ``scale_capacity`` is
    how many adapters with scaling vectors (IA3, DoRA) are held at once. An adapter is assigned once
    (by identity); whoever releases it must know that no batch in flight still uses it
    (:class:`peftserve.slot_path.SlotPath` keeps leases for that).
    """

    def __init__(
        self,
        modules: Mapping[str, nn.Module],
        *,
        rank_capacity: Mapping[int, int],
        scale_capacity: int,
        dtype: torch.dtype | None = None,
        device: torch.device | None = None,
    ) -> None:
        if scale_capacity < 0:
            raise ConfigError(f"scale_capacity must be 0 or more, got {scale_capacity}")
        self.rank_capacity: dict[int, int] = {}
        self.scale_capacity = scale_capacity
        self.modules: dict[str, ModuleStacks] = {}
        self._dtype, self._device = dtype, device
        self._free: dict[int | None, list[int]] = {None: list(range(scale_capacity, 0, -1))}  # None: scales
        # id(adapter) -> a weak reference to it and its slots. Weak: slots must not keep an adapter alive that
        # the adapter cache has evicted (its memory, device memory on a GPU, is no longer counted), nor its
        # tracked objects for the garbage collector to walk; a dropped adapter's slots are freed lazily
        # (release_dropped), and an id whose adapter is gone names nothing.
        self._assigned: dict[int, tuple[weakref.ref[AdapterWeights], AdapterSlots]] = {}
        self.generation = 0  # counts bucket growths: indices built before one name the old stack sizes
        # Counts the times an op of a module (a rank bucket's pair, an input or output scale) went from no
        # assigned slot to one, or back: what decides which ops a batch can skip whatever its rows.
        self.ops_in_use_changes = 0
        self.add_modules(modules)
        for bucket, capacity in sorted(rank_capacity.items()):
            self.add_bucket(bucket, capacity)

    def new_stacks(self, modules: Mapping[str, nn.Module]) -> dict[str, ModuleStacks]:
        """Stacks for the modules not held yet, allocated without touching the tables, so that a caller can
        allocate outside the locks that guard them; :meth:`add_modules` takes them in."""
        capacity = dict(self.rank_capacity)  # a snapshot: buckets added meanwhile are allocated when added
        return {name: self._stacks_of(module, capacity) for name, module in modules.items() if name not in self.modules}

    def add_modules(self, modules: Mapping[str, nn.Module], prepared: Mapping[str, ModuleStacks] | None = None) -> None:
        """Take in the stacks of modules wrapped after construction (``prepared`` by :meth:`new_stacks`, or
        allocated here). Their rows start as identities for every adapter assigned so far, which is right: none
        of those targets a module not wrapped then."""
        for name, module in modules.items():
            if name in self.modules:
                continue
            stacks = (prepared or {}).get(name) or self._stacks_of(module, {})
            for bucket, capacity in self.rank_capacity.items():  # buckets added or grown since it was prepared
                if bucket not in stacks.a or len(stacks.a[bucket]) != capacity + 1:
                    self._allocate_bucket(stacks, bucket, capacity)
            self.modules[name] = stacks

    def _stacks_of(self, module: nn.Module, rank_capacity: Mapping[int, int]) -> ModuleStacks:
        weight = linear_weight(module)
        dtype, device = self._dtype or weight.dtype, self._device or weight.device
        features_in, features_out = linear_features(module)
        scale_slots = self.scale_capacity + 1
        stacks = ModuleStacks(
            a={},
            b={},
            in_scale=torch.ones(scale_slots, features_in, dtype=dtype, device=device),
            out_scale=torch.ones(scale_slots, features_out, dtype=dtype, device=device),
            bias_scaled=torch.zeros(scale_slots, dtype=torch.bool, device=device),
        )
        for bucket, capacity in rank_capacity.items():
            self._allocate_bucket(stacks, bucket, capacity)
        return stacks

    def add_bucket(self, bucket: int, capacity: int) -> None:
        """Allocate a rank bucket of ``capacity`` slots in every module (for ranks first seen after start)."""
        if rank_bucket(bucket) != bucket or capacity < 1:
            raise ConfigError(
                f"rank buckets are powers of two from {SMALLEST_RANK_BUCKET} with 1 or more slots, got {capacity} "
                f"slots of rank {bucket}"
            )
        if bucket in self.rank_capacity:
            raise ConfigError(f"rank bucket {bucket} exists already")
        self.rank_capacity = dict(sorted({**self.rank_capacity, bucket: capacity}.items()))
        self._free[bucket] = list(range(capacity, 0, -1))
        for stacks in self.modules.values():
            self._allocate_bucket(stacks, bucket, capacity)

    def grow_bucket(self, bucket: int, capacity: int) -> None:
        """Enlarge a rank bucket to ``capacity`` slots in every module, every assigned slot kept where it is.

        Buckets start small and grow as distinct adapters arrive, so a bucket's memory follows its use: one
        slot of a rank-256 bucket on a Llama-3-8B shape is ~1.3 GB in bf16. Indices built before a growth
        are stale (:attr:`generation` tells), the slots they name are not.
        """
        old = self.rank_capacity[bucket]
        if capacity <= old:
            return
        for stacks in self.modules.values():
            for side in (stacks.a, stacks.b):
                grown = side[bucket].new_zeros(capacity + 1, *side[bucket].shape[1:])
                grown[: old + 1] = side[bucket]
                side[bucket] = grown
        self.rank_capacity[bucket] = capacity
        self._free[bucket] = [*range(capacity, old, -1), *self._free[bucket]]
        self.generation += 1

    def free_slots(self, bucket: int) -> int:
        """Unassigned slots of a rank bucket."""
        return len(self._free[bucket])

    @staticmethod
    def _allocate_bucket(stacks: ModuleStacks, bucket: int, capacity: int) -> None:
        like = stacks.in_scale
        features_in, features_out = like.shape[1], stacks.out_scale.shape[1]
        stacks.a[bucket] = like.new_zeros(capacity + 1, features_in, bucket)
        stacks.b[bucket] = like.new_zeros(capacity + 1, bucket, features_out)
        stacks.low_rank_slots[bucket] = set()

    @property
    def nbytes(self) -> int:
        """Bytes of every stack and table; changes when modules or buckets are added, never on assignment."""
        return sum(t.numel() * t.element_size() for stacks in self.modules.values() for t in stacks.tensors())

    def slots_of(self, adapter: AdapterWeights) -> AdapterSlots | None:
        entry = self._assigned.get(id(adapter))
        return None if entry is None or entry[0]() is not adapter else entry[1]

    def assign(self, adapter: AdapterWeights) -> AdapterSlots:
        """Write ``adapter`` into free slots (checked first: a refusal changes nothing); idempotent."""
        assigned = self.slots_of(adapter)
        if assigned is not None:
            return assigned
        if id(adapter) in self._assigned:  # an adapter dropped since, whose id this one now has
            self._free_entry(id(adapter))
        unknown = sorted(set(adapter.modules) - set(self.modules))
        if unknown:
            raise UnsupportedAdapterError(f"the slot tables hold no stacks for modules {unknown}")
        buckets = rank_buckets_of(adapter)
        missing = sorted(bucket for bucket in buckets if bucket not in self.rank_capacity)
        if missing:
            have = list(self.rank_capacity)
            raise UnsupportedAdapterError(f"its ranks need rank buckets {missing}; the slot tables have {have}")
        scaled = any(d.in_scale is not None or d.out_scale is not None for d in adapter.modules.values())
        needed: list[int | None] = [*sorted(buckets), *([None] if scaled else [])]
        for space in needed:
            if not self._free[space]:
                what = "scale tables" if space is None else f"rank bucket {space}"
                capacity = self.scale_capacity if space is None else self.rank_capacity[space]
                raise CacheFullError(f"all {capacity} slots of the {what} are assigned; release an adapter first")
        taken = {space: self._free[space].pop() for space in needed}
        slots = AdapterSlots({bucket: taken[bucket] for bucket in buckets}, taken.get(None, NO_SLOT))
        for name, stacks in self.modules.items():
            self._write(stacks, adapter.modules.get(name), slots)
        self._assigned[id(adapter)] = (weakref.ref(adapter), slots)
        return slots

    def _write(self, stacks: ModuleStacks, delta: ModuleDelta | None, slots: AdapterSlots) -> None:
        """Write one module's part of an adapter into its slots, and reset to the identity whatever an earlier
        adapter left in those slots that this one does not overwrite (its padding columns included)."""
        delta = delta or ModuleDelta()
        bucket_written = None
        if delta.lora_a is not None:
            rank = delta.lora_a.shape[1]
            bucket_written = rank_bucket(rank)
            slot = slots.low_rank[bucket_written]
            a, b = stacks.a[bucket_written][slot], stacks.b[bucket_written][slot]
            a[:, :rank] = delta.lora_a
            b[:rank] = delta.lora_b
            if rank < bucket_written and (bucket_written, slot) in stacks.written:
                a[:, rank:] = 0
                b[rank:] = 0
            stacks.written.add((bucket_written, slot))
            self._use(stacks.low_rank_slots[bucket_written], slot)
        for bucket, slot in slots.low_rank.items():
            if bucket != bucket_written and (bucket, slot) in stacks.written:
                stacks.a[bucket][slot] = 0
                stacks.b[bucket][slot] = 0
                stacks.written.discard((bucket, slot))
        if delta.in_scale is not None:
            stacks.in_scale[slots.scale] = delta.in_scale
            stacks.written.add(("in", slots.scale))
            self._use(stacks.in_scaled_slots, slots.scale)
        elif ("in", slots.scale) in stacks.written:
            stacks.in_scale[slots.scale] = 1
            stacks.written.discard(("in", slots.scale))
        if delta.out_scale is not None:
            stacks.out_scale[slots.scale] = delta.out_scale
            stacks.bias_scaled[slots.scale] = delta.scales_bias
            stacks.written.add(("out", slots.scale))
            self._use(stacks.out_scaled_slots, slots.scale)
        elif ("out", slots.scale) in stacks.written:
            stacks.out_scale[slots.scale] = 1
            stacks.bias_scaled[slots.scale] = False
            stacks.written.discard(("out", slots.scale))

    def _use(self, assigned: set[int], slot: int) -> None:
        self.ops_in_use_changes += not assigned
        assigned.add(slot)

    def _unuse(self, assigned: set[int], slot: int) -> None:
        assigned.discard(slot)
        self.ops_in_use_changes += not assigned

    def release(self, adapter: AdapterWeights) -> None:
        """Free the adapter's slots (nothing happens if not assigned); their values stay until reassigned."""
        if self.slots_of(adapter) is not None:
            self._free_entry(id(adapter))

    def release_dropped(self) -> None:
        """Free the slots of assigned adapters that nothing else holds any more."""
        for key in [key for key, (ref, _) in self._assigned.items() if ref() is None]:
            self._free_entry(key)

    def _free_entry(self, key: int) -> None:
        slots = self._assigned.pop(key)[1]
        for stacks in self.modules.values():
            for bucket, slot in slots.low_rank.items():
                if slot in stacks.low_rank_slots[bucket]:
                    self._unuse(stacks.low_rank_slots[bucket], slot)
            if slots.scale in stacks.in_scaled_slots:
                self._unuse(stacks.in_scaled_slots, slots.scale)
            if slots.scale in stacks.out_scaled_slots:
                self._unuse(stacks.out_scaled_slots, slots.scale)
        for bucket, slot in slots.low_rank.items():
            self._free[bucket].append(slot)
        if slots.scale != NO_SLOT:
            self._free[None].append(slots.scale)

    def indices(self, row_adapters: Sequence[AdapterWeights | None], lengths: int | Sequence[int]) -> BatchSlots:
        """Per-token slot indices for a batch whose row ``i`` uses ``row_adapters[i]`` (None: base model)
        over ``lengths[i]`` tokens (or ``lengths`` tokens each); every adapter must be assigned."""
        rows = []
        for adapter in row_adapters:
            slots = None if adapter is None else self.slots_of(adapter)
            if adapter is not None and slots is None:
                raise KeyError(f"a {adapter.peft_type} adapter of the batch has no slots; assign it first")
            rows.append(slots or AdapterSlots({}))
        repeats = lengths if isinstance(lengths, int) else torch.tensor(lengths)
        if not isinstance(lengths, int) and len(lengths) != len(rows):
            raise ValueError(f"{len(lengths)} lengths for {len(rows)} rows")
        device = self._index_device()

        def per_token(row_slots: list[int], num_slots: int) -> TokenSlots:
            tokens = torch.tensor(row_slots, dtype=torch.int32).repeat_interleave(repeats)
            return TokenSlots.build(tokens.to(device), num_slots)

        low_rank, present = {}, {}
        for bucket, capacity in self.rank_capacity.items():
            row_slots = [slots.low_rank.get(bucket, NO_SLOT) for slots in rows]
            if any(row_slots):
                low_rank[bucket] = per_token(row_slots, capacity + 1)
                present[bucket] = set(row_slots) - {NO_SLOT}
        scale_slots = [slots.scale for slots in rows]
        scale = per_token(scale_slots, self.scale_capacity + 1) if any(scale_slots) else None
        return BatchSlots(low_rank, present, scale, set(scale_slots) - {NO_SLOT})

    def _index_device(self) -> torch.device:
        for stacks in self.modules.values():
            return stacks.in_scale.device
        return self._device or torch.device("cpu")


def slot_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    stacks: ModuleStacks,
    batch: BatchSlots,
    kernels: LoraKernels,
) -> torch.Tensor:
    """Every token through one module: ``(W (x * in_scale) + x A B) * out_scale + bias * bias_scale``.

    ``x`` is ``(T, in)``; ``weight`` ``(out, in)``. Ops whose slots would all be identities in this module
    (no adapter of the batch touches it that way) are skipped.
    """
    in_scaled = batch.scale is not None and not stacks.in_scaled_slots.isdisjoint(batch.scale_present)
    out_scaled = batch.scale is not None and not stacks.out_scaled_slots.isdisjoint(batch.scale_present)
    scaled_x = kernels.scale(x, stacks.in_scale, batch.scale) if in_scaled else x
    # With output scaling the bias joins in the scaling op: inside the scaling for IA3, outside for DoRA.
    out = F.linear(scaled_x, weight, None if out_scaled else bias)
    for bucket, token_slots in batch.low_rank.items():
        if not stacks.low_rank_slots[bucket].isdisjoint(batch.low_rank_present[bucket]):
            y = kernels.shrink(x, stacks.a[bucket], token_slots)
            kernels.expand(out, y, stacks.b[bucket], token_slots)
    if out_scaled:
        flags = None if bias is None else stacks.bias_scaled
        kernels.scale(out, stacks.out_scale, batch.scale, out=out, bias=bias, bias_scaled=flags)
    return out
