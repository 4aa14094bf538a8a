"""Apply a different adapter to each row of a batch inside the base model's linear layers.

PEFT's ``adapter_names`` mixed batches are exact for LoRA only and silently apply the active adapter to
every row for IA3 and the others. Here every targeted linear-like layer (``nn.Linear`` and subclasses,
transformers' ``Conv1D``) is wrapped once by
:class:`AdapterLinear`; for the batch in flight it holds per-row tensors, so a batch mixing adapters and
types is one batched computation: the base matmul for all rows, low-rank pairs gathered per row, and
broadcast multiplies for scaling vectors.

Low-rank rows are grouped by rank bucket (powers of two), so a rank-128 LoKr row does not pad every rank-8
LoRA row to 128; a group whose rows all use one adapter multiplies them by its pair as they are, and a group
of several adapters stacks each distinct pair once (not once per row), so a step reads every adapter's weights
once however many rows use it. Where a few low-rank adapters' rows interleave, their pairs
run side by side under a row mask (:class:`MaskedPairs`); a LoKr whose exact pair would be large runs through
its Kronecker factors (:class:`KroneckerRun`). From a batch's second pass, sibling layers (q/k/v, gate/up)
share one shrink (:mod:`peftserve.shared_shrink`). A batch whose rows use the same adapters as a recent one is
that one again (:mod:`peftserve.batch_memo`); where masked pairs serve every module of a batch's distinct
adapters, every arrangement of their rows shares one template of groups (:class:`_MaskTemplate`).
"""

from __future__ import annotations

import logging
from collections import Counter, OrderedDict
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass, field
from functools import cached_property, lru_cache, partial
from typing import Any, TypeVar

import torch
from torch import nn
from torch.nn import functional as F

from peftserve.adapter_weights import AdapterWeights, ModuleDelta, is_linear_like, linear_features, linear_weight
from peftserve.batch_memo import BatchMemo
from peftserve.lora_kernels import add_rows
from peftserve.shared_shrink import ShrinkForm, SiblingPart, SiblingTrace, share_shrinks
from peftserve.slot_path import SlotPath
from peftserve.slot_tables import rank_bucket

# A rank bucket whose rows are all one adapter's uses that pair as it is. A bucket spanning every row,
# or over some rows with more adapters than this, stacks its distinct pairs for one batched call over the
# adapters (AdapterSegments). A bucket over some rows with at most this many adapters gets one slice per
# adapter (the batcher keeps running rows sorted by adapter), since its stacked form would also index rows in
# and out (measured: 8 mixed types 0.55x sliced against 0.47x indexed).
_MAX_SLICED_ADAPTERS = 4

# MaskedPairs computes low-rank adapters' columns for every row in three ops, against two or more per adapter
# grouped; it takes adapters in order of rank up to this total rank, and is used where each op saved spares
# at least as many multiply-adds as this wastes (on this project's CPUs a small op's dispatch costs about as
# much as this many multiply-adds of a small matmul: measured 8-15 us against 31 GFLOP/s). The waste test is
# what keeps large layers from it; the cap only bounds the columns. Measured in process on the demo model,
# 16 clients (medians of 8 alternating rounds), total rank up to 128 against 48: uniform over 8 LoRA r8
# 0.68x against 0.62x of the base model; Zipf over 64, all per row, 0.67x against 0.54x.
_MASKED_MAX_RANK = 128
_OP_MACS = 1 << 18

# A LoKr pair's rank is the product of its factors' ranks (64 for r=4 on a 512-wide layer). Where the pair
# would read this many numbers or more per step, and at least 8 times its factors, its rows go through the
# Kronecker structure (KroneckerRun): two ops like a pair, but from DRAM a few KB instead of 256 KB+ (measured on
# bench-engine's 8 mixed types: the rank-64 LoKr pair's bmm took 54 us in a decoding step, 6 us with warm
# caches). Smaller pairs stay pairs: on small layers reading them costs less than the reshapes and the
# expanded W1's strided batched matmul.
_STRUCTURED = -1
_STRUCTURED_MIN_READ = 1 << 15

# Recent batches kept for their arrangement of adapters to be found again (peftserve.batch_memo), and the
# bytes they may hold in stacked copies of adapters' pairs: a few batches of many large adapters at most.
_RECENT_BATCHES = 64
_RECENT_BATCH_BYTES = 64 << 20

# On a CPU, a batch of this many distinct adapters or more goes through slot tables (AdapterLayers.slots_from):
# their per-step terms cost more than the per-row path's, but nothing is stacked when the batch changes, and
# with many adapters the batch changes at nearly every step into an arrangement not seen before, whose pairs
# the per-row path copies side by side (about the adapters' own bytes). Small adapters used to stay per row
# (below 8 MiB together), while a slot's release reset it to zeros (slot_tables.py); since a release only
# frees the slot, measured in process on the demo model (adapters of ~0.3 MB), 16 clients, alternating
# rounds, per row against through slot tables from 9 adapters: all distinct over 1,000 adapters 0.41 / 0.36x
# against 0.51 / 0.43x (medians of 4 and 6 rounds), Zipf over 64 0.56 / 0.44x against 0.54 / 0.50x.
CPU_SLOTS_FROM_ADAPTERS = 9

# Such a batch is built per row once it has run this many passes through slot tables: each step then costs
# less (bench-engine's steady batch of 16 LoRA: 0.91x of the base model against 0.86x through slot tables),
# but a build over many adapters costs a few steps' savings, so only a batch that has lasted is rebuilt.
# Measured in process, demo, Zipf over 64 adapters, 16 clients: rebuilt after 1 / 3 / 6 passes 0.57 / 0.56 /
# 0.62x, never 0.64x (medians of four rounds; about +-0.03).
PASSES_BEFORE_PER_ROW = 6

_Stacked = TypeVar("_Stacked")
MaskKey = tuple[int, tuple[int, ...], torch.dtype, torch.device]  # adapters, column owners, dtype, device
_Run = tuple[int, int, int]  # (start, stop, owner): consecutive rows of one adapter (owner -1: the base model)
logger = logging.getLogger(__name__)


