"""Synthetic checkpoints in the exact format of moonshotai/Kimi-K2-Thinking, with random weights.

Used by tests, benchmarks and `kimi run --model demo`: same files, dtypes, packing and names as
the release (compressed-tensors int4 routed experts, bf16 rest, f32 router bias, tiktoken BPE).
"""

from __future__ import annotations

import json
import math
import re
import shutil
from collections import Counter
from dataclasses import dataclass, field, replace
from importlib import resources
from pathlib import Path

import mlx.core as mx
import numpy as np

from ..model.args import ModelArgs
from .layout import checkpoint_specs

GROUP_SIZE = 32

# Special tokens of the release, by offset from the first special id (len(ranks)).
SPECIAL_TOKENS = {
    0: "[BOS]",
    1: "[EOS]",
    2: "<|im_end|>",
    3: "<|im_user|>",
    4: "<|im_assistant|>",
    6: "<|start_header_id|>",
    7: "<|end_header_id|>",
    9: "[EOT]",
    10: "<|im_system|>",
    11: "<|tool_calls_section_begin|>",
    12: "<|tool_calls_section_end|>",
    13: "<|tool_call_begin|>",
    14: "<|tool_call_argument_begin|>",
    15: "<|tool_call_end|>",
    17: "<|im_middle|>",
    22: "<think>",
    23: "</think>",
    254: "[UNK]",
    255: "[PAD]",
}


@dataclass(frozen=True)
class Preset:
    hidden_size: int
    intermediate_size: int
    moe_intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    q_lora_rank: int
    kv_lora_rank: int
    qk_nope_head_dim: int
    qk_rope_head_dim: int
    v_head_dim: int
    n_routed_experts: int
    num_experts_per_tok: int
    n_ranks: int
    n_shared_experts: int = 1
    first_k_dense_replace: int = 1
    shard_bytes: int = 0  # 0: about three shards
    router_skew: float = 0.0  # >0: a router bias that makes a few experts popular
    extra: dict = field(default_factory=dict)


PRESETS: dict[str, Preset] = {
    # Unit tests: odd heads, layers and vocab; well under 10 MB.
    "tiny": Preset(
        hidden_size=64, intermediate_size=96, moe_intermediate_size=32, num_hidden_layers=3,
        num_attention_heads=3, q_lora_rank=48, kv_lora_rank=32, qk_nope_head_dim=16,
        qk_rope_head_dim=8, v_head_dim=16, n_routed_experts=10, num_experts_per_tok=3,
        n_ranks=741,
    ),
    # Benchmarks and long-context memory checks (~60 MB).
    "small": Preset(
        hidden_size=512, intermediate_size=1024, moe_intermediate_size=256, num_hidden_layers=7,
        num_attention_heads=7, q_lora_rank=192, kv_lora_rank=128, qk_nope_head_dim=64,
        qk_rope_head_dim=32, v_head_dim=64, n_routed_experts=32, num_experts_per_tok=4,
        n_ranks=1501,
    ),
    # The release's real expert dimensions (7168 x 2048, 24.8 MB per expert) for I/O work.
    "io": Preset(
        hidden_size=7168, intermediate_size=2048, moe_intermediate_size=2048, num_hidden_layers=4,
        num_attention_heads=4, q_lora_rank=256, kv_lora_rank=512, qk_nope_head_dim=128,
        qk_rope_head_dim=64, v_head_dim=128, n_routed_experts=16, num_experts_per_tok=8,
        n_ranks=1501, shard_bytes=2 << 30,
    ),
}


def preset(name: str, **overrides) -> Preset:
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
    return replace(PRESETS[name], **overrides)


# ---------------------------------------------------------------------------------------------
# Tokenizer files


