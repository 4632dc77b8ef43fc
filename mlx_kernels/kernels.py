"""The routed-expert SwiGLU through the two bias-free kernels: launch geometry and host-side glue.

`launch` has `mx.fast.metal_kernel`'s call shape: the Metal launcher on a Mac, the C++ emulation in tests.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass

import mlx.core as mx

from .experts import SORT_MIN_ROWS, QuantizedWeight
from .sources import DOWN, GATE_UP, Kernel

Launch = Callable[..., list[mx.array]]
SIMD = 32


@dataclass(frozen=True)
class Tiling:
    """Expert rows per threadgroup (window), output rows per simdgroup, simdgroups per group."""

    window: int
    rows: int
    simdgroups: int


# Decode: one row per expert, 8 weight rows (4 of gate, 4 of up) per read of an input group;
# down: a token's k experts in one window, summed in float32. Prefill: windows of 8 rows sorted
# by expert, so a run of rows on one expert shares each weight fetch. Starting points, not yet
# tuned on hardware: scripts/bench_kernels.py measures them.
DECODE_GATE_UP = Tiling(window=1, rows=4, simdgroups=2)
DECODE_DOWN_ROWS = Tiling(window=0, rows=4, simdgroups=2)  # window = k
PREFILL = Tiling(window=8, rows=2, simdgroups=2)


@functools.lru_cache(maxsize=256)
def _dims(*dims: int) -> mx.array:
    # Made once per shape: not a host-to-device copy per layer and token.
    return mx.array(dims, mx.uint32)


def _run(launch: Launch, kernel: Kernel, inputs: list[mx.array], template: list, n_out: int,
         tiling: Tiling, out_shape: tuple[int, ...], out_dtype: mx.Dtype,
         windows: int) -> mx.array:
    per_group = tiling.rows * tiling.simdgroups
    threads = SIMD * tiling.simdgroups
    grid = (threads, -(-n_out // per_group), windows)
    template = template + [("W", tiling.window), ("ROWS", tiling.rows),
                           ("SG", tiling.simdgroups)]
    return launch(kernel, inputs=inputs, template=template, grid=grid,
                  threadgroup=(threads, 1, 1), output_shapes=[out_shape],
                  output_dtypes=[out_dtype])[0]


def gate_up_swiglu(launch: Launch, x: mx.array, gate: QuantizedWeight, up: QuantizedWeight,
                   slots: mx.array, tokens: mx.array, tiling: Tiling) -> mx.array:
    """x [N, D], slots/tokens [R] (uint32) -> act [R, M] float32: silu(gate x) * up x per row."""
    R, D = slots.shape[0], x.shape[-1]
    M = gate.weight.shape[-2]
    dims = _dims(R, M, D)
    inputs = [x, gate.weight, gate.scales, up.weight, up.scales, slots, tokens, dims]
    template = [("T", x.dtype), ("S", gate.scales.dtype)]
    return _run(launch, GATE_UP, inputs, template, M, tiling, (R, M), mx.float32,
                -(-R // tiling.window))


def down_combine(launch: Launch, act: mx.array, down: QuantizedWeight, slots: mx.array,
                 weights: mx.array, tiling: Tiling, combine: bool, out_dtype: mx.Dtype) -> mx.array:
    """act [R, M] -> weights[r] * down act[r]: summed per window of k rows ([R/k, D] in
    out_dtype) when `combine`, else one float32 row per expert row ([R, D])."""
    R, M = act.shape
    D = down.weight.shape[-2]
    dims = _dims(R, D, M)
    inputs = [act, down.weight, down.scales, slots, weights.astype(mx.float32), dims]
    template = [("O", out_dtype if combine else mx.float32), ("S", down.scales.dtype),
                ("SUM", bool(combine))]
    windows = -(-R // tiling.window)
    shape = (windows, D) if combine else (R, D)
    return _run(launch, DOWN, inputs, template, D, tiling, shape,
                out_dtype if combine else mx.float32, windows)


def switch_mlp(launch: Launch, x: mx.array, inds: mx.array, weights: mx.array,
               gate: QuantizedWeight, up: QuantizedWeight, down: QuantizedWeight,
               sort: bool | None = None, decode: tuple[Tiling, Tiling] | None = None,
               prefill: Tiling = PREFILL) -> mx.array:
    """x [B, L, D], inds/weights [B, L, k] -> sum_j weights_j * expert_{inds_j}(x): [B, L, D].

    Biases, if the weights carry any, are not read. Few rows take the decode kernels (one row
    per expert, the k experts summed in the down kernel); many rows are sorted by expert first.
    `decode` (gate/up and down tilings) and `prefill` override the tilings (the bench sweeps them).
    """
    B, L, D = x.shape
    k = inds.shape[-1]
    N, R = B * L, B * L * k
    x2 = x.reshape(N, D)
    flat = inds.reshape(R).astype(mx.uint32)
    w = weights.reshape(R).astype(mx.float32)
    if sort is None:
        sort = R >= SORT_MIN_ROWS
    if not sort:
        tokens = mx.arange(R, dtype=mx.uint32) // k
        tile_a, tile_b = decode or (DECODE_GATE_UP, DECODE_DOWN_ROWS)
        act = gate_up_swiglu(launch, x2, gate, up, flat, tokens, tile_a)
        tiling = Tiling(k, tile_b.rows, tile_b.simdgroups)
        y = down_combine(launch, act, down, flat, w, tiling, True, x.dtype)
        return y.reshape(B, L, D)
    order = mx.argsort(flat)
    slots = flat[order]
    tokens = (order // k).astype(mx.uint32)
    act = gate_up_swiglu(launch, x2, gate, up, slots, tokens, prefill)
    rows = down_combine(launch, act, down, slots, w[order], prefill, False, mx.float32)
    y = rows[mx.argsort(order)].reshape(N, k, D).sum(axis=1)
    return y.astype(x.dtype).reshape(B, L, D)
