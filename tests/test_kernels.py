"""The bias-free int4 expert kernels against the gather_qmm fallback: emulated in C++ here, real on a Mac.

Tolerances: scales are bf16 values (exact in float32) and the int4 values exact, so the kernels and
the fallback differ only in float32 summation order: relative to the output's largest value the
error stays near 1e-6 (asserted: 2e-5). Outputs cast to bf16 add half a bf16 ulp (2^-8 relative).
"""

from __future__ import annotations

import os
import subprocess
import sys

import mlx.core as mx
import numpy as np
import pytest

from mlx_kernels import dispatch, expert_bytes
from mlx_kernels.emu import Emulator, compiler
from mlx_kernels.experts import QuantizedWeight, combine, expert_swiglu
from mlx_kernels.kernels import Tiling, down_combine, gate_up_swiglu, switch_mlp
from mlx_kernels.sources import Kernel

F32_REL = 2e-5
BF16_REL = 2.0**-8

needs_cxx = pytest.mark.skipif(compiler() is None,
                               reason="no C++ compiler (g++/c++): the kernels' emulation cannot be built")
needs_metal = pytest.mark.skipif(not mx.metal.is_available(),
                                 reason="no Metal GPU: the real kernels run only on Apple silicon "
                                        "(their C++ emulation is tested above)")


@pytest.fixture(scope="module")
def emu(tmp_path_factory) -> Emulator:
    return Emulator(tmp_path_factory.mktemp("emu"))