_CORPUS = """
The quick brown fox jumps over the lazy dog. Kimi is an AI assistant created by Moonshot AI.
It thinks step by step, calls tools, reads files and writes code. Hello, World! I'm here to help.
What is the weather in Beijing today? It is sunny, with a high of 25 degrees and a light wind.
def main(argv):\n    for i in range(10):\n        print(f"value {i}: {argv[i]}")\n    return 0
import json, os, sys; data = json.loads(text); print(data["name"], data.get("city", None))
{"role": "user", "content": "Summarize this document in three sentences."}
The mixture-of-experts model routes each token to eight of 384 experts in every layer, and a
shared expert runs for every token. Attention uses a compressed latent cache of 512 values.
Numbers: 0 1 2 3 4 5 6 7 8 9 10 42 100 256 1024 2048 4096 7168 12345 65536 3.14159 2.71828
你好世界。今天天气很好，我们去公园散步吧。人工智能正在改变世界，模型可以思考并调用工具。
日本語のテキストも少し。Ça va très bien, merci! Größe, naïve café, résumé, smörgåsbord.
Emoji and symbols: 🙂 🚀 ✓ → ≤ ≥ ∞ € £ ¥ © ® — “quotes” ‘single’ … done.
Shell: ls -la | grep py && cat README.md > out.txt; echo $HOME; git commit -m "fix: tests"
To be, or not to be, that is the question: whether 'tis nobler in the mind to suffer the slings
and arrows of outrageous fortune, or to take arms against a sea of troubles and by opposing end
them. We're sure they'll say it's fine; you've seen what I'd do and what we'll make of it.
"""


def _train_bpe(n_ranks: int) -> list[bytes]:
    """Byte-level BPE on a built-in corpus: 256 bytes, then merges in order, so ranks are valid."""
    vocab = [bytes([b]) for b in range(256)]
    if n_ranks <= 256:
        raise ValueError("n_ranks must exceed 256")
    words = Counter(re.findall(r" ?[^\s]+|\s+", _CORPUS))
    seqs = {w: [bytes([b]) for b in w.encode()] for w in words}
    known = set(vocab)
    while len(vocab) < n_ranks:
        pairs: Counter = Counter()
        for w, seq in seqs.items():
            for a, b in zip(seq, seq[1:]):
                pairs[(a, b)] += words[w]
        candidates = [(c, p) for p, c in pairs.items() if p[0] + p[1] not in known]
        if candidates:
            _, (a, b) = max(candidates, key=lambda cp: (cp[0], cp[1]))
        else:  # corpus exhausted: keep growing with merges of existing tokens
            i = len(vocab)
            a, b = vocab[i % 97 + 32], vocab[(i * 7) % len(vocab)]
            while a + b in known:
                i += 1
                a, b = vocab[i % 97 + 32], vocab[(i * 13) % len(vocab)]
        new = a + b
        vocab.append(new)
        known.add(new)
        for w, seq in seqs.items():
            out, i = [], 0
            while i < len(seq):
                if i + 1 < len(seq) and seq[i] == a and seq[i + 1] == b:
                    out.append(new)
                    i += 2
                else:
                    out.append(seq[i])
                    i += 1
            seqs[w] = out
    return vocab


def write_tokenizer_files(path: str | Path, n_ranks: int = 741) -> None:
    """Write `tiktoken.model` (n_ranks BPE ranks) and `tokenizer_config.json` with the specials."""
    import base64

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    vocab = _train_bpe(n_ranks)
    lines = [f"{base64.b64encode(tok).decode()} {rank}" for rank, tok in enumerate(vocab)]
    (path / "tiktoken.model").write_text("\n".join(lines) + "\n")
    added = {
        str(n_ranks + off): {
            "content": name, "lstrip": False, "normalized": False, "rstrip": False,
            "single_word": False, "special": True,
        }
        for off, name in SPECIAL_TOKENS.items()
    }
    config = {
        "added_tokens_decoder": added,
        "additional_special_tokens": ["<|im_end|>", "<|im_user|>", "<|im_assistant|>",
                                      "<|start_header_id|>", "<|end_header_id|>", "[EOT]",
                                      "<|im_system|>", "<|im_middle|>"],
        "bos_token": "[BOS]",
        "clean_up_tokenization_spaces": False,
        "eos_token": "[EOS]",
        "extra_special_tokens": {},
        "model_max_length": 1000000000000000019884624838656,
        "pad_token": "[PAD]",
        "tokenizer_class": "TikTokenTokenizer",
        "unk_token": "[UNK]",
        "auto_map": {"AutoTokenizer": ["tokenization_kimi.TikTokenTokenizer", None]},
    }
    (path / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False))


# ---------------------------------------------------------------------------------------------
# Config


