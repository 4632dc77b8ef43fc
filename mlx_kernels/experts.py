"""The pure-MLX fallback: routed-expert SwiGLU `down(silu(gate x) * up x)` with `gather_qmm`.

Runs on every backend, straight on the release's packed words (affine 4-bit, biases = -8*scale).
"""

from __future__ import annotations

from typing import NamedTuple

import mlx.core as mx
import mlx.nn as nn

# Rows of expert work (tokens x top_k) from which tokens are sorted by expert before the matmul.
SORT_MIN_ROWS = 64


class QuantizedWeight(NamedTuple):
    """Stacked int4 weights [E, out, in/8] (uint32), scales [E, out, in/gs] and biases
    (-8 * scales) or None where the storage is bias-free (the kernels need none)."""

    weight: mx.array
    scales: mx.array
    biases: mx.array | None


def _qmm(x: mx.array, w: QuantizedWeight, idx: mx.array, group_size: int, sort: bool):
    # Bias-free storage still runs here (KIMI_KERNELS=mlx on a Mac): biases are exact -8*scale.
    biases = w.biases if w.biases is not None else -8 * w.scales
    return mx.gather_qmm(
        x, w.weight, w.scales, biases, rhs_indices=idx, transpose=True,
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


def combine(y: mx.array, weights: mx.array) -> mx.array:
    """y [B, L, k, D], routing weights [B, L, k] -> their weighted sum over k, in float32."""
    return (y.astype(mx.float32) * weights[..., None]).sum(axis=-2).astype(y.dtype)
