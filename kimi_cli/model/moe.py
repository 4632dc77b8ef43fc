"""The MoE block: noaux_tc sigmoid router, int4 routed experts, shared expert; and the dense MLP."""

from __future__ import annotations

import time

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from mlx_kernels import QuantizedWeight, needs_biases, switch_mlp

from .args import ModelArgs
from .linear import Linear


class MLP(nn.Module):
    """SwiGLU feed-forward: layer 0's dense MLP and the shared expert."""

    def __init__(self, hidden: int, inter: int, input_major: bool = False):
        super().__init__()
        self.gate_proj = Linear(hidden, inter, input_major)
        self.up_proj = Linear(hidden, inter, input_major)
        self.down_proj = Linear(inter, hidden, input_major)

    def __call__(self, x: mx.array) -> mx.array:
        return self.down_proj(nn.silu(self.gate_proj(x)) * self.up_proj(x))


@mx.compile
def route(logits: mx.array, bias: mx.array, top_k: int, scaling: float, normalize: bool):
    """noaux_tc: choose by sigmoid score + correction bias, weight by the unbiased score."""
    scores = mx.sigmoid(logits.astype(mx.float32))
    inds = mx.argpartition(-(scores + bias), kth=top_k - 1, axis=-1)[..., :top_k]
    weights = mx.take_along_axis(scores, inds, axis=-1)
    if top_k > 1 and normalize:
        weights = weights / weights.sum(axis=-1, keepdims=True)
    return inds, weights * scaling


class Router(Linear):
    def __init__(self, args: ModelArgs, input_major: bool = False):
        super().__init__(args.hidden_size, args.n_routed_experts, input_major)
        self.e_score_correction_bias = mx.zeros((args.n_routed_experts,))
        self.top_k = args.num_experts_per_tok
        self.scaling = args.routed_scaling_factor
        self.normalize = args.norm_topk_prob
        if args.topk_method != "noaux_tc" or args.scoring_func != "sigmoid":
            raise ValueError("only the noaux_tc sigmoid router is supported")
        if args.n_group != 1 or args.topk_group != 1:
            raise ValueError("grouped expert selection (n_group > 1) is not supported")

    def __call__(self, x: mx.array):
        # float32 whatever the compute dtype (the loader keeps the weight float32): in bf16 about
        # 2% of the release's tokens pick a different top-8 set than its own modeling code.
        logits = super().__call__(x.astype(mx.float32))
        return route(logits, self.e_score_correction_bias, self.top_k, self.scaling,
                     self.normalize)