def make_config(p: Preset) -> dict:
    vocab_size = p.n_ranks + 256
    return {
        "architectures": ["DeepseekV3ForCausalLM"],
        "attention_bias": False,
        "attention_dropout": 0.0,
        "auto_map": {
            "AutoConfig": "configuration_deepseek.DeepseekV3Config",
            "AutoModel": "modeling_deepseek.DeepseekV3Model",
            "AutoModelForCausalLM": "modeling_deepseek.DeepseekV3ForCausalLM",
        },
        "aux_loss_alpha": 0.001,
        "bos_token_id": p.n_ranks + 0,
        "eos_token_id": p.n_ranks + 2,
        "ep_size": 1,
        "first_k_dense_replace": p.first_k_dense_replace,
        "hidden_act": "silu",
        "hidden_size": p.hidden_size,
        "initializer_range": 0.02,
        "intermediate_size": p.intermediate_size,
        "kv_lora_rank": p.kv_lora_rank,
        "max_position_embeddings": 262144,
        "model_type": "kimi_k2",
        "moe_intermediate_size": p.moe_intermediate_size,
        "moe_layer_freq": 1,
        "n_group": 1,
        "n_routed_experts": p.n_routed_experts,
        "n_shared_experts": p.n_shared_experts,
        "norm_topk_prob": True,
        "num_attention_heads": p.num_attention_heads,
        "num_experts_per_tok": p.num_experts_per_tok,
        "num_hidden_layers": p.num_hidden_layers,
        "num_key_value_heads": p.num_attention_heads,
        "num_nextn_predict_layers": 0,
        "pretraining_tp": 1,
        "q_lora_rank": p.q_lora_rank,
        "qk_nope_head_dim": p.qk_nope_head_dim,
        "qk_rope_head_dim": p.qk_rope_head_dim,
        "quantization_config": {
            "config_groups": {
                "group_0": {
                    "input_activations": None,
                    "output_activations": None,
                    "targets": ["Linear"],
                    "weights": {
                        "actorder": None, "block_structure": None, "dynamic": False,
                        "group_size": GROUP_SIZE, "num_bits": 4, "observer": "minmax",
                        "observer_kwargs": {}, "strategy": "group", "symmetric": True,
                        "type": "int",
                    },
                }
            },
            "format": "pack-quantized",
            "ignore": ["lm_head", "re:.*self_attn.*", "re:.*shared_experts.*",
                       "re:.*mlp\\.(gate|up|gate_up|down)_proj.*"],
            "kv_cache_scheme": None,
            "quant_method": "compressed-tensors",
            "quantization_status": "compressed",
        },
        "rms_norm_eps": 1e-05,
        "rope_scaling": {
            "beta_fast": 1.0, "beta_slow": 1.0, "factor": 64.0, "mscale": 1.0,
            "mscale_all_dim": 1.0, "original_max_position_embeddings": 4096, "type": "yarn",
        },
        "rope_theta": 50000.0,
        "routed_scaling_factor": 2.827,
        "scoring_func": "sigmoid",
        "seq_aux": True,
        "tie_word_embeddings": False,
        "topk_group": 1,
        "topk_method": "noaux_tc",
        "torch_dtype": "bfloat16",
        "transformers_version": "4.48.3",
        "use_cache": True,
        "v_head_dim": p.v_head_dim,
        "vocab_size": vocab_size,
        **p.extra,
    }


# ---------------------------------------------------------------------------------------------
# Weights


