"""The Metal launcher: each kernel built once with `mx.fast.metal_kernel`, then called.

Same call shape as the C++ emulation (`emu.Emulator`), so `kernels.switch_mlp` takes either.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import mlx.core as mx

from .sources import Kernel


@functools.cache
def _compiled(kernel: Kernel):
    return mx.fast.metal_kernel(name=kernel.name, input_names=list(kernel.inputs),
                                output_names=list(kernel.outputs), source=kernel.source,
                                header=kernel.header)


def launch(kernel: Kernel, *, inputs: Sequence[mx.array], template: Sequence[tuple[str, object]],
           grid: tuple[int, int, int], threadgroup: tuple[int, int, int],
           output_shapes: Sequence[Sequence[int]],
           output_dtypes: Sequence[mx.Dtype]) -> list[mx.array]:
    return _compiled(kernel)(inputs=list(inputs), template=list(template), grid=grid,
                             threadgroup=threadgroup, output_shapes=list(output_shapes),
                             output_dtypes=list(output_dtypes))
