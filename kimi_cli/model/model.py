"""Decoder layers and the full model: embeddings, 61 blocks (layer 0 dense), norm, lm_head."""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn

from .args import ModelArgs
from .attention import MLAttention
from .cache import LatentCache
from .linear import Linear
from .moe import MLP, MoE


class DecoderLayer(nn.Module):
    def __init__(self, args: ModelArgs, idx: int, input_major: bool = False):
        super().__init__()
        self.self_attn = MLAttention(args, input_major)
        self.mlp = (MoE(args, input_major) if args.is_moe_layer(idx)
                    else MLP(args.hidden_size, args.intermediate_size, input_major))
        self.input_layernorm = nn.RMSNorm(args.hidden_size, eps=args.rms_norm_eps)
        self.post_attention_layernorm = nn.RMSNorm(args.hidden_size, eps=args.rms_norm_eps)

    def __call__(self, x: mx.array, cache: LatentCache | None = None) -> mx.array:
        h = x + self.self_attn(self.input_layernorm(x), cache)
        return h + self.mlp(self.post_attention_layernorm(h))


class KimiModel(nn.Module):
    """`stage` (a range of layers) builds one pipeline stage: the other layers are None, the
    embedding only on the stage holding layer 0, the final norm only on the one holding the last."""

    def __init__(self, args: ModelArgs, input_major: bool = False, stage: range | None = None):
        super().__init__()
        n = args.num_hidden_layers
        stage = range(n) if stage is None else stage
        if 0 in stage:
            self.embed_tokens = nn.Embedding(args.vocab_size, args.hidden_size)
        self.layers = [DecoderLayer(args, i, input_major) if i in stage else None
                       for i in range(n)]
        if n - 1 in stage:
            self.norm = nn.RMSNorm(args.hidden_size, eps=args.rms_norm_eps)

    def __call__(self, ids: mx.array, cache: list | None = None) -> mx.array:
        h = self.embed_tokens(ids)
        cache = cache or [None] * len(self.layers)
        for layer, c in zip(self.layers, cache):
            h = layer(h, c)
        return self.norm(h)

    def run_stage(self, x: mx.array, cache: list) -> mx.array:
        """Token ids (first stage) or the previous stage's hidden state through this stage's
        layers; normed on the last stage."""
        h = self.embed_tokens(x) if "embed_tokens" in self else x
        for layer, c in zip(self.layers, cache):
            if layer is not None:
                h = layer(h, c)
        return self.norm(h) if "norm" in self else h


class Model(nn.Module):
    """`input_major` stores dense weights as [in, out] (faster on MLX's CPU backend)."""

    def __init__(self, args: ModelArgs, input_major: bool = False, stage: range | None = None):
        super().__init__()
        self.args = args
        self.model_type = args.model_type
        self.input_major = input_major
        self.stage = range(args.num_hidden_layers) if stage is None else stage
        self.model = KimiModel(args, input_major, stage)
        if args.num_hidden_layers - 1 in self.stage:
            self.lm_head = Linear(args.hidden_size, args.vocab_size, input_major)
        self.expert_cache = None  # an ExpertCache when routed experts are streamed

    def __call__(self, inputs: mx.array, cache: list | None = None) -> mx.array:
        if self.expert_cache is not None:
            self.expert_cache.begin_token(inputs.size)
        return self.lm_head(self.model(inputs, cache))

    def run_stage(self, x: mx.array, cache: list) -> mx.array:
        """One pipeline stage (`kimi_cli.distributed`): logits on the last stage, else the
        hidden state for the next one."""
        if self.expert_cache is not None:
            self.expert_cache.begin_token(x.shape[0] * x.shape[1])
        h = self.model.run_stage(x, cache)
        return self.lm_head(h) if "lm_head" in self else h

    @property
    def layers(self) -> list[DecoderLayer]:
        return self.model.layers

    def make_cache(self) -> list[LatentCache]:
        return [LatentCache() for _ in self.layers]
