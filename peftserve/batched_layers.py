"""Apply a different adapter to each row of a batch inside the base model's linear layers.

PEFT's ``adapter_names`` mixed batches are exact for LoRA only and silently apply the active adapter to
every row for IA3 and the others. Here every targeted ``nn.Linear`` is wrapped once by
:class:`AdapterLinear`; for the batch in flight it holds per-row tensors (gathered LoRA factors, IA3
vectors), so a batch mixing adapters and types is one batched computation: two ``bmm`` for LoRA rows,
broadcast multiplies for IA3 rows, and nothing extra for rows without an adapter on that module.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

from peftserve.adapter_weights import AdapterWeights


@dataclass
class RowDeltas:
    """Per-row tensors of one module for the batch in flight (``B`` = batch rows)."""

    lora_a: torch.Tensor | None = None  # (B, in, r), zeros for rows without a low-rank pair here
    lora_b: torch.Tensor | None = None  # (B, r, out)
    in_scale: torch.Tensor | None = None  # (B, 1, in), ones for rows without input scaling
    out_scale: torch.Tensor | None = None  # (B, 1, out), ones for rows without output scaling
    bias_scale: torch.Tensor | None = None  # (B, 1, out), set only when the layer has a bias

    def select_rows(self, rows: torch.Tensor) -> RowDeltas:
        return RowDeltas(*(None if t is None else t.index_select(0, rows) for t in vars(self).values()))


class AdapterLinear(nn.Module):
    """A base ``nn.Linear`` plus whatever per-row deltas the current batch installed.

    Per row: ``(W (x * in_scale) + x A B) * out_scale + bias * bias_scale``; each row belongs to one adapter,
    so at most one of the terms differs from the identity for it.
    """

    def __init__(self, base: nn.Linear) -> None:
        super().__init__()
        self.base = base
        self.rows: RowDeltas | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = self.rows
        if rows is None:
            return self.base(x)
        out = F.linear(x if rows.in_scale is None else x * rows.in_scale, self.base.weight)
        if rows.lora_a is not None:
            out = out + torch.bmm(torch.bmm(x, rows.lora_a), rows.lora_b)
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
    """The per-module :class:`RowDeltas` of one batch; can shrink as rows finish."""

    def __init__(self, layers: AdapterLayers, row_adapters: Sequence[AdapterWeights | None]) -> None:
        self.layers = layers
        self.per_module: dict[str, RowDeltas] = {}
        touched = {name for adapter in row_adapters if adapter for name in adapter.modules}
        for name in touched:
            self.per_module[name] = _gather(name, row_adapters, self.layers.wrapped[name].base)

    def install(self) -> None:
        for name, layer in self.layers.wrapped.items():
            layer.rows = self.per_module.get(name)

    def keep_rows(self, rows: torch.Tensor) -> None:
        """Drop finished rows (``rows``: indices to keep), matching a compacted KV cache."""
        self.per_module = {name: deltas.select_rows(rows) for name, deltas in self.per_module.items()}
        self.install()


def _gather(name: str, row_adapters: Sequence[AdapterWeights | None], base: nn.Linear) -> RowDeltas:
    weight = base.weight
    deltas = [adapter.modules.get(name) if adapter else None for adapter in row_adapters]
    batch = len(deltas)
    result = RowDeltas()
    ranks = [d.lora_a.shape[1] for d in deltas if d is not None and d.lora_a is not None]
    if ranks:
        rank = max(ranks)
        result.lora_a = weight.new_zeros(batch, base.in_features, rank)
        result.lora_b = weight.new_zeros(batch, rank, base.out_features)
        for row, delta in enumerate(deltas):
            if delta is not None and delta.lora_a is not None:
                r = delta.lora_a.shape[1]
                result.lora_a[row, :, :r] = delta.lora_a
                result.lora_b[row, :r, :] = delta.lora_b
    result.in_scale = _row_vectors(deltas, "in_scale", batch, base.in_features, weight)
    result.out_scale = _row_vectors(deltas, "out_scale", batch, base.out_features, weight)
    if base.bias is not None and any(d is not None and d.scales_bias for d in deltas):
        result.bias_scale = weight.new_ones(batch, 1, base.out_features)
        for row, delta in enumerate(deltas):
            if delta is not None and delta.scales_bias:
                result.bias_scale[row, 0] = delta.out_scale
    return result


def _row_vectors(deltas: list, field: str, batch: int, width: int, like: torch.Tensor) -> torch.Tensor | None:
    """Stack one per-row scaling vector (ones where a row has none), or None if no row has one."""
    if not any(d is not None and getattr(d, field) is not None for d in deltas):
        return None
    stacked = like.new_ones(batch, 1, width)
    for row, delta in enumerate(deltas):
        if delta is not None and getattr(delta, field) is not None:
            stacked[row, 0] = getattr(delta, field)
    return stacked
