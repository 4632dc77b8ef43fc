"""Model hyper-parameters, mirroring the release's config.json field for field."""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field


@dataclass
class ModelArgs:
    model_type: str = "kimi_k2"
    vocab_size: int = 163840
    hidden_size: int = 7168
    intermediate_size: int = 18432
    moe_intermediate_size: int = 2048
    num_hidden_layers: int = 61
    num_attention_heads: int = 64
    n_shared_experts: int | None = 1
    n_routed_experts: int | None = 384
    routed_scaling_factor: float = 2.827
    kv_lora_rank: int = 512
    q_lora_rank: int | None = 1536
    qk_rope_head_dim: int = 64
    v_head_dim: int = 128
    qk_nope_head_dim: int = 128
    topk_method: str = "noaux_tc"
    scoring_func: str = "sigmoid"
    norm_topk_prob: bool = True
    n_group: int = 1
    topk_group: int = 1
    num_experts_per_tok: int = 8
    moe_layer_freq: int = 1
    first_k_dense_replace: int = 1
    max_position_embeddings: int = 262144
    rms_norm_eps: float = 1e-5
    rope_theta: float = 50000.0
    rope_scaling: dict | None = None
    attention_bias: bool = False
    tie_word_embeddings: bool = False
    quantization_config: dict = field(default_factory=dict)

    @classmethod
    def from_dict(cls, config: dict) -> ModelArgs:
        names = inspect.signature(cls).parameters
        return cls(**{k: v for k, v in config.items() if k in names})

    def kv_bytes_per_token(self, dtype_size: int, layers: int | None = None) -> int:
        """One token's latent KV cache over `layers` (default all): MLA keeps the compressed
        latent and the rope key per layer, nothing per head."""
        n = self.num_hidden_layers if layers is None else layers
        return (self.kv_lora_rank + self.qk_rope_head_dim) * n * dtype_size

    def is_moe_layer(self, idx: int) -> bool:
        return (
            self.n_routed_experts is not None
            and idx >= self.first_k_dense_replace
            and idx % self.moe_layer_freq == 0
        )

    @property
    def group_size(self) -> int:
        groups = self.quantization_config.get("config_groups", {})
        for group in groups.values():
            return int(group.get("weights", {}).get("group_size", 32))
        return 32
