"""An adapter's tensors packed into one buffer: the form the host tier keeps thousands of adapters in.

Python's cyclic garbage collector walks every container object it tracks on each full collection, holding
the GIL: every running stream stalls meanwhile. In runtime form (:class:`AdapterWeights`) an adapter is
about five tracked objects per module (its tensors, its record): ~140 for a demo LoRA, ~1,100 for an
all-linear LoRA of a 32-layer 7-8B model, so a host tier of a thousand such adapters made every full
collection walk a million objects. Packed, an adapter is a few tracked objects whatever its size: one byte
buffer, and a layout of plain tuples of names and numbers (which the collector stops tracking after its first
look, since they cannot take part in a cycle).

Unpacking makes views into the buffer (no copy) or, for another device, copies the whole buffer in one
transfer (one host-to-device copy instead of one per tensor) and then makes views.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from peftserve.adapter_weights import AdapterWeights, ModuleDelta

# Each tensor starts on a multiple of this many bytes: every dtype's alignment, and the 16 bytes triton
# specialises its kernels' pointers on.
ALIGNMENT = 64
_FIELDS = ("lora_a", "lora_b", "in_scale", "out_scale")
_KRONECKER = ("kronecker_1", "kronecker_2")
_TOP_LEVEL = ("prefix_kv", "virtual_embeddings")

# (module index or -1 for the adapter itself, field, dtype, shape, strides, byte offset)
_Entry = tuple[int, str, torch.dtype, tuple[int, ...], tuple[int, ...], int]


@dataclass(frozen=True, slots=True)
class PackedAdapter:
    """One adapter's tensors in ``buffer`` (uint8), placed as ``layout`` says; ``modules`` keeps each module's
    name and whether it scales the bias, in the adapter's order."""

    peft_type: str
    buffer: torch.Tensor
    modules: tuple[tuple[str, bool], ...]
    layout: tuple[_Entry, ...]

    @property
    def nbytes(self) -> int:
        """The buffer's size, alignment padding included: what keeping this adapter costs."""
        return self.buffer.numel()

    @classmethod
    def pack(cls, weights: AdapterWeights, *, pin: bool = False) -> PackedAdapter:
        """Copy every tensor of ``weights`` into one new CPU buffer (page-locked with ``pin``, so that a copy
        to a CUDA device need not stall the copying thread). Strides are kept for tensors that fill their
        span without gaps (a transposed view); any other tensor is packed contiguous."""
        named: list[tuple[int, str, torch.Tensor]] = [
            (-1, name, tensor) for name in _TOP_LEVEL if (tensor := getattr(weights, name)) is not None
        ]
        modules = []
        for index, (module, delta) in enumerate(weights.modules.items()):
            modules.append((module, delta.scales_bias))
            named += [(index, name, t) for name in _FIELDS if (t := getattr(delta, name)) is not None]
            if delta.kronecker is not None:
                named += [(index, name, t) for name, t in zip(_KRONECKER, delta.kronecker, strict=True)]
        layout, offset = [], 0
        for index, name, tensor in named:
            strides = tensor.stride() if _fills_its_span(tensor) else _contiguous_strides(tensor.shape)
            layout.append((index, name, tensor.dtype, tuple(tensor.shape), tuple(strides), offset))
            offset += _aligned(tensor.numel() * tensor.element_size())
        buffer = torch.empty(offset, dtype=torch.uint8, pin_memory=pin)
        for (_, _, dtype, shape, strides, start), (_, _, tensor) in zip(layout, named, strict=True):
            _view(buffer, dtype, shape, strides, start).copy_(tensor)
        return cls(weights.peft_type, buffer, tuple(modules), tuple(layout))

    def unpack(self, device: torch.device | None = None, *, non_blocking: bool = False) -> AdapterWeights:
        """The adapter in runtime form: views into the buffer, or on ``device`` (when it is not the buffer's)
        views into one copy of it made by a single transfer (``non_blocking`` from a page-locked buffer)."""
        buffer = self.buffer
        if device is not None and torch.device(device) != buffer.device:
            buffer = buffer.to(device, non_blocking=non_blocking)
        deltas = [ModuleDelta(scales_bias=scales_bias) for _, scales_bias in self.modules]
        modules = {name: delta for (name, _), delta in zip(self.modules, deltas, strict=True)}
        weights = AdapterWeights(self.peft_type, modules, packed_from=self)
        kronecker: dict[int, dict[str, torch.Tensor]] = {}
        for index, name, dtype, shape, strides, start in self.layout:
            tensor = _view(buffer, dtype, shape, strides, start)
            if index < 0:
                setattr(weights, name, tensor)
            elif name in _KRONECKER:
                kronecker.setdefault(index, {})[name] = tensor
            else:
                setattr(deltas[index], name, tensor)
        for index, factors in kronecker.items():
            deltas[index].kronecker = (factors["kronecker_1"], factors["kronecker_2"])
        return weights


def _aligned(nbytes: int) -> int:
    return -(-nbytes // ALIGNMENT) * ALIGNMENT


def _contiguous_strides(shape: torch.Size) -> tuple[int, ...]:
    strides, step = [], 1
    for size in reversed(shape):
        strides.append(step)
        step *= max(size, 1)
    return tuple(reversed(strides))


def _fills_its_span(tensor: torch.Tensor) -> bool:
    """Whether the tensor's elements cover ``numel`` consecutive places in some dimension order (contiguous,
    or transposed / permuted), so that the same strides can address a packed copy of it."""
    dims = sorted((stride, size) for stride, size in zip(tensor.stride(), tensor.shape, strict=True) if size > 1)
    step = 1
    for stride, size in dims:
        if stride != step:
            return False
        step *= size
    return True


def _view(
    buffer: torch.Tensor, dtype: torch.dtype, shape: tuple[int, ...], strides: tuple[int, ...], start: int
) -> torch.Tensor:
    """The tensor placed at byte ``start`` of ``buffer``."""
    flat = buffer[start : start + math.prod(shape) * dtype.itemsize].view(dtype)
    return flat.as_strided(shape, strides, flat.storage_offset())