def experts(rng, slots: int, hidden: int, inter: int, scale_dtype=mx.float32):
    """Random gate, up, down stacks in the release's format (scales are bf16 values)."""

    def stack(out, inp):
        w = mx.array(rng.integers(0, 2**32, size=(slots, out, inp // 8), dtype=np.uint32))
        s = mx.array((rng.random((slots, out, inp // 32)) * 0.02 + 1e-3).astype(np.float32))
        s = s.astype(mx.bfloat16).astype(scale_dtype)
        return QuantizedWeight(w, s, None)

    return stack(inter, hidden), stack(inter, hidden), stack(hidden, inter)


def routing(rng, tokens: int, k: int, slots: int):
    inds = np.stack([rng.choice(slots, k, replace=False) for _ in range(tokens)])
    w = rng.random((tokens, k)).astype(np.float32)
    return (mx.array(inds.astype(np.uint32)).reshape(1, tokens, k),
            mx.array(w / w.sum(-1, keepdims=True) * 2.827).reshape(1, tokens, k))


def fallback(x, inds, weights, gate, up, down):
    """The reference: gather_qmm with biases -8*scale, everything in float32."""
    f32 = [QuantizedWeight(q.weight, q.scales.astype(mx.float32),
                           -8 * q.scales.astype(mx.float32)) for q in (gate, up, down)]
    return combine(expert_swiglu(x.astype(mx.float32), inds, *f32), weights)


def rel_error(y: mx.array, ref: mx.array) -> float:
    return mx.abs(y.astype(mx.float32) - ref).max().item() / mx.abs(ref).max().item()


def assert_bf16_close(y: mx.array, ref: mx.array) -> None:
    err = mx.abs(y.astype(mx.float32) - ref)
    bound = BF16_REL * mx.abs(ref) + F32_REL * mx.abs(ref).max()
    assert mx.all(err <= bound).item(), f"worst excess {mx.max(err - bound).item()}"


def case(seed: int, hidden: int, inter: int, slots: int, k: int, tokens: int,
         dtype=mx.float32):
    rng = np.random.default_rng(seed)
    gate, up, down = experts(rng, slots, hidden, inter, dtype)
    x = mx.array(rng.standard_normal((1, tokens, hidden)).astype(np.float32)).astype(dtype)
    inds, weights = routing(rng, tokens, k, slots)
    return x, inds, weights, gate, up, down


# -- the C++ emulation -----------------------------------------------------------------------


@needs_cxx
def test_emulated_decode_matches_fallback_at_release_shapes(emu):
    # One token, hidden 7168, moe_inter 2048, top-8 over 9 slots: one layer's decode step.
    x, inds, weights, gate, up, down = case(0, 7168, 2048, 9, 8, 1)
    y = switch_mlp(emu, x, inds, weights, gate, up, down)
    assert y.shape == (1, 1, 7168) and y.dtype == mx.float32
    assert rel_error(y, fallback(x, inds, weights, gate, up, down)) < F32_REL


@needs_cxx
def test_emulated_prefill_matches_fallback_at_release_shapes(emu):
    # Two tokens forced down the sorted path: windows of rows on shared slots at full size.
    x, inds, weights, gate, up, down = case(1, 7168, 2048, 9, 8, 2)
    y = switch_mlp(emu, x, inds, weights, gate, up, down, sort=True)
    assert rel_error(y, fallback(x, inds, weights, gate, up, down)) < F32_REL


@needs_cxx
def test_emulated_decode_matches_fallback_at_small_odd_shapes(emu):
    # 3 and 5 groups per row (most lanes idle), k = 3, two tokens in one call.
    x, inds, weights, gate, up, down = case(2, 96, 160, 5, 3, 2)
    y = switch_mlp(emu, x, inds, weights, gate, up, down)
    assert rel_error(y, fallback(x, inds, weights, gate, up, down)) < F32_REL


@needs_cxx
def test_emulated_prefill_matches_fallback_with_long_runs_and_a_partial_window(emu):
    # 30 tokens x k 3 = 90 rows (the automatic sorted path): runs of ~18 rows per slot cross
    # window boundaries, and the last window holds 2 rows.
    x, inds, weights, gate, up, down = case(3, 96, 160, 5, 3, 30)
    y = switch_mlp(emu, x, inds, weights, gate, up, down)
    assert rel_error(y, fallback(x, inds, weights, gate, up, down)) < F32_REL


@needs_cxx
def test_emulated_kernels_with_uneven_tiles(emu):
    # 6 output rows per threadgroup over 160 and 96 rows: the last simdgroups are partial.
    x, inds, weights, gate, up, down = case(4, 96, 160, 5, 3, 4)
    R = 12
    slots = inds.reshape(R)
    tokens = mx.arange(R, dtype=mx.uint32) // 3
    tiling = Tiling(window=3, rows=3, simdgroups=2)
    act = gate_up_swiglu(emu, x.reshape(4, 96), gate, up, slots, tokens, tiling)
    y = down_combine(emu, act, down, slots, weights.reshape(R), tiling, True, mx.float32)
    assert rel_error(y.reshape(1, 4, 96), fallback(x, inds, weights, gate, up, down)) < F32_REL


@needs_cxx
@pytest.mark.parametrize("sort", [False, True], ids=["decode", "prefill"])
def test_emulated_bf16_inputs_and_output_within_half_a_bf16_ulp(emu, sort):
    # As on Metal: bf16 activations and scales in, bf16 out; the reference is float32.
    x, inds, weights, gate, up, down = case(5, 224, 96, 6, 4, 5, dtype=mx.bfloat16)
    y = switch_mlp(emu, x, inds, weights, gate, up, down, sort=sort)
    assert y.dtype == mx.bfloat16
    assert_bf16_close(y, fallback(x, inds, weights, gate, up, down))


@needs_cxx
def test_emulated_kernels_ignore_biases(emu):
    x, inds, weights, gate, up, down = case(6, 96, 64, 4, 2, 1)
    garbage = [q._replace(biases=mx.full(q.scales.shape, 1e3)) for q in (gate, up, down)]
    a = switch_mlp(emu, x, inds, weights, gate, up, down)
    b = switch_mlp(emu, x, inds, weights, *garbage)
    assert mx.array_equal(a, b).item()


CAST = Kernel("cast_bf16", ("inp",), ("out",), """
    const uint i = thread_position_in_grid.x;
    out[i] = static_cast<bfloat16_t>(inp[i]);
""")


@needs_cxx
def test_emulated_bfloat_rounds_to_nearest_even_as_mlx_does(emu):
    rng = np.random.default_rng(7)
    bits = rng.integers(0, 2**32, size=4096, dtype=np.uint64).astype(np.uint32)
    bits[:8] = [0x3F808000, 0x3F818000, 0x3F807FFF, 0x7F7FFFFF, 0x00000001, 0x80000000,
                0x7F800000, 0xFF800000]  # ties to even (both ways), below a tie, overflow...
    f = bits.view(np.float32)
    f = np.where(np.isnan(f), np.float32(1.0), f)
    x = mx.array(f)
    (y,) = emu(CAST, inputs=[x], template=[], grid=(4096, 1, 1), threadgroup=(256, 1, 1),
               output_shapes=[(4096,)], output_dtypes=[mx.bfloat16])
    assert np.array_equal(np.array(y.view(mx.uint16)), np.array(x.astype(mx.bfloat16).view(mx.uint16)))


LANES = Kernel("lanes", ("inp",), ("out",), """
    threadgroup float shared[64];
    const uint lane = thread_index_in_simdgroup;
    const uint t = thread_index_in_threadgroup;
    const float v = inp[thread_position_in_grid.x];
    const float reversed = simd_shuffle(v, 31 - lane);
    shared[t] = simd_sum(v);
    threadgroup_barrier(mem_flags::mem_threadgroup);
    out[thread_position_in_grid.x] = reversed + 1000.0f * shared[63 - t];
""")


@needs_cxx
def test_emulated_shuffle_sum_and_barrier_semantics(emu):
    # simd_shuffle reads another lane; simd_sum gives every lane its simdgroup's total; after
    # the barrier a thread sees what the other simdgroup wrote to threadgroup memory.
    v = np.arange(128, dtype=np.float32)
    (y,) = emu(LANES, inputs=[mx.array(v)], template=[], grid=(128, 1, 1),
               threadgroup=(64, 1, 1), output_shapes=[(128,)], output_dtypes=[mx.float32])
    sums = v.reshape(4, 32).sum(1)
    expect = []
    for i in range(128):
        group, t = divmod(i, 64)
        other = (63 - t) // 32
        expect.append(v[i - i % 32 + 31 - i % 32] + 1000.0 * sums[2 * group + other])
    assert np.array_equal(np.array(y), np.array(expect, dtype=np.float32))


DIVERGENT = Kernel("divergent", ("inp",), ("out",), """
    const uint lane = thread_index_in_simdgroup;
    if (lane < 16) {
        out[lane] = simd_sum(inp[lane]);
    }
""")


@needs_cxx
def test_emulated_simd_sum_in_divergent_code_is_an_error(emu):
    with pytest.raises(RuntimeError, match="only some lanes"):
        emu(DIVERGENT, inputs=[mx.zeros(32)], template=[], grid=(32, 1, 1),
            threadgroup=(32, 1, 1), output_shapes=[(32,)], output_dtypes=[mx.float32])


# -- the real kernels (Apple silicon) --------------------------------------------------------


@needs_metal
@pytest.mark.parametrize("sort", [False, True], ids=["decode", "prefill"])
def test_metal_kernels_match_fallback_at_release_shapes(sort):
    from mlx_kernels.metal import launch

    with mx.stream(mx.gpu):
        x, inds, weights, gate, up, down = case(8, 7168, 2048, 16, 8, 9 if sort else 1,
                                                dtype=mx.bfloat16)
        y = switch_mlp(launch, x, inds, weights, gate, up, down, sort=sort)
        assert_bf16_close(y, fallback(x, inds, weights, gate, up, down))


@needs_metal
def test_metal_kernels_match_fallback_at_small_odd_shapes():
    from mlx_kernels.metal import launch

    with mx.stream(mx.gpu):
        for tokens in (2, 30):
            x, inds, weights, gate, up, down = case(9, 96, 160, 5, 3, tokens)
            y = switch_mlp(launch, x, inds, weights, gate, up, down)
            assert rel_error(y, fallback(x, inds, weights, gate, up, down)) < F32_REL


# -- dispatch --------------------------------------------------------------------------------


def test_fallback_is_chosen_off_metal_and_when_forced(monkeypatch):
    monkeypatch.setenv(dispatch.ENV, "mlx")
    assert not dispatch.kernels_active() and dispatch.needs_biases()
    monkeypatch.delenv(dispatch.ENV)
    assert dispatch.kernels_active() == (mx.metal.is_available()
                                         and mx.default_device() == mx.gpu)


def test_bad_kernel_mode_is_a_clear_error(monkeypatch):
    monkeypatch.setenv(dispatch.ENV, "cuda")
    with pytest.raises(dispatch.KernelsUnavailable, match="KIMI_KERNELS='cuda'"):
        dispatch.kernels_active()


@pytest.mark.skipif(mx.metal.is_available(), reason="Metal is available here")
def test_forcing_metal_kernels_without_metal_is_an_error(monkeypatch):
    monkeypatch.setenv(dispatch.ENV, "metal")
    with pytest.raises(dispatch.KernelsUnavailable, match="no Metal GPU"):
        dispatch.kernels_active()


def test_release_expert_is_ten_percent_smaller_without_biases():
    shapes = [(2048, 7168), (2048, 7168), (7168, 2048)]
    assert expert_bytes(shapes, 32, 2, biases=False) == 24_772_608  # the release's bytes
    assert expert_bytes(shapes, 32, 2, biases=True) == 27_525_120


def test_fallback_switch_mlp_is_the_float32_weighted_sum_of_expert_swiglu(monkeypatch):
    monkeypatch.setenv(dispatch.ENV, "mlx")
    x, inds, weights, gate, up, down = case(10, 96, 64, 4, 2, 3)
    with_biases = [q._replace(biases=-8 * q.scales) for q in (gate, up, down)]
    y = dispatch.switch_mlp(x, inds, weights, *with_biases)
    ref = (expert_swiglu(x, inds, *with_biases) * weights[..., None]).sum(axis=-2)
    assert mx.array_equal(y, ref).item()
    # Bias-free storage on the fallback path: biases made on the fly, same bits.
    assert mx.array_equal(dispatch.switch_mlp(x, inds, weights, gate, up, down), y).item()


# -- the model on the kernels: bias-free storage, same greedy tokens --------------------------

_SCRIPT = os.path.join(os.path.dirname(sys.executable), "kimi")
KIMI = [_SCRIPT] if os.path.exists(_SCRIPT) else [sys.executable, "-m", "kimi_cli.cli"]
PROMPT = [5, 17, 300, 42, 8, 99, 123, 7, 64, 3, 11, 500, 600, 700, 20, 21, 22, 23, 24, 25, 26]


def kimi(*args: str, mode: str, emu_dir) -> subprocess.CompletedProcess:
    env = {**os.environ, "KIMI_KERNELS": mode, "KIMI_KERNELS_EMU_DIR": str(emu_dir),
           "HF_HUB_OFFLINE": "1"}
    return subprocess.run([*KIMI, *args], env=env, capture_output=True, text=True, timeout=300,
                          stdin=subprocess.DEVNULL)


def greedy(model, steps: int = 12):
    cache = model.make_cache()
    logits = model(mx.array([PROMPT]), cache=cache)[:, -1]
    tokens = []
    for _ in range(steps):
        y = mx.argmax(logits, axis=-1)
        tokens.append(y.item())
        logits = model(y[:, None], cache=cache)[:, -1]
    return tokens


@needs_cxx
def test_emulated_kernels_in_the_cli_give_the_fallbacks_greedy_tokens(tiny_ckpt, emu):
    import json

    runs = {}
    for mode in ("mlx", "emu"):
        r = kimi("run", "--model", str(tiny_ckpt), "hi", "-t", "0", "-n", "16", "--format",
                 "json", mode=mode, emu_dir=emu.cache_dir)
        assert r.returncode == 0, r.stderr
        runs[mode] = json.loads(r.stdout)["token_ids"]
    assert runs["emu"] == runs["mlx"] and len(runs["mlx"]) == 16


def test_bad_kernel_mode_is_a_usage_error_in_the_cli(tiny_ckpt, tmp_path):
    r = kimi("run", "--model", str(tiny_ckpt), "hi", "-n", "1", mode="cuda", emu_dir=tmp_path)
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == [
        "kimi: error: KIMI_KERNELS='cuda': use one of auto, mlx, metal, emu"]


def test_info_fit_report_counts_bias_free_slots_when_the_kernels_run(tiny_ckpt, tmp_path):
    import json

    fits = {}
    for mode in ("mlx", "emu"):
        r = kimi("info", str(tiny_ckpt), "--format", "json", mode=mode, emu_dir=tmp_path)
        assert r.returncode == 0, r.stderr
        fits[mode] = json.loads(r.stdout)["fit"]
    # tiny: 64 x 32 experts in float32 on the CPU: 768 B of biases per expert, 10 experts x 2 layers
    assert fits["mlx"]["expert_slot_bytes"] - fits["emu"]["expert_slot_bytes"] == 768
    assert fits["mlx"]["experts_bytes"] - fits["emu"]["experts_bytes"] == 768 * 10 * 2


@pytest.fixture(scope="module")
def tiny_pack(tiny_ckpt, tmp_path_factory):
    from kimi_cli.experts.convert import convert

    dst = tmp_path_factory.mktemp("packs") / "tiny-pack"
    convert(tiny_ckpt, dst)
    return dst


def test_fallback_storage_holds_biases(tiny_ckpt, monkeypatch):
    from mlx.utils import tree_flatten

    import kimi_cli

    monkeypatch.setenv(dispatch.ENV, "mlx")
    model, _ = kimi_cli.load(tiny_ckpt)
    assert any(k.endswith(".experts.gate_proj.biases")
               for k, _ in tree_flatten(model.parameters()))


@needs_cxx
def test_kernels_store_experts_without_biases_resident_and_in_cache_slots(
        tiny_ckpt, tiny_pack, emu, monkeypatch):
    from mlx.utils import tree_flatten

    import kimi_cli
    from kimi_cli.experts.cache import slot_nbytes
    from kimi_cli.loader import default_dtype

    monkeypatch.setenv(dispatch.ENV, "mlx")
    model, _ = kimi_cli.load(tiny_ckpt)
    reference = greedy(model)
    biased = slot_nbytes(model.args, default_dtype())

    monkeypatch.setenv(dispatch.ENV, "emu")
    monkeypatch.setenv("KIMI_KERNELS_EMU_DIR", str(emu.cache_dir))
    model, _ = kimi_cli.load(tiny_ckpt)
    names = [k for k, _ in tree_flatten(model.parameters())]
    assert any(".experts.gate_proj.scales" in k for k in names)
    assert not any("biases" in k for k in names)
    assert greedy(model) == reference

    args = model.args
    free = slot_nbytes(args, default_dtype())
    group = args.group_size
    scales = sum(r * (c // group) for r, c in
                 ((args.moe_intermediate_size, args.hidden_size),) * 2
                 + ((args.hidden_size, args.moe_intermediate_size),)) * default_dtype().size
    assert biased - free == scales  # exactly the biases, as large as the scales
    moe_layers = sum(args.is_moe_layer(i) for i in range(args.num_hidden_layers))
    streamed, _ = kimi_cli.load(tiny_pack, expert_cache=4 * moe_layers * free)  # 4 slots a layer
    assert set(streamed.expert_cache.stats.slots.values()) == {4}
    pools = streamed.expert_cache.pools
    assert pools and all(not any("biases" in k for k in p.arrays) for p in pools.values())
    assert all(p.nbytes == p.capacity * free for p in pools.values())
    assert greedy(streamed) == reference
    streamed.expert_cache.close()


def test_prefill_through_gather_qmm_with_biases_made_on_the_fly(monkeypatch):
    # KIMI_KERNELS_PREFILL=qmm: bias-free storage, prefill-sized calls on gather_qmm (bit for bit
    # the fallback), decode-sized calls still on the kernels.
    x, inds, weights, gate, up, down = case(11, 96, 64, 4, 2, 40)
    monkeypatch.setenv(dispatch.ENV, "mlx")
    expect = dispatch.switch_mlp(x, inds, weights, gate, up, down)
    monkeypatch.setenv(dispatch.ENV, "emu")
    monkeypatch.setenv(dispatch.PREFILL_ENV, "qmm")
    assert mx.array_equal(dispatch.switch_mlp(x, inds, weights, gate, up, down), expect).item()
    monkeypatch.setenv(dispatch.PREFILL_ENV, "fast")
    with pytest.raises(dispatch.KernelsUnavailable, match="KIMI_KERNELS_PREFILL='fast'"):
        dispatch.switch_mlp(x, inds, weights, gate, up, down)
