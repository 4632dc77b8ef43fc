"""A bias-free linear layer whose weight layout is chosen per backend.

MLX's CPU backend multiplies by an input-major weight ([in, out]) 2-3x faster than by the
transpose of the checkpoint's output-major one (measured: 6.5 ms vs 19.4 ms for 7168 -> 2048).
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn


class Linear(nn.Module):
    def __init__(self, input_dims: int, output_dims: int, input_major: bool = False):
        super().__init__()
        self.input_major = input_major
        shape = (input_dims, output_dims) if input_major else (output_dims, input_dims)
        self.weight = mx.zeros(shape)

    def __call__(self, x: mx.array) -> mx.array:
        return x @ self.weight if self.input_major else x @ self.weight.T
