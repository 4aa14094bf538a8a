"""The wrapped layers' compute through slot tables and per-token kernels: the engine's path on CUDA.

:class:`SlotPath` keeps the adapters of recent batches resident in :class:`~peftserve.slot_tables.SlotTables`
and hands each batch a :class:`SlotBatch`, whose per-module :meth:`SlotBatch.forward` replaces the
per-row gathering of :mod:`peftserve.batched_layers`. Assigning an adapter copies its weights into free
slots once; a batch joining or leaving then writes only index tensors.

A batch holds a lease on its adapters' slots for as long as the batch object lives (the layers keep the
last pass's batch installed, and ``AdapterLayers.recent_through_slots`` keeps the latest to run again
while its rows stay the same); only unleased adapters are released, least recently used first, when a
slot is needed. With ``slots_per_bucket`` of at least twice the running rows every live batch fits: the
last pass's batch plus the rows joining now.
A bucket starts with one slot and doubles when full, up to ``slots_per_bucket``: its memory follows the
distinct adapters in use, not the worst case (a preallocated rank-256 bucket of 64 slots on a
Llama-3-8B shape would be ~86 GB in bf16).
"""

from __future__ import annotations

import threading
import weakref
from collections import Counter, OrderedDict
from collections.abc import Sequence

import torch
from torch import nn

from peftserve.adapter_weights import AdapterWeights, linear_weight
from peftserve.errors import CacheFullError
from peftserve.lora_kernels import LoraKernels, kernels_for
from peftserve.slot_tables import BatchSlots, SlotTables, rank_buckets_of, slot_linear


class SlotPath:
    """Slot tables over the wrapped layers, filled on demand and shared by every batch."""

    def __init__(self, *, slots_per_bucket: int, device: torch.device, kernels: LoraKernels | None = None) -> None:
        self.slots_per_bucket = slots_per_bucket
        self.kernels = kernels or kernels_for(device)
        self.tables = SlotTables({}, rank_capacity={}, scale_capacity=slots_per_bucket, device=device)
        # id -> the adapter, weakly (see SlotTables), least recent first
        self._recent: OrderedDict[int, weakref.ref[AdapterWeights]] = OrderedDict()
        self._leases: Counter[int] = Counter()
        # Reentrant: a lease ends when its batch is garbage, which may happen inside batch() itself.
        self._lock = threading.RLock()

    def add_modules(self, modules: dict[str, nn.Module]) -> None:
        """Stacks for newly wrapped layers (``AdapterLayers.wrap`` calls this), allocated before the lock that
        batches assign slots under is taken (at every size but a toy's, allocating is what takes time)."""
        with torch.inference_mode(False), torch.no_grad():
            prepared = self.tables.new_stacks(modules)
            with self._lock:
                self.tables.add_modules(modules, prepared)

    def batch(self, row_adapters: Sequence[AdapterWeights | None]) -> SlotBatch:
        """Assign the batch's adapters (releasing unleased ones if needed) and lease them to the batch."""
        present = {id(adapter): adapter for adapter in row_adapters if adapter is not None}
        # Stacks made or written under inference mode would refuse later writes outside it.
        with self._lock, torch.inference_mode(False), torch.no_grad():
            for adapter in present.values():
                self._assign(adapter, keep=present)
            return SlotBatch(self, row_adapters, list(present))

    def _assign(self, adapter: AdapterWeights, keep: dict[int, AdapterWeights]) -> None:
        if self.tables.slots_of(adapter) is None:
            self.tables.release_dropped()  # before a bucket grows for slots that dropped adapters still hold
            for key in [key for key, ref in self._recent.items() if ref() is None]:
                del self._recent[key]
            for bucket in rank_buckets_of(adapter):
                self._make_room(bucket)
        while True:
            try:
                self.tables.assign(adapter)
                break
            except CacheFullError:
                victim = next(
                    (key for key in self._recent if key not in keep and not self._leases[key]),
                    None,
                )
                if victim is None:
                    raise
                dropped = self._recent.pop(victim)()
                if dropped is not None:
                    self.tables.release(dropped)
        self._recent[id(adapter)] = weakref.ref(adapter)
        self._recent.move_to_end(id(adapter))

    def _make_room(self, bucket: int) -> None:
        """A new bucket starts with one slot; a full one doubles, up to ``slots_per_bucket`` (then the least
        recently used idle adapter makes room), so memory follows the distinct adapters actually in use."""
        if bucket not in self.tables.rank_capacity:
            self.tables.add_bucket(bucket, 1)
            return
        capacity = self.tables.rank_capacity[bucket]
        if self.tables.free_slots(bucket) == 0 and capacity < self.slots_per_bucket:
            self.tables.grow_bucket(bucket, min(2 * capacity, self.slots_per_bucket))

    def forward(self, name: str, layer: nn.Module, x: torch.Tensor, indices: BatchSlots) -> torch.Tensor:
        """``layer`` (a wrapped base layer called ``name``) over ``x`` (rows, tokens, in), every token through
        the stacks at its slot in ``indices``."""
        rows, tokens, features_in = x.shape
        out = slot_linear(
            x.reshape(rows * tokens, features_in),
            linear_weight(layer),
            layer.bias,
            self.tables.modules[name],
            indices,
            self.kernels,
        )
        return out.reshape(rows, tokens, out.shape[-1])

    def _lease(self, keys: list[int]) -> None:
        with self._lock:
            self._leases.update(keys)

    def _unlease(self, keys: list[int]) -> None:
        with self._lock:
            for key in keys:
                self._leases[key] -= 1
                if self._leases[key] <= 0:
                    del self._leases[key]


class SlotBatch:
    """One batch's view of the slot tables: per-token indices (per sequence length) and the module forward."""

    def __init__(self, path: SlotPath, row_adapters: Sequence[AdapterWeights | None], leased: list[int]) -> None:
        self._path = path
        self._rows = list(row_adapters)
        self._indices: dict[tuple[int, int], BatchSlots] = {}  # (tokens per row, table generation) -> indices
        path._lease(leased)
        weakref.finalize(self, path._unlease, leased)

    def forward(self, name: str, layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """``layer`` (a wrapped base layer called ``name``) over ``x`` of shape (rows, tokens, in)."""
        rows, tokens, _ = x.shape
        if rows != len(self._rows):
            raise RuntimeError(f"input of {rows} rows for a batch of {len(self._rows)}")
        key = (tokens, self._path.tables.generation)  # a bucket grown since: indices of the new sizes
        if key not in self._indices:
            self._indices[key] = self._path.tables.indices(self._rows, tokens)
        return self._path.forward(name, layer, x, self._indices[key])
