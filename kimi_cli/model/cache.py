"""The MLA latent KV cache: per token and layer only the normalized latent and the rope key.

One buffer [B, 1, T, kv_lora_rank + qk_rope_head_dim]; compatible with mlx-lm's cache protocol
(offset, trim, state, is_trimmable) so its prompt-cache helpers work on it; it does not
import mlx-lm (whose package import pulls in transformers).
"""

from __future__ import annotations

import mlx.core as mx


class LatentCache:
    step = 256

    def __init__(self) -> None:
        self.latent: mx.array | None = None
        self.offset = 0

    def update_and_fetch(self, latent: mx.array) -> mx.array:
        prev = self.offset
        n = latent.shape[2]
        if self.latent is None or prev + n > self.latent.shape[2]:
            B, heads, _, dim = latent.shape
            grow = ((n + self.step - 1) // self.step) * self.step
            new = mx.zeros((B, heads, grow, dim), latent.dtype)
            if self.latent is None:
                self.latent = new
            else:
                self.latent = mx.concatenate([self.latent[..., :prev, :], new], axis=2)
        self.offset += n
        self.latent[..., prev : self.offset, :] = latent
        return self.latent[..., : self.offset, :]

    @property
    def meta_state(self):
        return ""

    @classmethod
    def from_state(cls, state, meta_state=None) -> LatentCache:
        obj = cls()
        obj.state = state
        return obj

    def size(self) -> int:
        return self.offset

    @property
    def state(self):
        if self.latent is None:
            return []
        return [self.latent[..., : self.offset, :]]

    @state.setter
    def state(self, v) -> None:
        if not v:
            self.latent, self.offset = None, 0
        else:
            self.latent = v[0]
            self.offset = v[0].shape[2]

    def is_trimmable(self) -> bool:
        return True

    def trim(self, n: int) -> int:
        n = min(self.offset, n)
        self.offset -= n
        return n

    def empty(self) -> bool:
        return self.latent is None

    @property
    def nbytes(self) -> int:
        if self.latent is None:
            return 0
        return self.offset * self.latent.nbytes // self.latent.shape[2]