def pack_int4(q: np.ndarray) -> np.ndarray:
    """Signed int4 values [-8, 7] -> int32 words: offset binary, least-significant nibble first."""
    rows, cols = q.shape
    u = (q.astype(np.int64) + 8).astype(np.uint32).reshape(rows, cols // 8, 8)
    words = np.zeros((rows, cols // 8), dtype=np.uint32)
    for i in range(8):
        words |= u[:, :, i] << np.uint32(4 * i)
    return words.view(np.int32)


def _make_tensor(rng: np.random.Generator, shape: tuple[int, ...], kind: str,
                 p: Preset) -> tuple[np.ndarray, str]:
    """Random data for one tensor: (array, safetensors dtype); bf16 as its raw 16-bit words."""
    if kind == "packed":
        rows, words = shape
        q = rng.integers(-8, 8, size=(rows, words * 8), dtype=np.int8)
        return pack_int4(q), "int32"
    if kind.startswith("shape:"):
        return np.array([int(v) for v in kind[6:].split(",")], dtype=np.int64), "int64"
    if kind == "router_bias":
        bias = rng.standard_normal(shape).astype(np.float32) * 0.01
        if p.router_skew:
            # A few popular experts, as in real routing: bias decays with expert id.
            bias += p.router_skew * np.exp(-np.arange(shape[0]) / max(1.0, shape[0] / 8))
        return bias.astype(np.float32), "float32"
    if kind == "norm":
        w = 1.0 + 0.1 * rng.standard_normal(shape)
    elif kind == "scale":
        # Uniform int4 values have std ~4.6: scale so an expert acts like a 1/sqrt(fan_in) layer.
        fan_in = shape[1] * GROUP_SIZE
        w = (0.5 + rng.random(shape)) / (4.6 * math.sqrt(fan_in))
    elif kind == "embed":
        w = rng.standard_normal(shape)
    elif kind == "lm_head":
        w = rng.standard_normal(shape) * (4.0 / math.sqrt(shape[1]))
    else:  # linear, router
        w = rng.standard_normal(shape) / math.sqrt(shape[1])
    bf16 = mx.array(w.astype(np.float32)).astype(mx.bfloat16).view(mx.uint16)
    return np.array(bf16), "bfloat16"


def save_release_shard(path: Path, tensors: dict[str, tuple[np.ndarray, str]]) -> None:
    """Write one shard with the `safetensors` library's own serializer, as the release was:
    tensors ordered by dtype (I64, F32, I32, BF16) then by name."""
    import safetensors

    arrays = {k: (np.ascontiguousarray(a), d) for k, (a, d) in tensors.items()}
    if hasattr(safetensors, "TensorSpec"):  # safetensors >= 0.8: raw pointers, no copy
        specs = {k: safetensors.TensorSpec(dtype=d, shape=list(a.shape), data_ptr=a.ctypes.data,
                                           data_len=a.nbytes) for k, (a, d) in arrays.items()}
    else:  # older releases take the bytes
        specs = {k: {"dtype": d, "shape": list(a.shape), "data": a.tobytes()}
                 for k, (a, d) in arrays.items()}
    safetensors.serialize_file(specs, str(path), metadata={"format": "pt"})


def _nbytes(shape: tuple[int, ...], kind: str) -> int:
    size = math.prod(shape)
    if kind in ("packed", "router_bias"):
        return 4 * size
    if kind.startswith("shape:"):
        return 8 * size
    return 2 * size


def write_checkpoint(path: str | Path, preset_name: str = "tiny", seed: int = 0,
                     **overrides) -> Path:
    """Write a complete release-format checkpoint to `path` (made atomically: tmp dir, rename)."""
    path = Path(path)
    p = preset(preset_name, **overrides)
    tmp = path.with_name(path.name + ".partial")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    rng = np.random.default_rng(seed)

    config = make_config(p)
    plan = [(t.name, t.shape, t.kind) for t in checkpoint_specs(ModelArgs.from_dict(config))]
    total = sum(_nbytes(s, k) for _, s, k in plan)
    limit = p.shard_bytes or max(1, total // 3 + 1)
    shards: list[list[tuple[str, tuple[int, ...], str]]] = [[]]
    size = 0
    for item in plan:
        nb = _nbytes(item[1], item[2])
        if shards[-1] and size + nb > limit:
            shards.append([])
            size = 0
        shards[-1].append(item)
        size += nb
    n = len(shards)
    weight_map = {}
    for i, shard in enumerate(shards, start=1):
        name = f"model-{i:05d}-of-{n:06d}.safetensors"
        tensors = {}
        for tname, shape, kind in shard:
            tensors[tname] = _make_tensor(rng, shape, kind, p)
            weight_map[tname] = name
        save_release_shard(tmp / name, tensors)
        del tensors
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    (tmp / "config.json").write_text(json.dumps(config, indent=2))
    generation = {"max_length": 262144, "eos_token_id": p.n_ranks + 2}
    (tmp / "generation_config.json").write_text(json.dumps(generation, indent=2))
    write_tokenizer_files(tmp, p.n_ranks)
    template = resources.files("kimi_cli.chat").joinpath("chat_template.jinja")
    if template.is_file():
        (tmp / "chat_template.jinja").write_text(template.read_text())
    (tmp / "SYNTHETIC").write_text(
        f"Random weights: preset {preset_name}, seed {seed}. Not a trained model.\n"
    )
    if path.exists():
        shutil.rmtree(path)
    tmp.rename(path)
    return path
