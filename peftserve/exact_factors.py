"""Exact low-rank pairs for the delta weights of LoHa and LoKr, built from their factors without an SVD.

Semantics: every function returns ``(left, right)`` with ``left @ right`` equal (up to float rounding) to the
delta weight ``(out, in)``, ``left`` of shape ``(out, k)`` and ``right`` of shape ``(k, in)``. The inner
dimension ``k`` is the rank the engine will serve; each function picks the smallest ``k`` among the exact
forms it knows, and never more than ``min(out, in)``: beyond that a pair costs more than the dense delta,
which then is served as ``(I, delta)`` or ``(delta, I)``. No function looks at the values, only at shapes,
so the rank is decided without moving data, also on the ``meta`` device.

An SVD could find a lower numerical rank only for degenerate factors (a zero or rank-deficient Kronecker
factor, e.g. an untrained adapter), at the price of a dense decomposition per module: 45-85 s for one
Llama-3-8B-shaped module (4096x4096 or 4096x14336) on this project's 2-core CPU, against 0.01-0.15 s for
these pairs. So none is done.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def smallest_pair(chain: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """The pair for the product of ``chain``: one matrix, or a low-rank split ``(w_a, w_b)``.

    The split is kept when its rank is below both sides; otherwise the matrix is padded with an identity on its
    smaller side: ``(I_rows, W)`` or ``(W, I_cols)``, of rank ``min(rows, cols)``.
    """
    rows, cols = chain[0].shape[0], chain[-1].shape[1]
    if len(chain) == 2 and chain[0].shape[1] <= min(rows, cols):
        return chain[0], chain[1]
    matrix = chain[0] if len(chain) == 1 else chain[0] @ chain[1]
    size = min(rows, cols)
    identity = torch.eye(size, dtype=matrix.dtype, device=matrix.device)
    return (identity, matrix) if rows == size else (matrix, identity)


def kronecker_pair(w1: Sequence[torch.Tensor], w2: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """LoKr's ``kron(W1, W2)``, each factor given as a chain for :func:`smallest_pair`.

    Uses ``kron(P1 Q1, P2 Q2) = kron(P1, P2) @ kron(Q1, Q2)`` with each factor's smallest pair, so
    ``k = k1 * k2``. Choosing each side's smallest ``k`` minimises the product, and
    ``min(a, c) * min(b, d) <= min(a * b, c * d)`` for ``W1: (a, c)`` and ``W2: (b, d)``, so ``k`` never
    exceeds ``min(out, in)``: two full factors give that bound at most (e.g. ``kron(W1, I) @ kron(I, W2)``).
    """
    p1, q1 = smallest_pair(w1)
    p2, q2 = smallest_pair(w2)
    return torch.kron(p1, p2), torch.kron(q1, q2)


def hadamard_pair(
    w1a: torch.Tensor, w1b: torch.Tensor, w2a: torch.Tensor, w2b: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """LoHa's ``(w1a @ w1b) * (w2a @ w2b)``, as its face-splitting product when that is smaller than dense.

    Column ``(i, j)`` of ``left`` is ``w1a[:, i] * w2a[:, j]`` and row ``(i, j)`` of ``right`` is
    ``w1b[i] * w2b[j]``: summing over ``(i, j)`` gives the product of the two sums, element by element, so
    ``k = r1 * r2``. Above ``min(out, in)`` the dense delta is built and padded with an identity.
    """
    out_features, in_features = w1a.shape[0], w1b.shape[1]
    if w1a.shape[1] * w2a.shape[1] > min(out_features, in_features):
        return smallest_pair([(w1a @ w1b) * (w2a @ w2b)])
    left = (w1a[:, :, None] * w2a[:, None, :]).reshape(out_features, -1)
    right = (w1b[:, None, :] * w2b[None, :, :]).reshape(-1, in_features)
    return left, right
