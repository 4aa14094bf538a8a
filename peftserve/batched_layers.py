"""Apply a different adapter to each row of a batch inside the base model's linear layers.

PEFT's ``adapter_names`` mixed batches are exact for LoRA only and silently apply the active adapter to
every row for IA3 and the others. Here every targeted linear-like layer (``nn.Linear`` and subclasses,
transformers' ``Conv1D``) is wrapped once by
:class:`AdapterLinear`; for the batch in flight it holds per-row tensors, so a batch mixing adapters and
types is one batched computation: the base matmul for all rows, low-rank pairs gathered per row, and
broadcast multiplies for scaling vectors.

Low-rank rows are grouped by rank bucket (powers of two), so a rank-128 LoKr row does not pad every rank-8
LoRA row to 128; a group whose rows all use one adapter uses an expanded view of its pair, without copies,
and a group of several adapters stacks each distinct pair once (not once per row), so a step reads every
adapter's weights once however many rows use it.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial

import torch
from torch import nn
from torch.nn import functional as F

from peftserve.adapter_weights import AdapterWeights, ModuleDelta, linear_features, linear_weight
from peftserve.slot_path import SlotPath
from peftserve.slot_tables import rank_bucket

# A rank bucket whose rows are all one adapter's uses that pair (expanded view). A bucket spanning every row,
# or over some rows with more adapters than this, stacks its distinct pairs for one batched call over the
# adapters (AdapterSegments). A bucket over some rows with at most this many adapters gets one slice per
# adapter (the batcher keeps running rows sorted by adapter), since its stacked form would also index rows in
# and out (measured: 8 mixed types 0.55x sliced against 0.47x indexed).
_MAX_SLICED_ADAPTERS = 4


@dataclass
class LowRankGroup:
    """Consecutive rows sharing one adapter's pair: ``x[rows] @ a @ b`` is added to their output."""

    rows: slice | None  # a contiguous slice of the batch, or None for every row
    a: torch.Tensor  # (n, in, r): an expanded view of the pair, without copies
    b: torch.Tensor  # (n, r, out)

    def add_to(self, out: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        # bmm, also for one shared pair (expanded): measured cheaper than matmul's broadcasting dispatch;
        # baddbmm adds into the base output in the same call.
        if self.rows is None:
            return torch.baddbmm(out, torch.bmm(x, self.a), self.b)
        out[self.rows].baddbmm_(torch.bmm(x[self.rows], self.a), self.b)  # in place on this call's fresh output
        return out


@dataclass
class AdapterSegments:
    """Rows of several adapters in one rank bucket, computed as one batched call over the adapters.

    Each distinct adapter's pair is stacked once, and its rows are laid out ``(adapters, rows per adapter)``
    beside it, so a step reads each adapter's weights once (a per-row stack read them once per row: ~5% of a
    decoding step on CPU with 4 LoRA over 16 rows). ``take`` picks the rows into that layout (an adapter with
    fewer rows repeats one of its own), ``keep`` drops those repeats and ``rows`` says where each result goes;
    all three are None when the batch already is that layout (equal runs, in order, over every row).
    """

    a: torch.Tensor  # (adapters, in, r)
    b: torch.Tensor  # (adapters, r, out)
    take: torch.Tensor | None = None
    keep: torch.Tensor | None = None
    rows: torch.Tensor | None = None

    def add_to(self, out: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        adapters = self.a.shape[0]
        if self.take is None:
            laid_out = x.reshape(adapters, -1, x.shape[-1])
            out.view(adapters, -1, out.shape[-1]).baddbmm_(torch.bmm(laid_out, self.a), self.b)
            return out
        laid_out = x.index_select(0, self.take).reshape(adapters, -1, x.shape[-1])
        delta = torch.bmm(torch.bmm(laid_out, self.a), self.b).reshape(-1, *out.shape[1:])
        if self.keep is not None:
            delta = delta.index_select(0, self.keep)
        # index_put_, not index_add_: on CPU index_add_ starts an OpenMP team per call (measured 160 us
        # against 13 us on 2 threads for a 14-row delta).
        return out.index_put_((self.rows,), delta, accumulate=True)


@dataclass
class RowDeltas:
    """Per-row tensors of one module for the batch in flight (``B`` = batch rows)."""

    batch: int
    low_rank: list[LowRankGroup | AdapterSegments] = field(default_factory=list)
    in_scale: torch.Tensor | None = None  # (B, 1, in), ones for rows without input scaling
    out_scale: torch.Tensor | None = None  # (B, 1, out), ones for rows without output scaling
    bias_scale: torch.Tensor | None = None  # (B, 1, out), set only when the layer has a bias
    # On CUDA every term above comes from slot tables instead: (base layer, x) -> output.
    through_slots: Callable[[nn.Module, torch.Tensor], torch.Tensor] | None = None


class AdapterLinear(nn.Module):
    """A base linear-like layer plus whatever per-row deltas the current batch installed.

    Per row: ``(W (x * in_scale) + x A B) * out_scale + bias * bias_scale``; each row belongs to one adapter,
    so at most one of the terms differs from the identity for it.
    """

    def __init__(self, base: nn.Module) -> None:
        super().__init__()
        self.base = base
        self.in_features, self.out_features = linear_features(base)
        self.rows: RowDeltas | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = self.rows
        if rows is None:
            return self.base(x)
        if x.dim() == 3 and x.shape[0] == rows.batch:
            return self._forward_rows(x, rows)
        # Not (batch, sequence, features): a packed pass is one sequence (1, tokens, features) whose "rows" are
        # its tokens; OPT and MoE shared experts flatten (batch, sequence), DeepSeek's latent attention adds a
        # head axis. The batch stays the leading axis. Routed experts, which see a subset of the tokens, are
        # refused at load (adapter_types).
        if x.dim() < 2 or (x.numel() // x.shape[-1]) % rows.batch:
            raise RuntimeError(f"input of shape {tuple(x.shape)} cannot be split into {rows.batch} batch rows")
        out = self._forward_rows(x.reshape(rows.batch, -1, x.shape[-1]), rows)
        return out.reshape(*x.shape[:-1], out.shape[-1])

    def _forward_rows(self, x: torch.Tensor, rows: RowDeltas) -> torch.Tensor:
        if rows.through_slots is not None:  # CUDA: slot tables and per-token kernels (peftserve.slot_path)
            return rows.through_slots(self.base, x)
        out = F.linear(x if rows.in_scale is None else x * rows.in_scale, linear_weight(self.base))
        for group in rows.low_rank:
            out = group.add_to(out, x)
        if rows.out_scale is not None:
            out = out * rows.out_scale
        if self.base.bias is not None:
            out = out + (self.base.bias if rows.bias_scale is None else self.base.bias * rows.bias_scale)
        return out


class AdapterLayers:
    """Owns the wrapped linear layers of one base model and installs per-row deltas batch by batch."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.wrapped: dict[str, AdapterLinear] = {}
        self.slot_path: SlotPath | None = None

    def use_slot_path(self, path: SlotPath) -> None:
        """Compute every later batch through ``path`` (the engine does this on CUDA)."""
        path.add_modules({name: layer.base for name, layer in self.wrapped.items()})
        self.slot_path = path

    def wrap(self, module_names: Sequence[str]) -> None:
        """Wrap the named linear layers (idempotent); done when an adapter targeting them loads."""
        for name in module_names:
            if name in self.wrapped:
                continue
            parent_name, _, child_name = name.rpartition(".")
            parent = self.model.get_submodule(parent_name)
            wrapper = AdapterLinear(getattr(parent, child_name))
            setattr(parent, child_name, wrapper)
            self.wrapped[name] = wrapper
            if self.slot_path is not None:
                self.slot_path.add_modules({name: wrapper.base})

    @contextmanager
    def activated(self, row_adapters: Sequence[AdapterWeights | None]) -> Iterator[BatchDeltas]:
        """Install per-row deltas for a batch whose row ``i`` uses ``row_adapters[i]`` (None: base model)."""
        batch = BatchDeltas(self, row_adapters)
        try:
            batch.install()
            yield batch
        finally:
            for layer in self.wrapped.values():
                layer.rows = None


class BatchDeltas:
    """The per-module :class:`RowDeltas` of one batch (built again whenever the batch changes)."""

    def __init__(self, layers: AdapterLayers, row_adapters: Sequence[AdapterWeights | None]) -> None:
        self.layers = layers
        self.batch = len(row_adapters)
        self.per_module: dict[str, RowDeltas] = {}
        touched = {name for adapter in row_adapters if adapter for name in adapter.modules}
        if layers.slot_path is not None:
            forward = layers.slot_path.batch(row_adapters).forward
            self.per_module = {name: RowDeltas(self.batch, through_slots=partial(forward, name)) for name in touched}
            return
        plans = _LayoutPlans(row_adapters)
        for name in touched:
            self.per_module[name] = _gather(name, row_adapters, self.layers.wrapped[name], plans)

    def install(self) -> None:
        for name, layer in self.layers.wrapped.items():
            layer.rows = self.per_module.get(name)


def _gather(
    name: str, row_adapters: Sequence[AdapterWeights | None], layer: AdapterLinear, plans: _LayoutPlans
) -> RowDeltas:
    weight = layer.base.weight
    deltas = [adapter.modules.get(name) if adapter else None for adapter in row_adapters]
    batch = len(deltas)
    result = RowDeltas(batch, low_rank=plans.groups(deltas, weight))
    if not plans.scales:
        return result
    result.in_scale = _row_vectors(deltas, "in_scale", batch, layer.in_features, weight)
    result.out_scale = _row_vectors(deltas, "out_scale", batch, layer.out_features, weight)
    if layer.base.bias is not None and any(d is not None and d.scales_bias for d in deltas):
        result.bias_scale = weight.new_ones(batch, 1, layer.out_features)
        for row, delta in enumerate(deltas):
            if delta is not None and delta.scales_bias:
                result.bias_scale[row, 0] = delta.out_scale
    return result


class _LayoutPlans:
    """The low-rank layout of one batch's rows, worked out once per pattern of ranks and shared by every module
    with that pattern (with many distinct adapters the running set changes nearly every step, and this is
    rebuilt for every module each time: per-module Python over the rows was most of that cost).

    Within one batch a module's delta is the same object for rows of the same adapter and a different one
    across adapters, so the layout follows from the rows' adapters and each row's rank in the module.
    """

    def __init__(self, row_adapters: Sequence[AdapterWeights | None]) -> None:
        numbers: dict[int, int] = {}
        self.adapter_of_row = [-1 if a is None else numbers.setdefault(id(a), len(numbers)) for a in row_adapters]
        self.scales = any(adapter.scales for adapter in row_adapters if adapter is not None)
        self._plans: dict[tuple[int, ...], list[_GroupPlan]] = {}

    def groups(self, deltas: list[ModuleDelta | None], like: torch.Tensor) -> list[LowRankGroup | AdapterSegments]:
        ranks = tuple(0 if d is None or d.lora_a is None else d.lora_a.shape[1] for d in deltas)
        plan = self._plans.get(ranks)
        if plan is None:
            plan = self._plans[ranks] = self._plan(ranks, like.device)
        return [group.build(deltas) for group in plan]

    def _plan(self, ranks: tuple[int, ...], device: torch.device) -> list[_GroupPlan]:
        buckets: dict[int, list[int]] = {}
        for row, rank in enumerate(ranks):
            if rank:
                buckets.setdefault(rank_bucket(rank), []).append(row)
        plan: list[_GroupPlan] = []
        for rows in buckets.values():
            sliced, rows = self._peel_crowded(rows)
            runs = _contiguous_runs(rows, [self.adapter_of_row[row] for row in rows])
            if len(runs) == 1 or (len(rows) < len(ranks) and len(runs) <= _MAX_SLICED_ADAPTERS):
                sliced += runs
            elif rows:
                plan.append(self._segments(rows, len(ranks), {ranks[row] for row in rows}, device))
            plan += [_RunPlan(None if stop - start == len(ranks) else slice(start, stop), start, stop - start)
                     for start, stop, _ in sliced]  # fmt: skip
        return plan

    def _peel_crowded(self, rows: list[int]) -> tuple[list[tuple[int, int, int]], list[int]]:
        """Take adapters with many more rows than the others out of a stacked group, as runs of their own.

        The stacked layout pads every adapter to the rows of the busiest one: in a packed pass a prompt chunk
        gives its adapter dozens of rows (its tokens) beside one per decoding row, which would pad every other
        adapter to dozens too (measured: a 22-token chunk beside 16 decoding rows over 8 LoRA made the pass
        twice a decoding step). Returns the peeled adapters' runs and the rows left for the stack.
        """
        peeled: list[tuple[int, int, int]] = []
        while True:
            counts = Counter(self.adapter_of_row[row] for row in rows)
            if len(counts) <= 1 or len(counts) * max(counts.values()) <= 2 * len(rows):
                return peeled, rows
            busiest, _ = counts.most_common(1)[0]
            own = [row for row in rows if self.adapter_of_row[row] == busiest]
            peeled += _contiguous_runs(own, [busiest] * len(own))
            rows = [row for row in rows if self.adapter_of_row[row] != busiest]

    def _segments(self, rows: list[int], batch: int, ranks: set[int], device: torch.device) -> _SegmentsPlan:
        """Each distinct adapter once, its rows laid out ``(adapters, rows per adapter)``."""
        rows_of: dict[int, list[int]] = {}
        for row in rows:
            rows_of.setdefault(self.adapter_of_row[row], []).append(row)
        owned = list(rows_of.values())
        per_adapter = max(len(own) for own in owned)
        layout = [own[min(i, len(own) - 1)] for own in owned for i in range(per_adapter)]
        first_rows = [own[0] for own in owned]
        if layout == list(range(batch)):
            return _SegmentsPlan(first_rows, max(ranks) if len(ranks) > 1 else None)
        kept = [slot * per_adapter + i for slot, own in enumerate(owned) for i in range(len(own))]
        targets = [row for own in owned for row in own]

        def index(values: list[int]) -> torch.Tensor:
            return torch.tensor(values, device=device)

        keep = None if len(kept) == len(layout) else index(kept)
        padded = max(ranks) if len(ranks) > 1 else None
        return _SegmentsPlan(first_rows, padded, take=index(layout), keep=keep, rows=index(targets))


@dataclass(frozen=True)
class _RunPlan:
    """A run of rows of one adapter: a :class:`LowRankGroup` over its own pair, expanded without copies."""

    rows: slice | None
    first: int
    length: int

    def build(self, deltas: list[ModuleDelta | None]) -> LowRankGroup:
        member = deltas[self.first]
        return LowRankGroup(
            self.rows, member.lora_a.expand(self.length, -1, -1), member.lora_b.expand(self.length, -1, -1)
        )


@dataclass(frozen=True)
class _SegmentsPlan:
    """Rows of several adapters as :class:`AdapterSegments`: each adapter's pair stacked once (one op for
    pairs of one rank; zero-padded to ``padded_rank`` otherwise, which adds exact zeros)."""

    first_rows: list[int]  # a row of each distinct adapter, in layout order
    padded_rank: int | None
    take: torch.Tensor | None = None
    keep: torch.Tensor | None = None
    rows: torch.Tensor | None = None

    def build(self, deltas: list[ModuleDelta | None]) -> AdapterSegments:
        members = [deltas[row] for row in self.first_rows]
        if self.padded_rank is None:
            a = torch.stack([member.lora_a for member in members])
            b = torch.stack([member.lora_b for member in members])
        else:
            like = members[0].lora_a
            a = like.new_zeros(len(members), like.shape[0], self.padded_rank)
            b = like.new_zeros(len(members), self.padded_rank, members[0].lora_b.shape[1])
            for slot, member in enumerate(members):
                a[slot, :, : member.lora_a.shape[1]] = member.lora_a
                b[slot, : member.lora_b.shape[0], :] = member.lora_b
        return AdapterSegments(a, b, take=self.take, keep=self.keep, rows=self.rows)


_GroupPlan = _RunPlan | _SegmentsPlan


def _contiguous_runs(rows: list[int], owners: list[int]) -> list[tuple[int, int, int]]:
    """``(start, stop, owner)`` runs of consecutive rows of one adapter; many runs if rows interleave."""
    runs: list[tuple[int, int, int]] = []
    for row, owner in zip(rows, owners, strict=True):
        if runs and runs[-1][1] == row and runs[-1][2] == owner:
            runs[-1] = (runs[-1][0], row + 1, owner)
        else:
            runs.append((row, row + 1, owner))
    return runs


def _row_vectors(deltas: list, field: str, batch: int, width: int, like: torch.Tensor) -> torch.Tensor | None:
    """Stack one per-row scaling vector (ones where a row has none), or None if no row has one."""
    if not any(d is not None and getattr(d, field) is not None for d in deltas):
        return None
    stacked = like.new_ones(batch, 1, width)
    for row, delta in enumerate(deltas):
        if delta is not None and getattr(delta, field) is not None:
            stacked[row, 0] = getattr(delta, field)
    return stacked
