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

    def attention_mask(self, n: int) -> None:
        """A single sequence needs no mask beyond causality (attention applies it)."""
        return None

    @staticmethod
    def batched(caches: list[LatentCache]) -> BatchLatentCache:
        """The batch form of this kind of cache, built from single-sequence caches."""
        return BatchLatentCache.merge(caches)


class BatchLatentCache:
    """The latent cache of B sequences in one left-padded buffer [B, 1, T, D].

    Row b holds its `lengths[b]` tokens right-justified at the buffer's end; the `left_padding`
    columns before them are masked out. Rows leave (`filter`) and join (`extend`) a running batch.
    """

    step = 256

    def __init__(self, latent: mx.array | None, lengths: list[int]):
        self.lengths = list(lengths)
        self.idx = max(lengths, default=0)  # columns in use
        self.latent = latent

    @classmethod
    def merge(cls, caches: list[LatentCache]) -> BatchLatentCache:
        """One batch from single-sequence caches (copied: they may go on changing)."""
        lengths = [c.offset for c in caches]
        T = max(lengths)
        states = [c.state[0] for c in caches if c.offset]
        if not states:
            return cls(None, lengths)
        _, heads, _, dim = states[0].shape
        rows = [mx.pad(c.state[0], [(0, 0), (0, 0), (T - c.offset, 0), (0, 0)]) if c.offset
                else mx.zeros((1, heads, T, dim), states[0].dtype) for c in caches]
        return cls(mx.concatenate(rows, axis=0), lengths)

    @property
    def batch_size(self) -> int:
        return len(self.lengths)

    @property
    def left_padding(self) -> list[int]:
        return [self.idx - n for n in self.lengths]

    @property
    def offset(self) -> mx.array:
        """Each row's position of its next token (RoPE takes one offset per row)."""
        return mx.array(self.lengths)

    def update_and_fetch(self, latent: mx.array) -> mx.array:
        n = latent.shape[2]
        if self.latent is None or self.idx + n > self.latent.shape[2]:
            B, heads, _, dim = latent.shape
            grow = ((n + self.step - 1) // self.step) * self.step
            new = mx.zeros((B, heads, grow, dim), latent.dtype)
            old = self.latent[..., : self.idx, :] if self.latent is not None else None
            if old is None and self.idx:  # rows of nothing but padding so far
                old = mx.zeros((B, heads, self.idx, dim), latent.dtype)
            self.latent = new if old is None else mx.concatenate([old, new], axis=2)
        self.latent[..., self.idx : self.idx + n, :] = latent
        self.idx += n
        self.lengths = [m + n for m in self.lengths]
        return self.latent[..., : self.idx, :]

    def attention_mask(self, n: int) -> mx.array | None:
        """[B, 1, n, T] booleans (after this step's n tokens were written): a row's new queries
        see its own tokens only, causally."""
        pad = self.left_padding
        if not any(pad) and n == 1:
            return None
        T = self.idx
        cols = mx.arange(T)[None, None, None, :]
        rows = mx.arange(n)[None, None, :, None]
        left = mx.array(pad)[:, None, None, None]
        return (cols >= left) & (cols <= T - n + rows)

    def filter(self, keep: list[int]) -> None:
        """Keep only rows `keep` (in that order); drop the padding columns no row needs."""
        self.lengths = [self.lengths[i] for i in keep]
        new_idx = max(self.lengths, default=0)
        if self.latent is not None:
            self.latent = self.latent[mx.array(keep, dtype=mx.int32)] if keep else None
            if self.latent is not None:
                self.latent = self.latent[..., self.idx - new_idx : self.idx, :]
        self.idx = new_idx

    def extend(self, *others: BatchLatentCache) -> None:
        """Append the rows of `others`, all right-justified at the longest: one copy."""
        parts = [self, *others]
        T = max(c.idx for c in parts)
        like = next((c.latent for c in parts if c.latent is not None), None)
        if like is not None:
            rows = []
            for c in parts:
                if c.latent is None:
                    rows.append(mx.zeros((c.batch_size, like.shape[1], T, like.shape[3]),
                                         like.dtype))
                else:
                    rows.append(mx.pad(c.latent[..., : c.idx, :],
                                       [(0, 0), (0, 0), (T - c.idx, 0), (0, 0)]))
            self.latent = mx.concatenate(rows, axis=0)
        self.lengths = [n for c in parts for n in c.lengths]
        self.idx = T

    @property
    def state(self):
        return [] if self.latent is None else [self.latent[..., : self.idx, :]]

    @property
    def nbytes(self) -> int:
        if self.latent is None:
            return 0
        return self.idx * self.latent.nbytes // self.latent.shape[2]
