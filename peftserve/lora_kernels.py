"""Per-token adapter ops over slot stacks (SGMV/BGMV semantics), with one backend per device.

Every op takes a packed batch of tokens, ``(T, features)``, and a :class:`TokenSlots`: the slot of each
token in a preallocated stack (:mod:`peftserve.slot_tables`). A ``(rows, seq)`` batch is the same thing
flattened. Slot :data:`NO_SLOT` means "no adapter": the low-rank ops leave such tokens alone, and the
scale tables hold a row of ones there.

Two backends compute the same thing: :class:`TorchKernels` (plain torch; the CPU path and the reference)
and the triton-lang kernels of :mod:`peftserve.lora_triton` for CUDA tensors. triton is optional and is
imported only when a CUDA tensor asks for it, so a CPU server neither needs it installed nor pays for
importing it here.
"""

from __future__ import annotations

import importlib
import importlib.util
from dataclasses import dataclass, field
from typing import Protocol

import torch

NO_SLOT = 0  # stacks keep this row as the identity (zeros for low rank, ones for scales)

# Below this many numbers a row scatter-add goes through index_put_, above it through index_add_. On CPU, in
# the decoding loop's thread with 2 threads, index_put_(accumulate=True) took 6-14 us up to ~25,000 numbers
# and then 135-980 us (32-128 rows of 512-1,408 features; 48 rows of 1,408: 442 against 20 us), up to 3.5 ms
# per module in a 388-token prefill, while index_add_ took a flat 14-26 us, a few us more on small deltas.
_INDEX_ADD_FROM = 1 << 14


