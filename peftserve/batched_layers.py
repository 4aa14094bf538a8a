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

from peftserve.adapter_weights import AdapterWeights


@dataclass
class RowDeltas:
    """Per-row tensors of one module for the batch in flight (``B`` = batch rows)."""

    lora_a: torch.Tensor | None = None  # (B, in, r), zeros for rows without LoRA here
    lora_b: torch.Tensor | None = None  # (B, r, out)
    ia3_in: torch.Tensor | None = None  # (B, 1, in), ones for rows without input scaling
    ia3_out: torch.Tensor | None = None  # (B, 1, out)

    def select_rows(self, rows: torch.Tensor) -> RowDeltas:
        return RowDeltas(*(None if t is None else t.index_select(0, rows) for t in vars(self).values()))


class AdapterLinear(nn.Module):
    """A base ``nn.Linear`` plus whatever per-row deltas the current batch installed."""

    def __init__(self, base: nn.Linear) -> None:
        super().__init__()
        self.base = base
        self.rows: RowDeltas | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = self.rows
        if rows is None:
            return self.base(x)
        out = self.base(x if rows.ia3_in is None else x * rows.ia3_in)
        if rows.ia3_out is not None:
            out = out * rows.ia3_out
        if rows.lora_a is not None:
            out = out + torch.bmm(torch.bmm(x, rows.lora_a), rows.lora_b)
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
    in_features, out_features = base.in_features, base.out_features
    deltas = [adapter.modules.get(name) if adapter else None for adapter in row_adapters]
    batch = len(deltas)
    result = RowDeltas()
    ranks = [d.lora_a.shape[1] for d in deltas if d is not None and d.lora_a is not None]
    if ranks:
        rank = max(ranks)
        result.lora_a = weight.new_zeros(batch, in_features, rank)
        result.lora_b = weight.new_zeros(batch, rank, out_features)
        for row, delta in enumerate(deltas):
            if delta is not None and delta.lora_a is not None:
                r = delta.lora_a.shape[1]
                result.lora_a[row, :, :r] = delta.lora_a
                result.lora_b[row, :r, :] = delta.lora_b
    if any(d is not None and d.ia3_in is not None for d in deltas):
        result.ia3_in = weight.new_ones(batch, 1, in_features)
        for row, delta in enumerate(deltas):
            if delta is not None and delta.ia3_in is not None:
                result.ia3_in[row, 0] = delta.ia3_in
    if any(d is not None and d.ia3_out is not None for d in deltas):
        result.ia3_out = weight.new_ones(batch, 1, out_features)
        for row, delta in enumerate(deltas):
            if delta is not None and delta.ia3_out is not None:
                result.ia3_out[row, 0] = delta.ia3_out
    return result
