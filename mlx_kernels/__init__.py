"""Routed-expert kernels: bias-free Metal int4 kernels (gate/up + SwiGLU, down + combine) and
the pure-MLX `gather_qmm` fallback they are tested against; `dispatch` picks one per machine."""

from .dispatch import ENV, expert_bytes, kernels_active, needs_biases, switch_mlp
from .experts import QuantizedWeight, combine, expert_swiglu

__all__ = ["ENV", "QuantizedWeight", "combine", "expert_bytes", "expert_swiglu",
           "kernels_active", "needs_biases", "switch_mlp"]