def add_rows(out: torch.Tensor, rows: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    """``out[rows] += delta`` in place (``rows`` distinct), by whichever op is faster for the delta's size."""
    if delta.numel() < _INDEX_ADD_FROM:
        return out.index_put_((rows,), delta, accumulate=True)
    return out.index_add_(0, rows, delta)


@dataclass(frozen=True)
class TokenSlots:
    """The slot of every token in one stack, plus the tokens grouped by slot for the segmented kernels.

    Built once per batch and stack (every module of one rank bucket shares it); everything is computed on
    the device without a host sync, so building it does not stall a CUDA stream.
    """

    slots: torch.Tensor  # (T,) int32
    num_slots: int  # rows in the stack, NO_SLOT included
    order: torch.Tensor  # (T,) int64: token indices sorted by slot, stable
    starts: torch.Tensor  # (num_slots,) int64: where each slot's tokens begin in ``order``
    counts: torch.Tensor  # (num_slots,) int64: how many tokens each slot has
    # rank -> the torch backend's split of the tokens (TokenRuns), worked out on first use
    host_runs: dict[int, TokenRuns] = field(default_factory=dict, compare=False, repr=False)

    @classmethod
    def build(cls, slots: torch.Tensor, num_slots: int, *, without_sort: bool = False) -> TokenSlots:
        """``without_sort``: order the tokens by counting instead of a stable sort, for a CUDA graph's capture
        (CUB's stable sorts are not all capturable); it takes tokens x slots memory, fine for a decoding step."""
        if slots.dim() != 1 or slots.dtype != torch.int32:
            raise ValueError(f"slots must be a 1-d int32 tensor, got {tuple(slots.shape)} {slots.dtype}")
        index = slots.long()
        # scatter_add_, not bincount: bincount on CUDA reads the maximum back to the host.
        counts = torch.zeros(num_slots, dtype=torch.int64, device=slots.device)
        counts.scatter_add_(0, index, torch.ones_like(index))
        starts = torch.cumsum(counts, 0) - counts
        if without_sort:  # token t goes to its slot's start plus the number of earlier tokens of that slot
            same = index[:, None] == torch.arange(num_slots, device=slots.device)
            earlier = (torch.cumsum(same, 0) - same.long()).gather(1, index[:, None])[:, 0]
            order = torch.empty_like(index)
            order.scatter_(0, starts[index] + earlier, torch.arange(len(slots), device=slots.device))
        else:
            order = torch.argsort(slots, stable=True)
        return cls(slots, num_slots, order, starts, counts)

    @property
    def tokens(self) -> int:
        return self.slots.shape[0]


class LoraKernels(Protocol):
    """The three per-token ops; every backend implements them with these semantics."""

    def shrink(self, x: torch.Tensor, a: torch.Tensor, slots: TokenSlots) -> torch.Tensor:
        """Semantics: ``y[t] = x[t] @ a[slot[t]]``; ``y[t] = 0`` where ``slot[t] == NO_SLOT``.

        ``x`` (T, in), ``a`` (num_slots, in, R) -> ``y`` (T, R) in ``x``'s dtype.
        """
        ...

    def expand(self, out: torch.Tensor, y: torch.Tensor, b: torch.Tensor, slots: TokenSlots) -> None:
        """Semantics: ``out[t] += y[t] @ b[slot[t]]`` in place; rows with ``NO_SLOT`` are not touched.

        ``out`` (T, out), ``y`` (T, R), ``b`` (num_slots, R, out).
        """
        ...

    def scale(
        self,
        x: torch.Tensor,
        table: torch.Tensor,
        slots: TokenSlots,
        *,
        out: torch.Tensor | None = None,
        bias: torch.Tensor | None = None,
        bias_scaled: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Semantics: ``out[t] = x[t] * table[slot[t]]`` (``out`` may be ``x``: in place; None: a new tensor).

        With ``bias`` (features,) and ``bias_scaled`` (num_slots,) bool, the bias is added inside the
        scaling for slots that scale it (IA3) and outside for the others (DoRA, plain rows):
        ``out[t] = (x[t] + f b) * table[slot[t]] + (1 - f) b`` with ``f = bias_scaled[slot[t]]``.
        ``NO_SLOT`` is not special here: the tables keep a row of ones there.
        """
        ...


def check_low_rank(x: torch.Tensor, stack: torch.Tensor, slots: TokenSlots, what: str) -> None:
    if x.dim() != 2 or stack.dim() != 3 or x.shape[1] != stack.shape[1] or x.shape[0] != slots.tokens:
        raise ValueError(
            f"{what}: tokens {tuple(x.shape)} do not fit the stack {tuple(stack.shape)} and {slots.tokens} slots"
        )
    if stack.shape[0] != slots.num_slots:
        raise ValueError(f"{what}: the stack has {stack.shape[0]} slots, the index {slots.num_slots}")
    if x.dtype != stack.dtype:
        raise ValueError(f"{what}: tokens are {x.dtype}, the stack {stack.dtype}")
    if not x.device == stack.device == slots.slots.device:
        check_devices(what, tokens=x, stack=stack, slots=slots.slots)


def check_expand(out: torch.Tensor, y: torch.Tensor, b: torch.Tensor, slots: TokenSlots) -> None:
    check_low_rank(y, b, slots, "expand")
    if out.shape != (y.shape[0], b.shape[2]):
        raise ValueError(f"expand: output {tuple(out.shape)} does not fit {y.shape[0]} tokens x {b.shape[2]}")


def check_devices(what: str, **tensors: torch.Tensor | None) -> None:
    """Every tensor on one device: a kernel handed a pointer to another device's memory reads garbage."""
    devices = {name: tensor.device for name, tensor in tensors.items() if tensor is not None}
    if len(set(devices.values())) > 1:
        raise ValueError(f"{what}: tensors on different devices: {devices}")


def check_scale(
    x: torch.Tensor, table: torch.Tensor, slots: TokenSlots, bias: torch.Tensor | None, flags: torch.Tensor | None
) -> None:
    if x.dim() != 2 or table.shape != (slots.num_slots, x.shape[1]) or x.shape[0] != slots.tokens:
        raise ValueError(f"scale: tokens {tuple(x.shape)} do not fit the table {tuple(table.shape)}")
    if (bias is None) != (flags is None):
        raise ValueError("scale: bias and bias_scaled go together")
    if bias is not None and (bias.shape != (x.shape[1],) or flags.shape != (slots.num_slots,)):
        raise ValueError(f"scale: bias {tuple(bias.shape)} or flags {tuple(flags.shape)} do not fit")
    check_devices("scale", tokens=x, table=table, slots=slots.slots, bias=bias, bias_scaled=flags)


class TorchKernels:
    """The plain-torch backend (the CPU path and the reference).

    Tokens are taken in runs of one slot (:class:`TokenRuns`, read to the host once per batch and rank): a
    run long enough that its own matmul costs less than copying its pair once per token is one slice matmul;
    every other token of the batch is computed together, by one batched matmul over the pairs gathered per
    token (``a.index_select(0, slots)``). A decoding batch is then a handful of ops per module however many
    adapters it mixes, and a prefill chunk of one adapter a plain matmul.
    """

    def shrink(self, x: torch.Tensor, a: torch.Tensor, slots: TokenSlots) -> torch.Tensor:
        check_low_rank(x, a, slots, "shrink")
        runs = TokenRuns.of(slots, rank=a.shape[2])
        if runs.gathered_all:  # every token gathered, in order: no zeros to fill, nothing to scatter
            return torch.bmm(x.unsqueeze(1), a.index_select(0, runs.gathered_slots)).squeeze(1)
        y = x.new_empty(x.shape[0], a.shape[2]) if runs.sliced_all else x.new_zeros(x.shape[0], a.shape[2])
        for start, stop, slot in runs.sliced:
            torch.mm(x[start:stop], a[slot], out=y[start:stop])
        if runs.gathered is not None:
            picked = x.index_select(0, runs.gathered).unsqueeze(1)
            y.index_copy_(0, runs.gathered, torch.bmm(picked, a.index_select(0, runs.gathered_slots)).squeeze(1))
        return y

    def expand(self, out: torch.Tensor, y: torch.Tensor, b: torch.Tensor, slots: TokenSlots) -> None:
        check_expand(out, y, b, slots)
        runs = TokenRuns.of(slots, rank=b.shape[1])
        if runs.gathered_all:  # added in place, (T, 1, out) by (T, 1, R) @ (T, R, out)
            out.unsqueeze(1).baddbmm_(y.unsqueeze(1), b.index_select(0, runs.gathered_slots))
            return
        for start, stop, slot in runs.sliced:
            out[start:stop].addmm_(y[start:stop], b[slot])
        if runs.gathered is not None:
            picked = y.index_select(0, runs.gathered).unsqueeze(1)
            delta = torch.bmm(picked, b.index_select(0, runs.gathered_slots)).squeeze(1)
            add_rows(out, runs.gathered, delta)

    def scale(
        self,
        x: torch.Tensor,
        table: torch.Tensor,
        slots: TokenSlots,
        *,
        out: torch.Tensor | None = None,
        bias: torch.Tensor | None = None,
        bias_scaled: torch.Tensor | None = None,
    ) -> torch.Tensor:
        check_scale(x, table, slots, bias, bias_scaled)
        factors = table[slots.slots]
        if bias is None:
            result = x * factors
        else:
            inside = bias_scaled[slots.slots].unsqueeze(1).to(x.dtype)
            result = (x + inside * bias) * factors + (1 - inside) * bias
        if out is None:
            return result
        out.copy_(result)
        return out


# A run of one slot is a slice matmul of its own when a batch has at most MAX_SLICED_RUNS runs in a stack, or
# once its tokens times the rank reach SLICED_RUN_TOKEN_RANKS (rank 8: 8 tokens; rank 64 and up: every run).
# The other tokens are gathered per token, together: a few ops for all of them, against two per sliced run,
# and copying a short run's pair once per token costs less than those ops (measured on CPU, docs/benchmarks.md).
MAX_SLICED_RUNS = 4
SLICED_RUN_TOKEN_RANKS = 64


@dataclass(frozen=True)
class TokenRuns:
    """How :class:`TorchKernels` splits a batch's tokens for a stack of one rank: ``sliced`` runs
    ``(start, stop, slot)``, and the ``gathered`` tokens (None: none) with their slots; ``gathered_all`` and
    ``sliced_all`` when one of the two covers every token. NO_SLOT tokens are in neither."""

    sliced: tuple[tuple[int, int, int], ...]
    gathered: torch.Tensor | None
    gathered_slots: torch.Tensor | None
    gathered_all: bool
    sliced_all: bool = False  # the sliced runs cover every token

    @classmethod
    def of(cls, slots: TokenSlots, *, rank: int) -> TokenRuns:
        """The split of ``slots`` for ``rank``, worked out on the host once per batch and rank (every module
        of a rank bucket reuses it)."""
        found = slots.host_runs.get(rank)
        if found is None:
            found = slots.host_runs[rank] = cls._split(slots.slots.tolist(), rank, slots.slots.device)
        return found

    @classmethod
    def _split(cls, token_slots: list[int], rank: int, device: torch.device) -> TokenRuns:
        runs: list[list[int]] = []  # [start, stop, slot]
        for token, slot in enumerate(token_slots):
            if runs and runs[-1][2] == slot:
                runs[-1][1] = token + 1
            else:
                runs.append([token, token + 1, slot])
        runs = [run for run in runs if run[2] != NO_SLOT]
        few = len(runs) <= MAX_SLICED_RUNS
        sliced, gathered = [], []
        for start, stop, slot in runs:
            if few or (stop - start) * rank >= SLICED_RUN_TOKEN_RANKS:
                sliced.append((start, stop, slot))
            else:
                gathered.extend(range(start, stop))
        if not gathered:
            covered = sum(stop - start for start, stop, _ in sliced) == len(token_slots)
            return cls(tuple(sliced), None, None, False, covered)
        every = len(gathered) == len(token_slots)  # then in order, none NO_SLOT, nothing sliced
        index = torch.tensor(gathered, dtype=torch.int64, device=device)
        slots_of = torch.tensor([token_slots[token] for token in gathered], dtype=torch.int64, device=device)
        return cls(tuple(sliced), index, slots_of, every)


TRITON_MODULE = "peftserve.lora_triton"


def triton_kernels() -> LoraKernels:
    """The triton-lang backend; raises ImportError where triton is not installed."""
    return importlib.import_module(TRITON_MODULE).TritonKernels()


def triton_available() -> bool:
    """Whether ``triton`` can be imported (checked without importing it)."""
    return importlib.util.find_spec("triton") is not None


def kernels_for(device: torch.device) -> LoraKernels:
    """The backend for tensors on ``device``: triton-lang on CUDA where triton is installed, torch otherwise."""
    if device.type == "cuda" and triton_available():
        return triton_kernels()
    return TorchKernels()