class RoutedExperts(nn.Module):
    """All of a layer's routed experts resident as stacked int4 arrays [E, out, in/8]."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.group_size = args.group_size
        E, h, m = args.n_routed_experts, args.hidden_size, args.moe_intermediate_size
        for name, (out, inp) in (("gate_proj", (m, h)), ("up_proj", (m, h)),
                                 ("down_proj", (h, m))):
            setattr(self, name, {
                "weight": mx.zeros((E, out, inp // 8), mx.uint32),
                "scales": mx.zeros((E, out, inp // self.group_size)),
                # Only the gather_qmm fallback reads biases; the Metal kernels know the offset.
                **({"biases": mx.zeros((E, out, inp // self.group_size))}
                   if needs_biases() else {}),
            })

    def _w(self, name: str) -> QuantizedWeight:
        d = getattr(self, name)
        return QuantizedWeight(d["weight"], d["scales"], d.get("biases"))

    def __call__(self, x: mx.array, inds: mx.array, weights: mx.array) -> mx.array:
        return switch_mlp(x, inds, weights, self._w("gate_proj"), self._w("up_proj"),
                          self._w("down_proj"), self.group_size)


class MoE(nn.Module):
    def __init__(self, args: ModelArgs, input_major: bool = False):
        super().__init__()
        self.gate = Router(args, input_major)
        self.experts = RoutedExperts(args)
        self.shared_experts = (
            MLP(args.hidden_size, args.moe_intermediate_size * args.n_shared_experts,
                input_major)
            if args.n_shared_experts else None
        )

    def __call__(self, x: mx.array) -> mx.array:
        inds, weights = self.gate(x)
        y = self.experts(x, inds, weights)  # weighted sum over the top-k in float32
        if self.shared_experts is not None:
            y = y + self.shared_experts(x)
        return y


class StreamedExperts(nn.Module):
    """A layer's routed experts through the expert cache: routes on the host, runs over slots.

    One host sync per layer and forward pass (the router's ids). A chunk that routes to more
    experts than the pool holds runs in groups of experts, each group loaded then computed.
    """

    def __init__(self, args: ModelArgs, layer: int, cache, next_layer: int | None = None,
                 predict=None):
        super().__init__()
        self.layer = layer
        self.group_size = args.group_size
        self.n_experts = args.n_routed_experts
        self._cache = cache  # plain attributes: not parameters or child modules
        self._next_layer = next_layer
        self._predict = predict  # x -> the next streamed layer's likely experts (prefetch)

    def _weights(self):
        a = self._cache.pools[self.layer].arrays
        return [QuantizedWeight(a[f"{p}.weight"], a[f"{p}.scales"], a.get(f"{p}.biases"))
                for p in ("gate_proj", "up_proj", "down_proj")]

    def __call__(self, x: mx.array, inds: mx.array, weights: mx.array) -> mx.array:
        cache = self._cache
        pred = None
        if self._predict is not None and cache.prefetch_enabled:
            pred = self._predict(x)
        t0 = time.perf_counter()
        mx.eval(inds) if pred is None else mx.eval(inds, pred)
        host = np.array(inds)
        cache.add_sync_time(self.layer, time.perf_counter() - t0)
        B, L, k = host.shape
        D = x.shape[-1]
        flat = host.reshape(-1)
        experts = np.unique(flat)
        cache.add_uses(self.layer, flat)
        pinned = cache.pinned_experts[self.layer]
        unpinned = np.array([e for e in experts if int(e) not in pinned], dtype=np.int64)
        capacity = cache.free_capacity(self.layer)
        lut = np.full(self.n_experts, -1, dtype=np.int64)
        if len(unpinned) <= capacity:
            lut[experts] = cache.acquire(self.layer, experts)
            if pred is not None:
                cache.prefetch(self._next_layer, np.unique(np.array(pred)))
            slots = mx.array(lut[host].astype(np.uint32))
            return switch_mlp(x, slots, weights, *self._weights(), self.group_size)
        # More experts than slots (a long prefill chunk at a small budget): group by expert.
        x2 = x.reshape(B * L, D)
        y = mx.zeros((B * L * k, D), dtype=mx.float32)
        w = weights.reshape(B * L * k)
        hot = np.array(sorted(set(int(e) for e in experts) & pinned), dtype=np.int64)
        for start in range(0, len(unpinned), capacity):
            group = unpinned[start : start + capacity]
            if start == 0:  # pinned experts need no slot of their own: run them with the first
                group = np.concatenate([hot, group])
            lut[group] = cache.acquire(self.layer, group)
            rows = np.nonzero(np.isin(flat, group))[0]
            xs = x2[mx.array(rows // k)][None]
            idx = mx.array(lut[flat[rows]].astype(np.uint32))[None, :, None]
            ys = switch_mlp(xs, idx, w[mx.array(rows)][None, :, None], *self._weights(),
                            self.group_size)  # each row weighted; summed over k below
            y[mx.array(rows)] = ys.reshape(len(rows), D)
            mx.eval(y)  # the next group may overwrite these slots
        if pred is not None:
            cache.prefetch(self._next_layer, np.unique(np.array(pred)))
        return y.reshape(B, L, k, D).sum(axis=-2).astype(x.dtype)
