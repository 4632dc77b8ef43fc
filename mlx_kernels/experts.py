"""Routed-expert SwiGLU over stacked int4 weights: `down(silu(gate x) * up x)` per chosen expert.

Runs `gather_qmm` straight on the release's packed words (affine 4-bit, biases = -8*scale). Many
rows are sorted by expert first so each expert's weights are read once (as mlx-lm does).
"""

from __future__ import annotations

from typing import NamedTuple

import mlx.core as mx
import mlx.nn as nn

# Rows of expert work (tokens x top_k) from which tokens are sorted by expert before the matmul.
SORT_MIN_ROWS = 64


class QuantizedWeight(NamedTuple):
    """Stacked affine int4 weights [E, out, in/8] (uint32) with scales and biases [E, out, in/gs]."""

    weight: mx.array
    scales: mx.array
    biases: mx.array


def _qmm(x: mx.array, w: QuantizedWeight, idx: mx.array, group_size: int, sort: bool):
    return mx.gather_qmm(
        x, w.weight, w.scales, w.biases, rhs_indices=idx, transpose=True,
        group_size=group_size, bits=4, sorted_indices=sort,
    )


def expert_swiglu(x: mx.array, inds: mx.array, gate: QuantizedWeight, up: QuantizedWeight,
                  down: QuantizedWeight, group_size: int = 32) -> mx.array:
    """x [B, L, D], inds [B, L, k] (indices into the stacks) -> [B, L, k, D]."""
    B, L, D = x.shape
    k = inds.shape[-1]
    sort = B * L * k >= SORT_MIN_ROWS
    if sort:
        flat = inds.flatten()
        order = mx.argsort(flat)
        xs = x.reshape(B * L, 1, 1, D)[order // k]
        idx = flat[order][:, None]
    else:
        xs, idx = x[..., None, None, :], inds
    h = nn.silu(_qmm(xs, gate, idx, group_size, sort)) * _qmm(xs, up, idx, group_size, sort)
    y = _qmm(h, down, idx, group_size, sort)
    if sort:
        y = y[mx.argsort(order)]
        return y.reshape(B, L, k, -1)
    return y.squeeze(-2)
