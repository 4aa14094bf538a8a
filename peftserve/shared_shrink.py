"""One low-rank shrink for sibling layers: layers that read the very same input, like q/k/v or gate/up.

Each adapted layer computes ``x @ A`` and then adds ``(x @ A) @ B`` to its output. Siblings read one ``x``,
so the shrinks of all of them are one matmul over their ``A`` side by side, and each sibling then only adds
its own columns times its ``B``: q/k/v go from three shrinks to one, gate/up from two to one (vLLM's merged
QKV LoRA layers do the same on GPUs). On a CPU a small op's dispatch costs about what its arithmetic does,
so every shrink saved is time saved.

Which layers are siblings is learned, not assumed from names: :class:`SiblingTrace` watches the wrapped
layers' calls in one forward pass (a one-token probe run when layers are wrapped) and groups consecutive
calls on the same tensor. At run time a sibling
still checks that its input is the one the shared shrink was computed from, and computes alone otherwise,
so a wrong guess costs time, never a wrong answer.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, replace
from functools import partial
from typing import Any

import torch
from torch import nn


@dataclass(frozen=True)
class ShrinkForm:
    """How one group of a layer shrinks its rows, for sharing with siblings.

    ``kind`` is ``"rows"`` (the rows ``rows`` of ``x``, or all of them, times ``a`` of shape ``(in, r)``, then
    times ``mask`` if set) or ``"segments"`` (``x`` over ``rows`` laid out ``(adapters, m, in)``, batched by
    ``a`` of shape ``(adapters, in, r)``); groups of siblings with equal ``kind`` and ``rows`` shrink the same
    rows the same way, so their ``a`` concatenate along the rank axis. ``b`` is what the layer's part of the
    shrink is multiplied by and added to its output (``(r, out)`` or ``(adapters, r, out)``).
    """

    kind: str
    rows: slice | None
    a: torch.Tensor
    b: torch.Tensor
    mask: torch.Tensor | None = None
    adapters: tuple[int, ...] = ()  # "segments": who each stacked pair belongs to, in order
    # What ``mask`` is made from: (adapters, each column's owner, dtype, device); see batched_layers.MaskKey.
    mask_key: tuple | None = None


def _input_key(x: torch.Tensor) -> tuple:
    # A reshaped view (packed passes) has the caller's data pointer: storage, shape and strides together say
    # "the same tensor" while a reference to it is held (held storage is never handed to another tensor).
    return x.data_ptr(), tuple(x.shape), x.stride()


class SharedShrink:
    """The concatenated shrink of sibling groups, computed once per input and read by each sibling."""

    def __init__(self, forms: list[ShrinkForm], a: torch.Tensor) -> None:
        first = forms[0]
        self.kind, self.rows, self.a = first.kind, first.rows, a
        self.mask: torch.Tensor | None = None
        if any(form.mask is not None for form in forms):
            rows = next(form.mask for form in forms if form.mask is not None).shape[0]
            self.mask = torch.cat(
                [form.mask if form.mask is not None else a.new_ones(rows, 1, form.a.shape[-1]) for form in forms],
                dim=-1,
            )
        # Where every form's mask is known by its columns' owners, the concatenated mask's: a batch template
        # (batched_layers._MaskTemplate) makes it anew for each arrangement of rows.
        keys = [form.mask_key for form in forms]
        self.mask_key = None
        if all(key is not None for key in keys):
            self.mask_key = (keys[0][0], tuple(owner for key in keys for owner in key[1]), *keys[0][2:])
        self._key: tuple | None = None
        self._held: torch.Tensor | None = None
        self._low: torch.Tensor | None = None

    def low(self, x: torch.Tensor) -> torch.Tensor:
        """The siblings' shrink of ``x``: ``(tokens, total rank)`` for rows, ``(adapters, m, total rank)`` for
        segments; computed on the first sibling's call and reused by the others."""
        if x is self._held:  # decoding: the siblings' input as called
            return self._low
        key = _input_key(x)
        if self._held is not None and key == self._key:  # a packed pass: another view of that input
            return self._low
        selected = x if self.rows is None else x[self.rows]
        if self.kind == "segments":
            low = torch.bmm(selected.reshape(self.a.shape[0], -1, x.shape[-1]), self.a)
        else:
            low = torch.matmul(selected, self.a)
            if self.mask is not None:
                low.mul_(self.mask)
            low = low.view(-1, low.shape[-1])
        self._key, self._held, self._low = key, x, low
        return low

    def expand(self, out: torch.Tensor, low: torch.Tensor, columns: slice, b: torch.Tensor) -> None:
        """Add one sibling's columns of ``low`` times its ``b`` to its output, in place."""
        target = out if self.rows is None else out[self.rows]
        if self.kind == "segments":
            target.view(self.a.shape[0], -1, out.shape[-1]).baddbmm_(low[..., columns], b)
        else:
            target.view(-1, out.shape[-1]).addmm_(low[:, columns], b)


