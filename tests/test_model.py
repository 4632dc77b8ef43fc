"""The forward pass against mlx-lm's deepseek_v3 reference on synthetic release-format checkpoints.

Logits must agree within float tolerance and greedy tokens must match; the model must keep the
release's int4 experts, a latent-only cache, and mlx-lm's model protocol.
"""

from __future__ import annotations

import json
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_flatten, tree_map

import kimi_cli
from kimi_cli.checkpoint.reader import open_checkpoint
from kimi_cli.checkpoint.synthetic import write_checkpoint

PROMPT = "Hello, World! 你好世界 I'm 12345. The quick brown fox jumps over the lazy dog."
GREEDY_STEPS = 32
# Our float32 model vs a float32 copy of the reference: ~1e-6 in practice.
MAX_REL_ERR = 1e-4

ODD = dict(num_attention_heads=5, num_hidden_layers=4, n_ranks=613, n_routed_experts=7,
           num_experts_per_tok=2)


def rel_err(a: mx.array, b: mx.array) -> float:
    return (mx.abs(a - b).max() / mx.abs(b).max()).item()


def load_reference(path: Path):
    """mlx-lm's deepseek_v3 on the same directory, bf16 parameters cast to float32 (int4 kept)."""
    from mlx_lm.utils import load_model

    ref, _ = load_model(Path(path))
    ref.update(tree_map(lambda x: x.astype(mx.float32) if x.dtype == mx.bfloat16 else x,
                        ref.parameters()))
    mx.eval(ref.parameters())
    return ref


def greedy(model, prompt: mx.array, steps: int, cache=None) -> tuple[list[int], list[mx.array]]:
    """Our own decode loop: one pass over the prompt, then one token at a time through the cache."""
    cache = model.make_cache() if cache is None else cache
    logits = model(prompt, cache=cache)[:, -1]
    tokens, all_logits = [], []
    for _ in range(steps):
        all_logits.append(logits)
        tok = mx.argmax(logits, axis=-1)
        tokens.append(tok.item())
        logits = model(tok[:, None], cache=cache)[:, -1]
    return tokens, all_logits


CASES = {
    "tiny-seed0": ("tiny", 0, {}),
    "tiny-seed3": ("tiny", 3, {}),
    "small-seed1": ("small", 1, {}),
    "tiny-odd": ("tiny", 2, ODD),
}


@pytest.fixture(scope="module")
def ckpt_dirs(tiny_ckpt: Path, small_ckpt: Path, tmp_path_factory):
    """Checkpoint directory by case name, each written once per module."""
    made = {"tiny-seed0": tiny_ckpt, "small-seed1": small_ckpt}

    def get(name: str) -> Path:
        if name not in made:
            preset, seed, overrides = CASES[name]
            made[name] = write_checkpoint(tmp_path_factory.mktemp("model") / name, preset, seed,
                                          **overrides)
        return made[name]

    return get


@pytest.fixture(scope="module", params=list(CASES))
def pair(request, ckpt_dirs):
    """(ours, reference, prompt ids) for one checkpoint; loaded once per module."""
    path = ckpt_dirs(request.param)
    ours, tok = kimi_cli.load(path)
    ids = mx.array([tok.encode(PROMPT)])
    return ours, load_reference(path), ids


@pytest.fixture(scope="module")
def tiny(tiny_ckpt: Path):
    model, tok = kimi_cli.load(tiny_ckpt)
    return model, mx.array([tok.encode(PROMPT)])


# ---------------------------------------------------------------------------------------------
# Agreement with the reference


def test_full_prompt_logits_match_reference(pair):
    ours, ref, ids = pair
    a, b = ours(ids), ref(ids)
    assert a.shape == b.shape == (1, ids.shape[1], ours.args.vocab_size)
    assert rel_err(a, b) < MAX_REL_ERR


def test_cached_decode_matches_reference_for_32_greedy_tokens(pair):
    ours, ref, ids = pair
    from mlx_lm.models.cache import make_prompt_cache

    ours_tokens, ours_logits = greedy(ours, ids, GREEDY_STEPS)
    ref_tokens, ref_logits = greedy(ref, ids, GREEDY_STEPS, cache=make_prompt_cache(ref))
    assert ours_tokens == ref_tokens
    for step, (a, b) in enumerate(zip(ours_logits, ref_logits)):
        assert rel_err(a, b) < MAX_REL_ERR, f"step {step}"


