"""Expert kernels: the int4 routed-expert SwiGLU over gathered experts.

Pure-MLX implementations that run on every backend; a custom Metal kernel can replace them later
and must then match them bit for bit.
"""

from .experts import QuantizedWeight, expert_swiglu

__all__ = ["QuantizedWeight", "expert_swiglu"]
