"""The Kimi-K2 forward pass (DeepSeek-V3 architecture as Kimi uses it).

`Model` follows mlx-lm's model protocol: `model(ids, cache)`, `model.layers`, `model.make_cache()`.
"""

from .args import ModelArgs
from .model import Model

__all__ = ["Model", "ModelArgs"]