@dataclass
class SiblingPart:
    """A layer's low-rank group served from its siblings' :class:`SharedShrink`: one op, its expand."""

    shared: SharedShrink
    columns: slice
    b: torch.Tensor

    def add_to(self, out: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        self.shared.expand(out, self.shared.low(x), self.columns, self.b)
        return out


def share_shrinks(
    groups_of: dict[str, list[Any]],
    siblings: list[list[str]],
    stacked: Callable[[list[torch.Tensor], int], torch.Tensor],
    batch: int,
    spare_macs: int,
) -> None:
    """Replace, in each layer's list of low-rank groups, the groups that siblings can share by
    :class:`SiblingPart` s of one :class:`SharedShrink` per sibling set and form.

    ``groups_of`` maps a layer name to its groups (each may offer ``shrink_form()``); ``stacked(parts, dim)``
    concatenates the siblings' ``a`` (memoised by the caller, since the same adapters stay across batches).
    A group over some of the ``batch`` rows joins siblings over every row, masked to its own rows, when the
    rows it then computes for nothing cost at most ``spare_macs`` multiply-adds (what an op saved is worth).
    """
    for names in siblings:
        candidates: dict[tuple, list[tuple[str, int, ShrinkForm]]] = {}
        for name in names:
            for index, group in enumerate(groups_of.get(name, ())):
                form = getattr(group, "shrink_form", lambda: None)()
                if form is not None:
                    form = _over_every_row(form, batch, spare_macs)
                    key = (form.kind, _slice_key(form.rows), form.adapters)
                    candidates.setdefault(key, []).append((name, index, form))
        for parts in candidates.values():
            if len(parts) < 2 or len({name for name, _, _ in parts}) < len(parts):
                continue
            forms = [form for _, _, form in parts]
            axis = 2 if forms[0].kind == "segments" else 1
            shared = SharedShrink(forms, stacked([form.a for form in forms], axis))
            start = 0
            for name, index, form in parts:
                width = form.a.shape[-1]
                groups_of[name][index] = SiblingPart(shared, slice(start, start + width), form.b)
                start += width


def _over_every_row(form: ShrinkForm, batch: int, spare_macs: int) -> ShrinkForm:
    """A form over a slice of rows as the same form over every row, masked to the slice, where the rows
    computed for nothing cost at most ``spare_macs``; the form unchanged otherwise."""
    if form.kind != "rows" or form.rows is None:
        return form
    in_features, rank = form.a.shape
    if (batch - (form.rows.stop - form.rows.start)) * rank * in_features > spare_macs:
        return form
    mask = form.a.new_zeros(batch, 1, rank)
    mask[form.rows] = 1
    return replace(form, rows=None, mask=mask)


def _slice_key(rows: slice | None) -> tuple | None:
    return None if rows is None else (rows.start, rows.stop)


class SiblingTrace:
    """Records the calls of wrapped layers during one forward pass, to tell which layers are siblings.

    It listens through forward pre-hooks, removed by :meth:`finish`, so the layers' own forward carries no
    tracing code between probes.
    """

    def __init__(self, layers: dict[str, nn.Module]) -> None:
        self._calls: list[tuple[str, tuple, torch.Tensor]] = []
        self._hooks = [
            layer.register_forward_pre_hook(partial(self._record, name), with_kwargs=True)
            for name, layer in layers.items()
        ]

    def _record(self, name: str, _layer: nn.Module, args: tuple, kwargs: dict) -> None:
        x = args[0] if args else next(iter(kwargs.values()))
        self._calls.append((name, _input_key(x), x))

    def finish(self) -> list[list[str]]:
        """Stop recording; the groups of layers called one after another on one tensor. A layer called more
        than once in the pass (shared weights) is left out: its calls need not share one input."""
        for hook in self._hooks:
            hook.remove()
        counts = Counter(name for name, _, _ in self._calls)
        groups: list[list[str]] = []
        previous: tuple | None = None
        for name, key, _ in self._calls:
            if groups and key == previous:
                groups[-1].append(name)
            else:
                groups.append([name])
            previous = key
        self._calls.clear()
        return [kept for names in groups if len(kept := [name for name in names if counts[name] == 1]) > 1]
