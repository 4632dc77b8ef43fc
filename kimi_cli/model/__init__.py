"""The Kimi-K2 forward pass (DeepSeek-V3 architecture as Kimi uses it).

`Model` follows mlx-lm's model protocol: `model(ids, cache)`, `model.layers`, `model.make_cache()`.
Imported lazily: `kimi_cli.model.args` stays cheap for commands that never run the network.
"""

from .args import ModelArgs

__all__ = ["Model", "ModelArgs"]


def __getattr__(name: str):
    if name == "Model":
        from .model import Model

        return Model
    raise AttributeError(name)
