"""Multi-head latent attention (MLA) computed directly over the cached latent.

kv_b_proj is split per head into W_UK and W_UV and absorbed into the query and the output, so the
cache never holds per-head keys or values.
"""

from __future__ import annotations

import math

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models.rope_utils import initialize_rope

from .args import ModelArgs
from .cache import LatentCache
from .linear import Linear


def yarn_softmax_scale(args: ModelArgs) -> float:
    scale = (args.qk_nope_head_dim + args.qk_rope_head_dim) ** -0.5
    rs = args.rope_scaling or {}
    mscale_all_dim = rs.get("mscale_all_dim", 0)
    factor = rs.get("factor", 1.0)
    if mscale_all_dim and factor > 1:
        m = 0.1 * mscale_all_dim * math.log(factor) + 1.0
        scale *= m * m
    return scale


# Bytes of attention scores one forward may hold at once ([heads, query rows, keys] in f32). The
# absorbed form's key and value widths differ, so MLX materializes the scores: long prefill
# chunks deep into a context run in blocks of query rows instead of one [H, chunk, T] matrix.
SCORE_BUDGET_BYTES = 256 << 20


def attend(queries: mx.array, keys: mx.array, values: mx.array, scale: float,
           mask: mx.array | None = None) -> mx.array:
    """Causal attention of L new queries over T cached keys (the last L of which are theirs).
    `mask` (a batch of left-padded rows) replaces causality: [B, 1, L, T] booleans."""
    B, H, L, _ = queries.shape
    T = keys.shape[2]
    if mask is not None:
        return mx.fast.scaled_dot_product_attention(queries, keys, values, scale=scale,
                                                    mask=mask)
    if L == 1:
        return mx.fast.scaled_dot_product_attention(queries, keys, values, scale=scale)
    rows = max(1, SCORE_BUDGET_BYTES // (B * H * T * 4))
    if rows >= L:
        return mx.fast.scaled_dot_product_attention(queries, keys, values, scale=scale,
                                                    mask="causal")
    outs = []
    for start in range(0, L, rows):
        stop = min(L, start + rows)
        end = T - L + stop  # keys visible to the block's last query
        outs.append(mx.fast.scaled_dot_product_attention(
            queries[:, :, start:stop], keys[:, :, :end], values[:, :, :end], scale=scale,
            mask="causal"))
        mx.eval(outs[-1])  # free this block's scores before the next one
    return mx.concatenate(outs, axis=2)


class MLAttention(nn.Module):
    def __init__(self, args: ModelArgs, input_major: bool = False):
        super().__init__()
        self.n_heads = args.num_attention_heads
        self.nope = args.qk_nope_head_dim
        self.rope_dim = args.qk_rope_head_dim
        self.rank = args.kv_lora_rank
        self.v_dim = args.v_head_dim
        h = args.hidden_size
        self.q_a_proj = Linear(h, args.q_lora_rank, input_major)
        self.q_a_layernorm = nn.RMSNorm(args.q_lora_rank, eps=1e-6)
        self.q_b_proj = Linear(args.q_lora_rank, self.n_heads * (self.nope + self.rope_dim),
                               input_major)
        self.kv_a_proj_with_mqa = Linear(h, self.rank + self.rope_dim, input_major)
        self.kv_a_layernorm = nn.RMSNorm(self.rank, eps=1e-6)
        # kv_b_proj split per head (at load): w_uk [H, nope, rank], w_uv_t [H, rank, v].
        self.w_uk = mx.zeros((self.n_heads, self.nope, self.rank))
        self.w_uv_t = mx.zeros((self.n_heads, self.rank, self.v_dim))
        self.o_proj = Linear(self.n_heads * self.v_dim, h, input_major)
        self.scale = yarn_softmax_scale(args)
        self.rope = initialize_rope(
            dims=self.rope_dim,
            base=args.rope_theta,
            traditional=True,
            scaling_config=args.rope_scaling,
            max_position_embeddings=args.max_position_embeddings,
        )

    def __call__(self, x: mx.array, cache: LatentCache | None = None) -> mx.array:
        B, L, _ = x.shape  # a BatchLatentCache gives per-row offsets and a padding mask
        q = self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x)))
        q = q.reshape(B, L, self.n_heads, self.nope + self.rope_dim).transpose(0, 2, 1, 3)
        q_nope, q_pe = q[..., : self.nope], q[..., self.nope :]
        kv = self.kv_a_proj_with_mqa(x)
        c_kv = self.kv_a_layernorm(kv[..., : self.rank])
        k_pe = kv[..., self.rank :]

        offset = cache.offset if cache is not None else 0
        q_pe = self.rope(q_pe, offset)
        k_pe = self.rope(k_pe[:, None], offset)
        latent = mx.concatenate([c_kv[:, None], k_pe], axis=-1)
        if cache is not None:
            latent = cache.update_and_fetch(latent)

        # Absorb W_UK into the query: scores over [c_kv | k_pe] with one shared "kv head".
        queries = mx.concatenate([q_nope @ self.w_uk, q_pe], axis=-1)
        values = latent[..., : self.rank]
        mask = cache.attention_mask(L) if cache is not None else None
        out = attend(queries, latent, values, self.scale, mask)
        out = out @ self.w_uv_t
        return self.o_proj(out.transpose(0, 2, 1, 3).reshape(B, L, -1))
