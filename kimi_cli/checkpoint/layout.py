"""Tensor names, shapes and dtypes of a Kimi-K2 release checkpoint, derived from its config.

The one source of truth for what a checkpoint must contain: the loader validates against it and
the synthetic writer writes exactly it.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..model.args import ModelArgs

EXPERT_PROJS = ("gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class TensorSpec:
    name: str
    shape: tuple[int, ...]
    kind: str  # embed, lm_head, norm, linear, router, router_bias, packed, scale, shape
    dtypes: tuple[str, ...]  # safetensors dtype names accepted


BF16 = ("BF16",)
F32 = ("F32",)


def expert_shapes(args: ModelArgs) -> dict[str, tuple[int, int]]:
    """Logical [out, in] shape of each routed-expert projection."""
    h, m = args.hidden_size, args.moe_intermediate_size
    return {"gate_proj": (m, h), "up_proj": (m, h), "down_proj": (h, m)}


def expert_specs(args: ModelArgs, layer: int, expert: int) -> list[TensorSpec]:
    gs = args.group_size
    pre = f"model.layers.{layer}.mlp.experts.{expert}."
    out = []
    for proj, (rows, cols) in expert_shapes(args).items():
        out += [
            TensorSpec(pre + proj + ".weight_packed", (rows, cols // 8), "packed", ("I32",)),
            TensorSpec(pre + proj + ".weight_scale", (rows, cols // gs), "scale", BF16),
            TensorSpec(pre + proj + ".weight_shape", (2,), f"shape:{rows},{cols}",
                       ("I64", "I32")),
        ]
    return out


def layer_specs(args: ModelArgs, i: int, with_experts: bool = True) -> list[TensorSpec]:
    h, heads = args.hidden_size, args.num_attention_heads
    qk = args.qk_nope_head_dim + args.qk_rope_head_dim
    pre = f"model.layers.{i}."
    specs = [
        TensorSpec(pre + "input_layernorm.weight", (h,), "norm", BF16),
        TensorSpec(pre + "post_attention_layernorm.weight", (h,), "norm", BF16),
        TensorSpec(pre + "self_attn.q_a_proj.weight", (args.q_lora_rank, h), "linear", BF16),
        TensorSpec(pre + "self_attn.q_a_layernorm.weight", (args.q_lora_rank,), "norm", BF16),
        TensorSpec(pre + "self_attn.q_b_proj.weight", (heads * qk, args.q_lora_rank), "linear",
                   BF16),
        TensorSpec(pre + "self_attn.kv_a_proj_with_mqa.weight",
                   (args.kv_lora_rank + args.qk_rope_head_dim, h), "linear", BF16),
        TensorSpec(pre + "self_attn.kv_a_layernorm.weight", (args.kv_lora_rank,), "norm", BF16),
        TensorSpec(pre + "self_attn.kv_b_proj.weight",
                   (heads * (args.qk_nope_head_dim + args.v_head_dim), args.kv_lora_rank),
                   "linear", BF16),
        TensorSpec(pre + "self_attn.o_proj.weight", (h, heads * args.v_head_dim), "linear", BF16),
    ]
    if not args.is_moe_layer(i):
        inter = args.intermediate_size
        return specs + [
            TensorSpec(pre + "mlp.gate_proj.weight", (inter, h), "linear", BF16),
            TensorSpec(pre + "mlp.up_proj.weight", (inter, h), "linear", BF16),
            TensorSpec(pre + "mlp.down_proj.weight", (h, inter), "linear", BF16),
        ]
    shared = args.moe_intermediate_size * (args.n_shared_experts or 0)
    specs += [
        TensorSpec(pre + "mlp.gate.weight", (args.n_routed_experts, h), "router", BF16),
        TensorSpec(pre + "mlp.gate.e_score_correction_bias", (args.n_routed_experts,),
                   "router_bias", F32),
    ]
    if shared:
        specs += [
            TensorSpec(pre + "mlp.shared_experts.gate_proj.weight", (shared, h), "linear", BF16),
            TensorSpec(pre + "mlp.shared_experts.up_proj.weight", (shared, h), "linear", BF16),
            TensorSpec(pre + "mlp.shared_experts.down_proj.weight", (h, shared), "linear", BF16),
        ]
    if with_experts:
        for e in range(args.n_routed_experts):
            specs += expert_specs(args, i, e)
    return specs


def checkpoint_specs(args: ModelArgs, with_experts: bool = True) -> list[TensorSpec]:
    """Every tensor of the checkpoint in file order: embeddings, layers, final norm, lm_head."""
    specs = [TensorSpec("model.embed_tokens.weight", (args.vocab_size, args.hidden_size),
                        "embed", BF16)]
    for i in range(args.num_hidden_layers):
        specs += layer_specs(args, i, with_experts)
    specs += [
        TensorSpec("model.norm.weight", (args.hidden_size,), "norm", BF16),
        TensorSpec("lm_head.weight", (args.vocab_size, args.hidden_size), "lm_head", BF16),
    ]
    return specs