@dataclass
class LowRankGroup:
    """Consecutive rows sharing one adapter's pair: ``x[rows] @ a @ b`` is added to their output."""

    rows: slice | None  # a contiguous slice of the batch, or None for every row
    a: torch.Tensor  # (in, r): the adapter's own pair
    b: torch.Tensor  # (r, out)

    def add_to(self, out: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        # One pair for every row of the group: two plain matmuls over the rows flattened, added in place into
        # this call's own output (a batch slice of it is contiguous too). Measured on one core against a
        # batched matmul over the pair expanded per row: 5.7 against 10 us for 16 rows on a 128-wide layer,
        # 8 against 33 us on a 512-wide one, 22 against 73 us for a 40-token packed pass.
        target = out if self.rows is None else out[self.rows]
        rows = x if self.rows is None else x[self.rows]
        target.view(-1, target.shape[-1]).addmm_(torch.mm(rows.reshape(-1, rows.shape[-1]), self.a), self.b)
        return out

    def shrink_form(self) -> ShrinkForm:
        return ShrinkForm("rows", self.rows, self.a, self.b)


@dataclass
class AdapterSegments:
    """Rows of several adapters in one rank bucket, computed as one batched call over the adapters.

    Each distinct adapter's pair is stacked once, and its rows are laid out ``(adapters, rows per adapter)``
    beside it, so a step reads each adapter's weights once (a per-row stack read them once per row: ~5% of a
    decoding step on CPU with 4 LoRA over 16 rows). Where the rows already are that layout (equal runs, in
    order) they are the slice ``span`` of the batch, viewed in place; otherwise ``take`` picks the rows into
    the layout (an adapter with fewer rows repeats one of its own), ``keep`` drops those repeats and ``rows``
    says where each result goes.
    """

    a: torch.Tensor  # (adapters, in, r)
    b: torch.Tensor  # (adapters, r, out)
    span: slice | None = None  # rows already laid out: every row if ``take`` is None too
    take: torch.Tensor | None = None
    keep: torch.Tensor | None = None
    rows: torch.Tensor | None = None
    adapters: tuple[int, ...] = ()  # numbers of the stacked pairs' adapters among the batch's distinct ones

    def shrink_form(self) -> ShrinkForm | None:
        if self.take is not None:
            return None
        return ShrinkForm("segments", self.span, self.a, self.b, adapters=self.adapters)

    def add_to(self, out: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        adapters = self.a.shape[0]
        if self.take is None:
            target = out if self.span is None else out[self.span]
            laid_out = (x if self.span is None else x[self.span]).reshape(adapters, -1, x.shape[-1])
            target.view(adapters, -1, out.shape[-1]).baddbmm_(torch.bmm(laid_out, self.a), self.b)
            return out
        laid_out = x.index_select(0, self.take).reshape(adapters, -1, x.shape[-1])
        delta = torch.bmm(torch.bmm(laid_out, self.a), self.b).reshape(-1, *out.shape[1:])
        if self.keep is not None:
            delta = delta.index_select(0, self.keep)
        return add_rows(out, self.rows, delta)


@dataclass
class MaskedPairs:
    """Rows of a few adapters in one call over all of them: every adapter's pair side by side, ``x @ [A1 A2 ..]``
    for every row, each row's columns of other adapters zeroed by ``mask``, then ``@ [B1; B2; ..]``.

    Three ops however many adapters and however their rows interleave, against two or more per adapter
    otherwise; each row computes the other adapters' columns too, so it is used only where that waste is
    small (few adapters, low ranks, small layers: :data:`_OP_MACS`). The zeroed columns add exact
    zeros to a row's result.
    """

    a: torch.Tensor  # (in, total rank)
    b: torch.Tensor  # (total rank, out)
    mask: torch.Tensor  # (rows, 1, total rank): 1 on each row's own adapter's columns
    mask_key: MaskKey | None = None  # what the mask is made from (its columns' owners), for templates

    def shrink_form(self) -> ShrinkForm:
        return ShrinkForm("rows", None, self.a, self.b, mask=self.mask, mask_key=self.mask_key)

    def add_to(self, out: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        low = torch.matmul(x, self.a).mul_(self.mask)
        out.view(-1, out.shape[-1]).addmm_(low.view(-1, low.shape[-1]), self.b)  # in place on this call's output
        return out


@dataclass
class KroneckerRun:
    """Consecutive rows of one LoKr adapter through its Kronecker structure: with ``x`` viewed as ``(c, d)``
    per token, ``kron(W1, W2) x`` is ``W1 X W2^T`` viewed as ``(a * b)``; two small matmuls that read the
    factors (a few thousand numbers) instead of a pair of rank ``rank(W1) x rank(W2)``."""

    rows: slice | None
    w1: torch.Tensor  # (a, c), scaling folded in
    w2t: torch.Tensor  # (d, b)

    def add_to(self, out: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        if self.rows is not None:
            x, target = x[self.rows], out[self.rows]
        else:
            target = out
        (a, c), (d, b) = self.w1.shape, self.w2t.shape
        right = torch.matmul(x.reshape(-1, c, d), self.w2t)  # (tokens, c, b)
        # W1 @ right added in place into this call's output (a view of it: a contiguous batch slice)
        target.view(-1, a, b).baddbmm_(self.w1.expand(right.shape[0], a, c), right)
        return out


@dataclass
class RowDeltas:
    """Per-row tensors of one module for the batch in flight (``B`` = batch rows)."""

    batch: int
    low_rank: list[LowRankGroup | AdapterSegments | MaskedPairs | KroneckerRun | SiblingPart] = field(
        default_factory=list
    )
    in_scale: torch.Tensor | None = None  # (B or 1, 1, in), ones for rows without input scaling
    out_scale: torch.Tensor | None = None  # (B or 1, 1, out), ones for rows without output scaling
    bias_scale: torch.Tensor | None = None  # (B or 1, 1, out), set only when the layer has a bias
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
        # Plain attributes, read every pass and every batch build: the base layer's own go through
        # nn.Module.__getattr__ (about 1 us each, 28 layers per pass on the demo).
        self.has_bias = getattr(base, "bias", None) is not None
        weight = linear_weight(base)
        self.like = weight.new_empty(0)  # the dtype and device of the layer's weight

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
        if rows.through_slots is not None:  # slot tables and per-token kernels (peftserve.slot_path)
            return rows.through_slots(self.base, x)
        out = F.linear(x if rows.in_scale is None else x * rows.in_scale, linear_weight(self.base))
        for group in rows.low_rank:
            out = group.add_to(out, x)
        # In place: ``out`` is this call's own output.
        if rows.out_scale is not None:
            out.mul_(rows.out_scale)
        if self.has_bias:
            out.add_(self.base.bias if rows.bias_scale is None else self.base.bias * rows.bias_scale)
        return out


class AdapterLayers:
    """Owns the wrapped linear layers of one base model and installs per-row deltas batch by batch.

    ``probe`` runs a small forward pass of the model; run once here, over every linear layer, it shows which
    of them are siblings (called on one input, like q/k/v), whose low-rank shrinks then run as one
    (:mod:`shared_shrink`) once wrapped. Learning them once means an adapter's first load, which wraps its
    layers under the engine's lock, runs no forward pass there. Without a probe every layer shrinks alone.

    A batch is computed per row (:class:`BatchDeltas`' own layouts) or, with a slot path in use, through slot
    tables when it has at least ``slots_from`` distinct adapters (``slots_from`` 0: every batch, as on CUDA).
    """

    def __init__(self, model: nn.Module, probe: Callable[[], object] | None = None) -> None:
        self.model = model
        self.wrapped: dict[str, AdapterLinear] = {}
        self.slot_path: SlotPath | None = None
        self.stacks = StackMemo()
        self.siblings: list[list[str]] = []  # names of layers called one after another on one input
        self.slots_from = 0
        self.recent: BatchMemo[BatchDeltas] = BatchMemo(max_entries=_RECENT_BATCHES, max_bytes=_RECENT_BATCH_BYTES)
        # A batch through slot tables leases its adapters' slots while it lives: only the last one is kept.
        self.recent_through_slots: BatchMemo[BatchDeltas] = BatchMemo(max_entries=1, max_bytes=0)
        # What each module needs of a list of distinct adapters, whatever the rows (_ModuleProfiles).
        self.profiles: BatchMemo[_ModuleProfiles] = BatchMemo(max_entries=_RECENT_BATCHES, max_bytes=0)
        # The groups of any batch over a list of distinct adapters, where masked pairs serve it (_MaskTemplate).
        self.templates: BatchMemo[_MaskTemplate | _Untemplated] = BatchMemo(
            max_entries=_RECENT_BATCHES, max_bytes=_RECENT_BATCH_BYTES
        )
        # Sibling groups over every linear layer, wrapped or not: ``siblings`` keeps their wrapped members.
        self._sibling_groups = _trace_siblings(model, probe) if probe is not None else []

    def use_slot_path(self, path: SlotPath, *, from_adapters: int = 0) -> None:
        """Compute later batches of at least ``from_adapters`` distinct adapters through ``path``
        (``from_adapters`` 0: every batch, which the engine does on CUDA; on CPU only batches of many)."""
        path.add_modules({name: layer.base for name, layer in self.wrapped.items()})
        self.slot_path = path
        self.slots_from = from_adapters

    def through_slots(self, row_adapters: Sequence[AdapterWeights | None]) -> bool:
        """Whether a batch of these rows is computed through the slot path."""
        if self.slot_path is None:
            return False
        if self.slots_from == 0:
            return True
        return len({id(adapter) for adapter in row_adapters if adapter is not None}) >= self.slots_from

    def deltas(self, row_adapters: Sequence[AdapterWeights | None]) -> BatchDeltas:
        """The deltas of a batch whose row ``i`` uses ``row_adapters[i]``: a recent batch's with the same
        adapters row for row, or built now.

        Where both paths serve (CPU), a batch of many adapters runs through slot tables, which build nothing,
        and is built per row once it has lasted :data:`PASSES_BEFORE_PER_ROW` passes.
        """
        batch = self.recent.find(row_adapters)
        if batch is not None:
            return batch
        if self.through_slots(row_adapters):
            slotted = self.recent_through_slots.find(row_adapters)
            if slotted is None:
                slotted = BatchDeltas(self, row_adapters, through_slots=True)
                return self.recent_through_slots.add(row_adapters, slotted)
            if self.slots_from == 0 or slotted.passes < PASSES_BEFORE_PER_ROW:
                return slotted
        built = BatchDeltas(self, row_adapters, through_slots=False, template=self._template(row_adapters))
        return self.recent.add(row_adapters, built)

    def _template(self, row_adapters: Sequence[AdapterWeights | None]) -> _MaskTemplate | None:
        """The template of batches over these rows' distinct adapters (made on first need), or None where
        there is none: a single adapter (its rows are one slice), or masked pairs would not serve."""
        distinct = list({id(adapter): adapter for adapter in row_adapters if adapter is not None}.values())
        if len(distinct) < 2:
            return None
        found = self.templates.find(distinct)
        if found is None:
            profiles = self.profiles.find(distinct)
            if profiles is None:
                profiles = self.profiles.add(distinct, _ModuleProfiles(distinct, self.wrapped))
            found = _Untemplated()
            if _masks_serve(profiles, len(row_adapters)):
                template = _MaskTemplate(self, row_adapters, profiles)
                found = template if template.complete else found
            self.templates.add(distinct, found)
        return found if isinstance(found, _MaskTemplate) else None

    def forget(self, adapter: AdapterWeights) -> None:
        """``adapter`` left the adapter cache: no recent batch may keep its memory."""
        self.recent.forget(adapter)
        self.recent_through_slots.forget(adapter)
        self.profiles.forget(adapter)
        self.templates.forget(adapter)

    def wrap(self, module_names: Sequence[str], lock: AbstractContextManager | None = None) -> None:
        """Wrap the named linear layers (idempotent); done when an adapter targeting them loads.

        Their slot stacks are allocated first; only swapping each layer for its wrapper happens under ``lock``
        (the engine's, which every forward pass holds), so a load never stalls decoding while it allocates.
        """
        new = {name: _unwrapped(self.model.get_submodule(name)) for name in module_names if name not in self.wrapped}
        if not new:
            return
        if self.slot_path is not None:
            self.slot_path.add_modules(new)
        with lock or nullcontext():
            self._wrap(new)

    def _wrap(self, modules: dict[str, nn.Module]) -> None:
        wrapped = len(self.wrapped)
        for name, module in modules.items():
            if name in self.wrapped:  # another loader was first
                continue
            parent_name, _, child_name = name.rpartition(".")
            wrapper = AdapterLinear(module)
            setattr(self.model.get_submodule(parent_name), child_name, wrapper)
            self.wrapped[name] = wrapper
            self.stacks.capacity = 5 * len(self.wrapped)
        if len(self.wrapped) > wrapped:
            self.recent.clear()  # built for fewer layers and older siblings
            self.recent_through_slots.clear()
            self.profiles.clear()
            self.templates.clear()
            if self.slot_path is None or self.slots_from:  # slot tables run their own kernels: no sharing there
                self.siblings = [
                    kept
                    for group in self._sibling_groups
                    if len(kept := [name for name in group if name in self.wrapped]) > 1
                ]


def _unwrapped(module: nn.Module) -> nn.Module:
    return module.base if isinstance(module, AdapterLinear) else module


def _trace_siblings(model: nn.Module, probe: Callable[[], object]) -> list[list[str]]:
    """The groups of linear layers that ``probe``'s forward pass calls one after another on one input."""
    trace = SiblingTrace({name: module for name, module in model.named_modules() if is_linear_like(module)})
    try:
        with torch.inference_mode():
            probe()
    except Exception:  # a model the probe cannot run: every layer shrinks alone, which is only slower
        logger.warning("could not trace the model's layers; sibling layers will not share shrinks", exc_info=True)
        trace.finish()
        return []
    return trace.finish()


class BatchDeltas:
    """The per-module :class:`RowDeltas` of one batch, for every pass the batch runs."""

    def __init__(
        self,
        layers: AdapterLayers,
        row_adapters: Sequence[AdapterWeights | None],
        *,
        through_slots: bool | None = None,  # None: as the layers choose for these rows
        template: _MaskTemplate | None = None,  # its groups serve these rows, with masks and vectors made here
    ) -> None:
        self.layers = layers
        self.batch = len(row_adapters)
        self.per_module: dict[str, RowDeltas] = {}
        self.held_bytes = 0  # stacked or concatenated copies of adapters' tensors (BatchMemo bounds them)
        self.passes = 0  # installed for this many passes so far
        self._shared = False
        self.template = template
        if template is not None:
            self._shared = True  # the template's siblings share already
            self.per_module = template.per_module
            self.masks, self.vectors = template.arranged(row_adapters)
            self.held_bytes = sum(mask.nbytes for mask in self.masks.values())
            self.held_bytes += sum(part.nbytes for _, parts in self.vectors for part in parts)
            return
        if layers.through_slots(row_adapters) if through_slots is None else through_slots:
            touched = {name for adapter in row_adapters if adapter for name in adapter.modules}
            forward = layers.slot_path.batch(row_adapters).forward
            self.per_module = {name: RowDeltas(self.batch, through_slots=partial(forward, name)) for name in touched}
            return
        layout = _BatchLayout(row_adapters, layers.stacks)
        profiles = layers.profiles.find(layout.distinct)
        if profiles is None:
            profiles = layers.profiles.add(layout.distinct, _ModuleProfiles(layout.distinct, layers.wrapped))
        with layers.stacks.handed_out() as handed:
            for name, profile in profiles.items():
                self.per_module[name] = layout.module_deltas(profile)
            layout.gather_row_vectors()
        self.held_bytes = sum(handed.values())

    def share_siblings(self) -> None:
        """Let sibling layers share one shrink (:mod:`peftserve.shared_shrink`) for the later passes of this
        batch. Worth it only for a batch that runs several passes: arranging it costs about a third of
        building the batch. Measured in process on the demo model with its trained adapters, where the batch
        changes at nearly every step: sharing from a batch's first pass gave 0.75x of the base model against
        0.77x without sharing; from its second decoding step, level (0.736x against 0.734x)."""
        if self._shared:  # on the slot path no siblings are learned (AdapterLayers.wrap): nothing to share
            return
        self._shared = True
        groups_of = {name: rows.low_rank for name, rows in self.per_module.items()}
        stacked = partial(_concatenated, self.layers.stacks)
        with self.layers.stacks.handed_out() as handed:
            share_shrinks(groups_of, self.layers.siblings, stacked, self.batch, _OP_MACS)
        self.held_bytes += sum(handed.values())

    def install(self) -> None:
        """Put this batch's deltas into the layers for a pass; from its second pass, siblings share shrinks."""
        self.passes += 1
        if self.template is not None:
            self.template.bind(self)
        elif self.passes == 2:
            self.share_siblings()
        per_module = self.per_module
        for name, layer in self.layers.wrapped.items():
            # Past nn.Module.__setattr__ (about 1.5 us a layer, every pass): ``rows`` is a plain attribute.
            layer.__dict__["rows"] = per_module.get(name)


def _concatenated(stacks: StackMemo, parts: list[torch.Tensor], dim: int) -> torch.Tensor:
    return stacks.get(("siblings", dim), parts, lambda: torch.cat(parts, dim=dim))


_Vectors = list[tuple["_VectorGather", tuple[torch.Tensor, ...]]]  # each gather's per-request row vectors


class _MaskTemplate:
    """The groups of every batch over one list of distinct adapters, whatever its rows: each module's adapters
    as masked pairs (:class:`MaskedPairs`), siblings sharing their shrink, scaling vectors from one table.

    Through Triton, with requests joining and leaving at their own times, about half of the passes of the
    demo's three trained adapters at concurrency 16 brought an arrangement of rows not seen among the recent
    64, and building it took 8% of the serving loop's time (71-78% of passes and 13-15% with eight adapters;
    engine instrumented, diagnostic). A batch over a template makes only what depends on its rows (a row
    mask per pattern of column owners, the scaling vectors: a few gathers) and binds them into the template's
    groups when it is installed. Used where masked pairs serve every module (:func:`_masks_serve`).
    """

    def __init__(
        self, layers: AdapterLayers, row_adapters: Sequence[AdapterWeights | None], profiles: _ModuleProfiles
    ) -> None:
        self.stacks = layers.stacks
        layout = _BatchLayout(row_adapters, layers.stacks, all_masked=True)
        with layers.stacks.handed_out() as handed:
            self.per_module = {name: layout.module_deltas(profile) for name, profile in profiles.items()}
            self.gathers = layout.gather_row_vectors()
            groups_of = {name: rows.low_rank for name, rows in self.per_module.items()}
            stacked = partial(_concatenated, layers.stacks)
            share_shrinks(groups_of, layers.siblings, stacked, layout.batch, _OP_MACS)
        self.held_bytes = sum(handed.values())
        holders = {}
        for rows in self.per_module.values():
            for group in rows.low_rank:
                holder = group.shared if isinstance(group, SiblingPart) else group
                holders[id(holder)] = holder
        self.mask_users = [(holder, holder.mask_key) for holder in holders.values()]
        self.complete = all(key is not None for _, key in self.mask_users)
        self.bound: object | None = None  # the batch whose masks and vectors the groups hold now

    def arranged(self, row_adapters: Sequence[AdapterWeights | None]) -> tuple[dict[MaskKey, torch.Tensor], _Vectors]:
        """The masks and scaling vectors of a batch of these rows. Its distinct adapters are the template's in
        the same order (the template is found by them), so the layout numbers rows as the template's groups."""
        layout = _BatchLayout(row_adapters, self.stacks)
        masks = {key: _mask_for(key, layout.row_numbers(key[3])) for _, key in self.mask_users}
        return masks, [(gather, gather.rows(layout.row_numbers(gather.table.device))) for gather in self.gathers]

    def bind(self, batch: BatchDeltas) -> None:
        """Make the template's groups those of ``batch`` (its rows, masks and vectors), unless they are already:
        a decoding batch is installed for pass after pass."""
        if self.bound is batch:
            return
        self.bound = batch
        for rows in self.per_module.values():
            rows.batch = batch.batch
        for holder, key in self.mask_users:
            holder.mask = batch.masks[key]
        for gather, parts in batch.vectors:
            gather.set(parts)


class _Untemplated:
    """A list of distinct adapters that masked pairs do not serve well: its batches are built per layout."""

    held_bytes = 0


def _masks_serve(profiles: dict[str, _ModuleProfile], rows: int) -> bool:
    """Whether masked pairs serve every module of these adapters in batches of about ``rows`` rows: pairs only
    (no LoKr through its factors), at most :data:`_MASKED_MAX_RANK` columns, and, with adapters sharing rows
    evenly, the columns each row computes for nothing cost no more than the ops that grouping them would
    take beyond masked pairs' three (two per adapter's run, at most five stacked: the test
    ``_BatchLayout._choose`` makes per batch)."""
    for profile in profiles.values():
        ranks = [rank for rank in profile.ranks if rank]
        if _STRUCTURED in ranks or sum(ranks) > _MASKED_MAX_RANK:
            return False
        if len(ranks) > 1:
            wasted = rows * sum(ranks) * (len(ranks) - 1) / len(ranks)
            if wasted * profile.features > (min(2 * len(ranks), 5) - 3) * _OP_MACS:
                return False
    return True


@dataclass(frozen=True)
class _ModuleProfile:
    """What a batch's layout needs of one module for one list of distinct adapters, whatever the rows: each
    adapter's part of the module, the rank its pair is served at, and the scaling vectors it asks for."""

    deltas: list[ModuleDelta | None]
    ranks: tuple[int, ...]
    features: int  # in + out
    like: torch.Tensor  # the dtype and device of the layer's weight
    vectors: tuple[tuple[str, list[torch.Tensor | None], int], ...]  # (RowDeltas field, per adapter, width)

    @classmethod
    def of(cls, name: str, distinct: list[AdapterWeights], layer: AdapterLinear) -> _ModuleProfile:
        deltas = [adapter.modules.get(name) for adapter in distinct]
        features = layer.in_features + layer.out_features
        present = [d for d in deltas if d is not None]
        vectors = []
        if any(d.in_scale is not None for d in present):
            vectors.append(("in_scale", [d and d.in_scale for d in deltas], layer.in_features))
        if any(d.out_scale is not None for d in present):
            vectors.append(("out_scale", [d and d.out_scale for d in deltas], layer.out_features))
            if layer.has_bias and any(d.scales_bias for d in present):
                bias_scales = [d.out_scale if d is not None and d.scales_bias else None for d in deltas]
                vectors.append(("bias_scale", bias_scales, layer.out_features))
        ranks = tuple(_served_rank(d, features) for d in deltas)
        return cls(deltas, ranks, features, layer.like, tuple(vectors))


class _ModuleProfiles(dict[str, _ModuleProfile]):
    """Every touched module's :class:`_ModuleProfile` for one list of distinct adapters. With requests joining
    and leaving, the batch changes nearly every step while its distinct adapters rarely do: measured through
    Triton (py-spy on the engine's stub, the demo's three trained adapters at concurrency 16), building a
    new batch's deltas was 16% of the batching loop, and working this out per module a fifth of each build."""

    held_bytes = 0  # views of the adapters' own tensors only (BatchMemo's protocol)

    def __init__(self, distinct: list[AdapterWeights], wrapped: dict[str, AdapterLinear]) -> None:
        super().__init__()
        for name in {name: None for adapter in distinct for name in adapter.modules}:
            self[name] = _ModuleProfile.of(name, distinct, wrapped[name])


class _BatchLayout:
    """Which adapter each row of one batch uses, and the low-rank layouts that follow from it.

    Work per module goes over the batch's distinct adapters, not its rows: a packed pass has a row per token,
    and with many distinct adapters the batch changes nearly every step, so per-module Python over the rows
    was most of the cost of a new batch. A module's low-rank layout follows from the rows' adapters and each
    adapter's rank in that module, so it is worked out once per pattern of ranks and shared by every module
    with that pattern.
    """

    def __init__(
        self, row_adapters: Sequence[AdapterWeights | None], stacks: StackMemo, *, all_masked: bool = False
    ) -> None:
        self.stacks = stacks
        self.all_masked = all_masked  # every module's adapters as masked pairs, whatever the rows (templates)
        numbers: dict[int, int] = {}
        self.distinct: list[AdapterWeights] = []
        self.adapter_of_row: list[int] = []  # -1: the base model
        for adapter in row_adapters:
            if adapter is None:
                self.adapter_of_row.append(-1)
                continue
            number = numbers.setdefault(id(adapter), len(self.distinct))
            if number == len(self.distinct):
                self.distinct.append(adapter)
            self.adapter_of_row.append(number)
        self.batch = len(row_adapters)
        # The batcher keeps rows sorted by adapter: a layout is planned over its few runs, not its rows.
        self.runs = _contiguous_runs(self.adapter_of_row)
        self.has_base_rows = -1 in self.adapter_of_row
        self.scales = any(adapter.scales for adapter in self.distinct)
        self._plans: dict[tuple[int, ...], tuple[list[_GroupPlan], _MaskedChoice | None]] = {}
        self._chosen: dict[tuple[tuple[int, ...], int], list[_GroupPlan | _MaskedPlan]] = {}
        self._row_numbers: dict[torch.device, torch.Tensor] = {}
        self._masks: dict[tuple, _RowMask] = {}
        self._pending_vectors: list[_VectorRequest] = []

    def module_deltas(self, profile: _ModuleProfile) -> RowDeltas:
        """One module's :class:`RowDeltas` for this batch: its low-rank groups now, its scaling vectors by
        :meth:`gather_row_vectors`."""
        key = (profile.ranks, profile.features)
        chosen = self._chosen.get(key)
        if chosen is None:
            chosen = self._chosen[key] = self._choose(profile.ranks, profile.features, profile.like)
        deltas = profile.deltas
        result = RowDeltas(self.batch, low_rank=[group.build(deltas, self.stacks) for group in chosen])
        if self.scales:
            for field_name, vectors, width in profile.vectors:
                self.row_vectors(result, field_name, vectors, width, profile.like)
        return result

    def _choose(self, ranks: tuple[int, ...], features: int, like: torch.Tensor) -> list[_GroupPlan | _MaskedPlan]:
        """The plan of every module with these ranks and features: masked pairs where the ops they save are
        worth the multiply-adds they waste, adapters grouped otherwise."""
        if self.all_masked:
            members = [adapter for adapter, rank in enumerate(ranks) if rank]
            columns = tuple(adapter for adapter in members for _ in range(ranks[adapter]))
            return [_MaskedPlan(members, self._row_mask(columns, like))] if members else []
        plans = self._plans.get(ranks)
        if plans is None:
            grouped = self._plan(ranks, like.device)
            plans = self._plans[ranks] = grouped, self._masked(ranks, grouped, like)
        grouped, masked = plans
        if masked is not None and masked.wasted * features <= (_ops(grouped) - _ops(masked.plan)) * _OP_MACS:
            return masked.plan
        return grouped

    def _masked(self, ranks: tuple[int, ...], grouped: list[_GroupPlan], like: torch.Tensor) -> _MaskedChoice | None:
        """The lowest-rank adapters side by side (:class:`MaskedPairs`), the others grouped, where that takes
        fewer ops than grouping them all; None otherwise."""
        members: list[int] = []
        for adapter in sorted((adapter for adapter, rank in enumerate(ranks) if rank > 0), key=ranks.__getitem__):
            if sum(ranks[member] for member in members) + ranks[adapter] > _MASKED_MAX_RANK:
                break
            members.append(adapter)
        if len(members) < 2 or _ops(grouped) <= 3:
            return None
        rest = self._plan(tuple(0 if adapter in members else rank for adapter, rank in enumerate(ranks)), like.device)
        columns = [adapter for adapter in members for _ in range(ranks[adapter])]
        plan = [_MaskedPlan(members, self._row_mask(tuple(columns), like)), *rest]
        if _ops(plan) >= _ops(grouped):
            return None
        used = sum((stop - start) * ranks[owner] for start, stop, owner in self.runs if owner in members)
        return _MaskedChoice(plan, wasted=self.batch * len(columns) - used)

    def _row_mask(self, column_owners: tuple[int, ...], like: torch.Tensor) -> _RowMask:
        """One mask per pattern of column owners in a batch: modules of other ranks often share it."""
        key = (column_owners, like.dtype, like.device)
        mask = self._masks.get(key)
        if mask is None:
            mask = self._masks[key] = _RowMask(self, len(self.distinct), list(column_owners), like.dtype, like.device)
        return mask

    def row_numbers(self, device: torch.device) -> torch.Tensor:
        """``(rows,)``: each row's adapter number plus one (0: the base model), the row index into tables whose
        first row is the base model's."""
        numbers = self._row_numbers.get(device)
        if numbers is None:
            numbers = self._row_numbers[device] = torch.tensor([a + 1 for a in self.adapter_of_row], device=device)
        return numbers

    def row_vectors(
        self, into: RowDeltas, field_name: str, vectors: list[torch.Tensor | None], width: int, like: torch.Tensor
    ) -> None:
        """Set ``into.<field_name>`` to per-row scaling vectors ``(rows, 1, width)`` from one vector (or None:
        ones) per distinct adapter: at once for a batch of one adapter's rows (its vector, broadcast), otherwise
        by :meth:`gather_row_vectors`, which serves every module of the batch in one gather."""
        if len(vectors) == 1 and not self.has_base_rows and vectors[0] is not None:
            setattr(into, field_name, vectors[0].reshape(1, 1, width))
        else:
            self._pending_vectors.append(_VectorRequest(into, field_name, vectors, width, like.dtype, like.device))

    def gather_row_vectors(self) -> list[_VectorGather]:
        """Fill in every requested scaling vector: one table of every module's distinct vectors side by side,
        ones first, indexed by row (one op for the batch, where a table per module took two ops per module:
        measured, 16 DoRA modules made a sixth of the cost of a new batch on the demo). Returns the gathers,
        which a template makes again for each arrangement of rows."""
        by_kind: dict[tuple[torch.dtype, torch.device], list[_VectorRequest]] = {}
        for request in self._pending_vectors:
            by_kind.setdefault((request.dtype, request.device), []).append(request)
        self._pending_vectors = []
        gathers = []
        for (dtype, device), requests in by_kind.items():
            parts = [vector for request in requests for vector in request.vectors]
            widths = tuple(request.width for request in requests)
            table = self.stacks.get(("scales", widths), parts, partial(_scale_table, requests, dtype, device))
            gather = _VectorGather(table, widths, requests)
            gather.set(gather.rows(self.row_numbers(device)))
            gathers.append(gather)
        return gathers

    def _plan(self, ranks: tuple[int, ...], device: torch.device) -> list[_GroupPlan]:
        buckets: dict[int, list[_Run]] = {}
        structured: list[_Run] = []
        for run in self.runs:
            owner = run[2]
            rank = ranks[owner] if owner >= 0 else 0
            if rank == _STRUCTURED:
                structured.append(run)
            elif rank:
                buckets.setdefault(rank_bucket(rank), []).append(run)
        plan: list[_GroupPlan] = [_KroneckerPlan(self._rows(start, stop), owner) for start, stop, owner in structured]
        for runs in buckets.values():
            sliced, runs = _peel_crowded(runs)
            rows = sum(stop - start for start, stop, _ in runs)
            if len(runs) == 1 or (rows < self.batch and len(runs) <= _MAX_SLICED_ADAPTERS and not _laid_out(runs)):
                sliced += runs
            elif runs:
                plan.append(self._segments(runs, ranks, device))
            plan += [_RunPlan(self._rows(start, stop), owner) for start, stop, owner in sliced]
        return plan

    def _rows(self, start: int, stop: int) -> slice | None:
        """A run's rows as a batch slice; None for every row of the batch."""
        return None if stop - start == self.batch else slice(start, stop)

    def _segments(self, runs: list[_Run], ranks: tuple[int, ...], device: torch.device) -> _SegmentsPlan:
        """Each distinct adapter once, its rows laid out ``(adapters, rows per adapter)``."""
        rows_of: dict[int, list[int]] = {}
        for start, stop, owner in runs:
            rows_of.setdefault(owner, []).extend(range(start, stop))
        owned = list(rows_of.values())
        per_adapter = max(len(own) for own in owned)
        layout = [own[min(i, len(own) - 1)] for own in owned for i in range(per_adapter)]
        adapters = list(rows_of)
        group_ranks = {ranks[adapter] for adapter in adapters}
        padded = max(group_ranks) if len(group_ranks) > 1 else None
        if layout == list(range(layout[0], layout[0] + len(layout))):
            span = None if len(layout) == self.batch else slice(layout[0], layout[0] + len(layout))
            return _SegmentsPlan(adapters, padded, span=span)
        kept = [slot * per_adapter + i for slot, own in enumerate(owned) for i in range(len(own))]
        targets = [row for own in owned for row in own]

        def index(values: list[int]) -> torch.Tensor:
            return torch.tensor(values, device=device)

        keep = None if len(kept) == len(layout) else index(kept)
        return _SegmentsPlan(adapters, padded, take=index(layout), keep=keep, rows=index(targets))


@dataclass(frozen=True)
class _RunPlan:
    """A run of rows of one adapter: a :class:`LowRankGroup` over its own pair."""

    rows: slice | None
    adapter: int  # its number among the batch's distinct adapters

    def build(self, deltas: list[ModuleDelta | None], stacks: StackMemo) -> LowRankGroup:
        member = deltas[self.adapter]
        return LowRankGroup(self.rows, member.lora_a, member.lora_b)


@dataclass(frozen=True)
class _SegmentsPlan:
    """Rows of several adapters as :class:`AdapterSegments`: each adapter's pair stacked once (one op for
    pairs of one rank; zero-padded to ``padded_rank`` otherwise, which adds exact zeros)."""

    adapters: list[int]  # numbers among the batch's distinct adapters, in layout order
    padded_rank: int | None
    span: slice | None = None
    take: torch.Tensor | None = None
    keep: torch.Tensor | None = None
    rows: torch.Tensor | None = None

    def build(self, deltas: list[ModuleDelta | None], stacks: StackMemo) -> AdapterSegments:
        members = [deltas[adapter] for adapter in self.adapters]
        a, b = stacks.get(("pairs", self.padded_rank), members, partial(self._stack, members))
        return AdapterSegments(
            a, b, span=self.span, take=self.take, keep=self.keep, rows=self.rows, adapters=tuple(self.adapters)
        )

    def _stack(self, members: list[ModuleDelta]) -> tuple[torch.Tensor, torch.Tensor]:
        if self.padded_rank is None:
            return torch.stack([member.lora_a for member in members]), torch.stack([m.lora_b for m in members])
        like = members[0].lora_a
        a = like.new_zeros(len(members), like.shape[0], self.padded_rank)
        b = like.new_zeros(len(members), self.padded_rank, members[0].lora_b.shape[1])
        for slot, member in enumerate(members):
            a[slot, :, : member.lora_a.shape[1]] = member.lora_a
            b[slot, : member.lora_b.shape[0], :] = member.lora_b
        return a, b


class _RowMask:
    """``(rows, 1, columns)``: 1 where a row's adapter owns the column; built on first use, since most plans
    that could use it do not: each row picks its adapter's row of a small table of column owners."""

    def __init__(
        self, layout: _BatchLayout, adapters: int, column_owners: list[int], dtype: torch.dtype, device: torch.device
    ) -> None:
        self._layout = layout
        self.key: MaskKey = (adapters, tuple(column_owners), dtype, device)

    @cached_property
    def tensor(self) -> torch.Tensor:
        return _mask_for(self.key, self._layout.row_numbers(self.key[3]))


def _mask_for(key: MaskKey, row_numbers: torch.Tensor) -> torch.Tensor:
    """``(rows, 1, columns)``: each row's adapter's row of the column-owner table."""
    return _column_owner_table(*key).index_select(0, row_numbers).unsqueeze(1)


@lru_cache(maxsize=256)
def _column_owner_table(
    adapters: int, column_owners: tuple[int, ...], dtype: torch.dtype, device: torch.device
) -> torch.Tensor:
    """``(adapters + 1, columns)``: row ``n + 1`` is 1 on adapter ``n``'s columns, row 0 (the base model) all 0.
    Depends on adapter numbers and ranks only, so batches of the same shape share it."""
    return torch.tensor(
        [[0.0] * len(column_owners)] + [[float(owner == n) for owner in column_owners] for n in range(adapters)],
        dtype=dtype,
        device=device,
    )


@dataclass(frozen=True)
class _VectorRequest:
    """A module's per-row scaling vectors, asked for while a batch is built and set by one gather after."""

    into: RowDeltas
    field_name: str  # in_scale, out_scale or bias_scale
    vectors: list[torch.Tensor | None]  # one per distinct adapter; None: ones
    width: int
    dtype: torch.dtype
    device: torch.device


@dataclass(frozen=True)
class _VectorGather:
    """Every scaling vector of a batch of one dtype and device: ``table`` indexed by row, split by module."""

    table: torch.Tensor  # (adapters + 1, sum of widths)
    widths: tuple[int, ...]
    requests: list[_VectorRequest]

    def rows(self, row_numbers: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Each request's ``(rows, 1, width)`` vectors for rows of these numbers (0: the base model)."""
        # split_with_sizes: Tensor.split is a Python wrapper around it
        return self.table.index_select(0, row_numbers).unsqueeze(1).split_with_sizes(self.widths, dim=2)

    def set(self, vectors: tuple[torch.Tensor, ...]) -> None:
        for request, rows in zip(self.requests, vectors, strict=True):
            setattr(request.into, request.field_name, rows)


def _scale_table(requests: list[_VectorRequest], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """``(adapters + 1, widths)``: each request's distinct vectors in its columns, ones for the base model's
    row and for adapters without a vector."""
    blocks = []
    for request in requests:
        ones = torch.ones(1, request.width, dtype=dtype, device=device)
        vectors = (ones if v is None else v.reshape(1, request.width).to(dtype) for v in request.vectors)
        blocks.append(torch.cat([ones, *vectors]))
    return torch.cat(blocks, dim=1)


@dataclass(frozen=True)
class _MaskedPlan:
    """Rows of several adapters as :class:`MaskedPairs`: their pairs side by side, a row mask per batch."""

    adapters: list[int]  # numbers among the batch's distinct adapters, in column order
    mask: _RowMask

    def build(self, deltas: list[ModuleDelta | None], stacks: StackMemo) -> MaskedPairs:
        members = [deltas[adapter] for adapter in self.adapters]
        a, b = stacks.get(("side by side",), members, partial(_side_by_side, members))
        return MaskedPairs(a, b, self.mask.tensor, self.mask.key)


def _side_by_side(members: list[ModuleDelta]) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.cat([m.lora_a for m in members], dim=1), torch.cat([m.lora_b for m in members])


@dataclass(frozen=True)
class _MaskedChoice:
    """A plan with :class:`MaskedPairs`, and the columns per row it computes for nothing (times the module's
    features: multiply-adds wasted)."""

    plan: list[_GroupPlan | _MaskedPlan]
    wasted: int


def _ops(plan: list) -> int:
    """Tensor ops a plan runs per forward: what its groups cost beyond their arithmetic on a CPU."""
    total = 0
    for group in plan:
        if isinstance(group, _SegmentsPlan) and group.take is not None:
            total += 4 if group.keep is None else 5
        else:
            total += 3 if isinstance(group, _MaskedPlan) else 2
    return total


@dataclass(frozen=True)
class _KroneckerPlan:
    """A run of rows of one LoKr adapter served through its factors: a :class:`KroneckerRun`."""

    rows: slice | None
    adapter: int

    def build(self, deltas: list[ModuleDelta | None], stacks: StackMemo) -> KroneckerRun:
        w1, w2t = deltas[self.adapter].kronecker
        return KroneckerRun(self.rows, w1, w2t)


def _served_rank(delta: ModuleDelta | None, features: int) -> int:
    """The rank of a delta's pair in a layout: 0 without one, :data:`_STRUCTURED` for a LoKr delta whose pair
    reads at least :data:`_STRUCTURED_MIN_READ` numbers and many times its Kronecker factors."""
    if delta is None or delta.lora_a is None:
        return 0
    rank = delta.lora_a.shape[1]
    reads = rank * features
    if delta.kronecker is not None and reads >= max(_STRUCTURED_MIN_READ, 8 * sum(f.numel() for f in delta.kronecker)):
        return _STRUCTURED
    return rank


_GroupPlan = _RunPlan | _SegmentsPlan | _KroneckerPlan


class StackMemo:
    """Stacked adapter pairs and scaling tables of recent batches, reused while their adapters are the same.

    With requests joining and leaving, the batch changes nearly every step while the set of adapters in it
    rarely does; stacking each module's pairs again for every new batch was most of what a new batch cost.
    Entries are keyed by the identity of the parts stacked and keep those parts alive (so an identity is
    never reused while its entry exists); a bounded number of recent entries is kept, about two batches'
    worth (five per wrapped module: its pairs, scale tables and its share of siblings' concatenated pairs), so
    the copies held beyond the batch in flight stay bounded.
    """

    def __init__(self, capacity: int = 0) -> None:
        self.capacity = capacity
        self._entries: OrderedDict[tuple, tuple[list, Any]] = OrderedDict()
        self._handed: dict[int, int] | None = None

    @contextmanager
    def handed_out(self) -> Iterator[dict[int, int]]:
        """Within it, the bytes of every value :meth:`get` returns (made or found), by value identity: what a
        batch built meanwhile keeps alive beyond its adapters' own tensors."""
        self._handed = handed = {}
        try:
            yield handed
        finally:
            self._handed = None

    def get(self, kind: tuple, parts: list, make: Callable[[], _Stacked]) -> _Stacked:
        key = (kind, *map(id, parts))
        entry = self._entries.get(key)
        if entry is not None:
            self._entries.move_to_end(key)
            value = entry[1]
        else:
            value = make()
            self._entries[key] = (parts, value)
            while len(self._entries) > self.capacity:
                self._entries.popitem(last=False)
        if self._handed is not None:
            tensors = value if isinstance(value, tuple) else (value,)
            self._handed[id(value)] = sum(tensor.nbytes for tensor in tensors)
        return value


def _peel_crowded(runs: list[_Run]) -> tuple[list[_Run], list[_Run]]:
    """Take adapters with many more rows than the others out of a stacked group, as runs of their own.

    The stacked layout pads every adapter to the rows of the busiest one: in a packed pass a prompt chunk
    gives its adapter dozens of rows (its tokens) beside one per decoding row, which would pad every other
    adapter to dozens too (measured: a 22-token chunk beside 16 decoding rows over 8 LoRA made the pass
    twice a decoding step). Returns the peeled adapters' runs and the runs left for the stack.
    """
    peeled: list[_Run] = []
    while True:
        counts: Counter[int] = Counter()
        for start, stop, owner in runs:
            counts[owner] += stop - start
        if len(counts) <= 1 or len(counts) * max(counts.values()) <= 2 * counts.total():
            return peeled, runs
        busiest, _ = counts.most_common(1)[0]
        peeled += [run for run in runs if run[2] == busiest]
        runs = [run for run in runs if run[2] != busiest]


def _laid_out(runs: list[_Run]) -> bool:
    """Whether runs of distinct adapters are equal and back to back: a stack's layout, viewed in place."""
    lengths = {stop - start for start, stop, _ in runs}
    owners = {owner for _, _, owner in runs}
    contiguous = all(runs[i][1] == runs[i + 1][0] for i in range(len(runs) - 1))
    return len(lengths) == 1 and len(owners) == len(runs) and contiguous


def _contiguous_runs(owners: list[int]) -> list[_Run]:
    """``(start, stop, owner)`` runs of consecutive rows of one owner (row ``i`` is ``owners[i]``'s); many runs
    if owners interleave."""
    runs: list[_Run] = []
    for row, owner in enumerate(owners):
        if runs and runs[-1][2] == owner:
            runs[-1] = (runs[-1][0], row + 1, owner)
        else:
            runs.append((row, row + 1, owner))
    return runs
