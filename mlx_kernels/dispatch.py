"""Which expert path runs (Metal kernels or the gather_qmm fallback), and what storage it needs.

The model and the expert cache ask here only: `kernels_active`, `needs_biases`, `expert_bytes`, `switch_mlp`.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Iterable

import mlx.core as mx

from .experts import SORT_MIN_ROWS, QuantizedWeight, combine, expert_swiglu

# auto: the kernels on Metal, the fallback elsewhere; mlx: always the fallback; metal: the
# kernels or an error; emu: the kernels' C++ emulation on the CPU (tests only: slow).
ENV = "KIMI_KERNELS"
MODES = ("auto", "mlx", "metal", "emu")
# Prefill with the kernels active: "kernels" (the sorted-window kernels) or "qmm" (gather_qmm with
# biases made on the fly from the scales: one pass over them per layer and chunk, storage stays
# bias-free). Which is faster on a Mac is for scripts/bench_kernels.py to say.
PREFILL_ENV = "KIMI_KERNELS_PREFILL"
PREFILL_PATHS = ("kernels", "qmm")


class KernelsUnavailable(RuntimeError):
    """KIMI_KERNELS asks for something this machine cannot do."""


def kernel_mode() -> str:
    mode = os.environ.get(ENV, "auto").strip().lower() or "auto"
    if mode not in MODES:
        raise KernelsUnavailable(f"{ENV}={mode!r}: use one of {', '.join(MODES)}")
    return mode


def kernels_active() -> bool:
    """True when routed experts run through the bias-free kernels (Metal or their emulation)."""
    mode = kernel_mode()
    if mode == "mlx":
        return False
    if mode == "emu":
        return True
    on_metal = mx.metal.is_available() and mx.default_device() == mx.gpu
    if mode == "metal" and not on_metal:
        raise KernelsUnavailable(f"{ENV}=metal: no Metal GPU here (the fallback runs with "
                                 f"{ENV}=mlx or unset)")
    return on_metal


def needs_biases() -> bool:
    """Whether expert storage must hold MLX's affine biases (-8 * scale): only for the fallback.
    Asked at load time, so both settings are checked then."""
    prefill_path()
    return not kernels_active()


def expert_bytes(shapes: Iterable[tuple[int, int]], group_size: int, scale_bytes: int,
                 biases: bool | None = None) -> int:
    """Bytes of one expert's storage: packed int4 words, scales and, if the fallback needs
    them, biases, for weights of `shapes` (rows, cols)."""
    if biases is None:
        biases = needs_biases()
    total = 0
    for rows, cols in shapes:
        total += rows * cols // 2 + (2 if biases else 1) * rows * (cols // group_size) * scale_bytes
    return total


def prefill_path() -> str:
    path = os.environ.get(PREFILL_ENV, "kernels").strip().lower() or "kernels"
    if path not in PREFILL_PATHS:
        raise KernelsUnavailable(f"{PREFILL_ENV}={path!r}: use one of {', '.join(PREFILL_PATHS)}")
    return path


@functools.cache
def _launcher(mode: str):
    if mode == "emu":
        from .emu import Emulator

        return Emulator(os.environ.get("KIMI_KERNELS_EMU_DIR") or None)
    from .metal import launch

    return launch


def switch_mlp(x: mx.array, inds: mx.array, weights: mx.array, gate: QuantizedWeight,
               up: QuantizedWeight, down: QuantizedWeight, group_size: int = 32) -> mx.array:
    """The routed experts of a MoE layer: x [B, L, D], expert (or slot) indices and routing
    weights [B, L, k] -> sum_j weights_j * down(silu(gate x) * up x) over k, in float32."""
    if kernels_active():
        if group_size != 32:
            raise ValueError(f"the int4 kernels take group size 32, not {group_size}")
        from .kernels import switch_mlp as fused

        if inds.size >= SORT_MIN_ROWS and prefill_path() == "qmm":
            return combine(expert_swiglu(x, inds, gate, up, down, group_size), weights)
        return fused(_launcher(kernel_mode()), x, inds, weights, gate, up, down)
    return combine(expert_swiglu(x, inds, gate, up, down, group_size), weights)