def test_odd_dimensions_are_taken_from_config(ckpt_dirs):
    model, tok = kimi_cli.load(ckpt_dirs("tiny-odd"))
    assert model.args.num_attention_heads == 5
    assert len(model.layers) == 4
    assert model.args.vocab_size == 613 + 256 == tok.vocab_size
    assert model.layers[1].mlp.experts.gate_proj["weight"].shape[0] == 7


# ---------------------------------------------------------------------------------------------
# mlx-lm's model protocol


def test_model_exposes_layers_and_make_cache(tiny):
    model, _ = tiny
    assert len(model.layers) == model.args.num_hidden_layers
    cache = model.make_cache()
    assert len(cache) == len(model.layers)
    assert all(c.offset == 0 for c in cache)


def test_mlx_lm_generate_step_gives_our_greedy_tokens(tiny):
    from mlx_lm.generate import generate_step

    model, ids = tiny
    theirs = [int(tok) for tok, _ in generate_step(ids[0], model, max_tokens=GREEDY_STEPS)]
    ours, _ = greedy(model, ids, GREEDY_STEPS)
    assert theirs == ours


def test_chunked_prefill_matches_one_pass(tiny):
    model, ids = tiny
    one_pass = model(ids)[:, -1]
    cache = model.make_cache()
    for start in range(0, ids.shape[1], 5):
        logits = model(ids[:, start : start + 5], cache=cache)
    assert cache[0].offset == ids.shape[1]
    assert rel_err(logits[:, -1], one_pass) < MAX_REL_ERR


# ---------------------------------------------------------------------------------------------
# Memory layout: latent cache, int4 experts, dtypes


def test_latent_cache_holds_only_latent_and_rope_key(tiny):
    model, ids = tiny
    args = model.args
    width = args.kv_lora_rank + args.qk_rope_head_dim
    cache = model.make_cache()
    mx.eval(model(ids, cache=cache))
    n = ids.shape[1]
    for c in cache:
        assert c.offset == n
        assert c.latent.shape[1] == 1  # one latent shared by all heads
        assert c.latent.shape[-1] == width
        assert c.nbytes == n * width * c.latent.dtype.size


def test_routed_experts_stay_int4(tiny):
    model, _ = tiny
    args = model.args
    dense_size = args.n_routed_experts * args.moe_intermediate_size * args.hidden_size
    params = dict(tree_flatten(model.parameters()))
    experts = {k: v for k, v in params.items() if ".mlp.experts." in k and k.endswith(".weight")}
    assert len(experts) == 3 * (args.num_hidden_layers - args.first_k_dense_replace)
    for name, w in experts.items():
        assert w.dtype == mx.uint32, name
        assert w.size * 8 == dense_size, name
    for name, w in params.items():
        if mx.issubdtype(w.dtype, mx.floating):
            assert w.size != dense_size, f"{name} looks like a dequantized expert stack"


def test_router_bias_stays_float32(tiny):
    model, _ = tiny
    biases = {k: v for k, v in tree_flatten(model.parameters())
              if k.endswith("e_score_correction_bias")}
    assert biases
    assert all(v.dtype == mx.float32 for v in biases.values())


@pytest.mark.skipif(mx.default_device() != mx.cpu, reason="compute dtype is bf16 on Metal")
def test_compute_dtype_is_float32_on_cpu(tiny):
    model, ids = tiny
    layer = model.layers[1]
    assert model.model.embed_tokens.weight.dtype == mx.float32
    assert layer.self_attn.q_a_proj.weight.dtype == mx.float32
    assert layer.mlp.experts.gate_proj["scales"].dtype == mx.float32
    assert model(ids).dtype == mx.float32


def _read_raw(info) -> bytes:
    with open(info.file, "rb") as f:
        f.seek(info.offset)
        return f.read(info.nbytes)


def test_loaded_experts_dequantize_to_file_words_times_scale(tiny_ckpt: Path, tiny):
    """Offset binary nibbles, least significant first: w = scale[r, c // 32] * (u - 8)."""
    model, _ = tiny
    ckpt = open_checkpoint(tiny_ckpt)
    gs = json.loads((tiny_ckpt / "config.json").read_text())["quantization_config"][
        "config_groups"]["group_0"]["weights"]["group_size"]
    layer, expert = 2, 3
    for proj in ("gate_proj", "down_proj"):
        pre = f"model.layers.{layer}.mlp.experts.{expert}.{proj}."
        packed, scale = ckpt.tensors[pre + "weight_packed"], ckpt.tensors[pre + "weight_scale"]
        words = np.frombuffer(_read_raw(packed), dtype="<i4").reshape(packed.shape)
        bf16 = np.frombuffer(_read_raw(scale), dtype="<u2").reshape(scale.shape)
        scales = (bf16.astype(np.uint32) << 16).view(np.float32)
        u = (words.view(np.uint32)[:, :, None] >> (4 * np.arange(8, dtype=np.uint32))) & 0xF
        u = u.reshape(words.shape[0], -1).astype(np.float32)
        expected = (u - 8) * np.repeat(scales, gs, axis=1)

        stack = getattr(model.layers[layer].mlp.experts, proj)
        assert np.array_equal(np.array(stack["weight"][expert]), words.view(np.uint32))
        got = mx.dequantize(stack["weight"][expert], stack["scales"][expert],
                            stack["biases"][expert], group_size=gs, bits=4)
        np.testing.assert_array_equal(np.array(got.astype(mx.float32)), expected)


def test_attention_in_query_blocks_matches_one_block(tiny_ckpt, monkeypatch):
    """Long prefill chunks attend in blocks of query rows to bound score memory: same result."""
    from kimi_cli.model import attention

    model, _ = kimi_cli.load(tiny_ckpt)
    ids = mx.array([[(7 * i) % 900 + 3 for i in range(48)]])
    cache = model.make_cache()
    model(ids[:, :20], cache=cache)
    whole = model(ids[:, 20:], cache=cache)
    # Budget for 2 query rows of scores: 28 rows of the second chunk run in 14 blocks.
    heads = model.args.num_attention_heads
    monkeypatch.setattr(attention, "SCORE_BUDGET_BYTES", 2 * heads * 48 * 4)
    cache = model.make_cache()
    model(ids[:, :20], cache=cache)
    blocked = model(ids[:, 20:], cache=cache)
    assert mx.allclose(whole, blocked, atol=1e-5, rtol=1e-5).item()


# ---------------------------------------------------------------------------------------------
# The router runs in float32 whatever the compute dtype (as the release's modeling code does)


def _reference_experts(ckpt_dir: Path, layer: int, x: mx.array, top_k: int) -> np.ndarray:
    """noaux_tc top-k in float64 from the checkpoint's own gate weight and correction bias."""
    index = json.loads((ckpt_dir / "model.safetensors.index.json").read_text())["weight_map"]
    pre = f"model.layers.{layer}.mlp.gate."
    w, b = (mx.load(str(ckpt_dir / index[pre + n]))[pre + n].astype(mx.float32)
            for n in ("weight", "e_score_correction_bias"))
    logits = np.array(x.astype(mx.float32)).astype(np.float64) @ np.array(w).astype(np.float64).T
    scores = 1 / (1 + np.exp(-logits)) + np.array(b)
    return np.sort(np.argsort(-scores, axis=-1)[..., :top_k], axis=-1)


def test_bf16_compute_selects_the_same_experts_as_a_float32_router(tiny_ckpt: Path):
    model, _ = kimi_cli.load(tiny_ckpt, dtype=mx.bfloat16)
    gate = model.layers[1].mlp.gate
    assert gate.weight.dtype == mx.float32
    assert gate.e_score_correction_bias.dtype == mx.float32
    x = mx.random.normal((1, 2048, gate.weight.size // gate.e_score_correction_bias.size),
                         key=mx.random.key(7)).astype(mx.bfloat16)
    inds, weights = gate(x)
    assert weights.dtype == mx.float32
    want = _reference_experts(tiny_ckpt, 1, x, gate.top_k)
    got = np.sort(np.array(inds), axis=-1)
    assert (got == want).all(), f"{(got != want).any(-1).sum()} of 2048 tokens routed differently"
