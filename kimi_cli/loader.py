"""`kimi_cli.load(path) -> (model, tokenizer)`: a release-format checkpoint into our MLX model.

Format quirks are handled here once (int4 packing, scales, kv_b_proj split, compute dtype) so
the forward pass only sees clean tensors.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten

from . import config
from .checkpoint.layout import EXPERT_PROJS, expert_shapes
from .checkpoint.reader import Checkpoint, open_checkpoint, resolve_model_path
from .errors import CheckpointError, UsageError
from .experts.cache import parse_cache_spec
from .model import Model
from .tokenizer import Tokenizer


def default_dtype() -> mx.Dtype:
    """float32 on the CPU backend (bf16 there is 4-6x slower and less precise), bf16 on Metal."""
    return mx.float32 if mx.default_device() == mx.cpu else mx.bfloat16


def load(path: str | os.PathLike, *, dtype: mx.Dtype | None = None, lazy: bool = False,
         expert_cache: str | int | None = None, prefetch: bool = True,
         read_threads: int = 4, pinned: dict[int, list[int]] | None = None,
         log: Callable[[str], None] | None = None, kv_sequences: int = 1, stage=None,
         ) -> tuple[Model, Tokenizer]:
    """Load a release directory, an expert pack (`kimi convert`) or a Hub repo id in the HF cache.

    `expert_cache` (see `experts.cache.parse_cache_spec`: bytes, "40GB", "25%" of machine
    memory, "25%experts", "auto" or "off"; default "auto") streams routed experts through a
    cache: from the release's own shards, or from the pack when `path` is one. "auto" streams
    only when the resident model would not fit in memory. `log` gets one line saying what the
    cache holds when it streams. `pinned` keeps experts a profiling run found hot
    (`ExpertCache.profile()`) in their slots. `kv_sequences`: sequences decoded together
    (heavy mode), whose KV cache the automatic expert budget leaves room for.

    Launched by mlx.launch (a group of more than one rank), each rank loads only its block of
    layers and rank 0 gets a `distributed.pipeline.PipelineModel`; the other ranks follow rank 0
    inside this call and exit when it ends (see `kimi_cli.distributed`). `stage` (a
    `distributed.split.LayerRange`) loads that block alone, in this process.
    """
    if stage is None:
        from .distributed.group import launched

        if launched():
            from .distributed.pipeline import load_pipeline

            dtype = dtype or default_dtype()

            def load_stage(root, stage):
                return load(root, dtype=dtype, lazy=lazy, expert_cache=expert_cache,
                            prefetch=prefetch, read_threads=read_threads, pinned=pinned,
                            log=log, kv_sequences=kv_sequences, stage=stage)

            return load_pipeline(path, load_stage, dtype)
    from .experts.pack import is_pack_dir, open_pack
    from .experts.release import ReleaseSource

    parse_cache_spec(expert_cache)  # a bad value is a usage error before anything is read
    root = resolve_model_path(path)
    dtype = dtype or default_dtype()
    pack = open_pack(root) if is_pack_dir(root) else None
    ckpt = open_checkpoint(root, with_experts=pack is None, layers=stage)
    tokenizer = Tokenizer.from_dir(root)
    if tokenizer.vocab_size > ckpt.args.vocab_size:
        raise CheckpointError(f"{root / 'tiktoken.model'}: {tokenizer.vocab_size} tokens but "
                              f"config.json vocab_size is {ckpt.args.vocab_size}")
    plan = plan_cache(ckpt, expert_cache, dtype, kv_sequences, stage)
    source = None
    if plan.slots:
        source = pack if pack is not None else ReleaseSource(ckpt, sorted(plan.slots))
        plan.source = "expert pack" if pack is not None else "release shards"
    model = load_model(ckpt, dtype=dtype, lazy=lazy, pack=pack, slots=plan.slots,
                       prefetch=prefetch, read_threads=read_threads, source=source,
                       stage=None if stage is None else stage.layers)
    model.expert_plan = plan
    if model.expert_cache is not None and pinned:
        for layer, experts in pinned.items():
            if int(layer) in model.expert_cache.pools:
                model.expert_cache.pin(int(layer), [int(e) for e in experts])
    if model.expert_cache is not None and log is not None:
        log(plan.describe())
    return model, tokenizer


def plan_cache(ckpt: Checkpoint, spec: str | int | None, dtype: mx.Dtype,
               kv_sequences: int = 1, stage=None):
    """The expert cache plan for this checkpoint (an `experts.cache.CachePlan`); with `stage`
    (a LayerRange) for that block of layers only, as one rank of a pipeline holds it."""
    from .experts.cache import make_plan

    args = ckpt.args
    resident = sum(t.nbytes * (1 if t.dtype == "F32" else max(1, dtype.size // 2))
                   for t in ckpt.tensors.values() if ".mlp.experts." not in t.name)
    kv = config.FIT_CONTEXT * args.kv_bytes_per_token(
        dtype.size, None if stage is None else len(stage.layers))
    return make_plan(args, spec, dtype, resident, kv * kv_sequences,
                     layers=None if stage is None else stage.layers)


class _Shards:
    """Lazily opened shards (mx.load maps a file; arrays are read when evaluated)."""

    def __init__(self) -> None:
        self._open: dict[Path, dict[str, mx.array]] = {}

    def get(self, ckpt: Checkpoint, name: str) -> mx.array:
        info = ckpt.tensors[name]
        arrays = self._open.get(info.file)
        if arrays is None:
            try:
                arrays = mx.load(str(info.file))
            except Exception as e:
                raise CheckpointError(f"{info.file}: cannot read safetensors ({e})") from None
            self._open[info.file] = arrays
        return arrays[name]


def load_model(ckpt: Checkpoint, dtype: mx.Dtype, lazy: bool = False,
               input_major: bool | None = None, pack=None, slots: dict[int, int] | None = None,
               prefetch: bool = True, read_threads: int = 4, source=None,
               stage: range | None = None) -> Model:
    """Build the model; resident routed experts come from the release shards or a pack; the
    layers in `slots` stream through an expert cache of that many slots, reading misses from
    `source` (an `experts.cache.ExpertSource`: the release shards or the pack)."""
    args = ckpt.args
    slots = slots or {}
    _expert_biases()  # a bad KIMI_KERNELS is a usage error before anything is built
    if input_major is None:
        input_major = mx.default_device() == mx.cpu
    model = Model(args, input_major, stage)
    cache = None
    if slots:
        cache = attach_expert_cache(model, source or pack, slots, dtype, prefetch,
                                    read_threads)
    shards = _Shards()
    expected = dict(tree_flatten(model.parameters()))
    weights: dict[str, mx.array] = {}

    def put(key: str, value: mx.array) -> None:
        if key not in expected:
            raise AssertionError(f"internal: model has no parameter {key}")
        weights[key] = value

    for name in ckpt.tensors:
        if ".mlp.experts." in name or "kv_b_proj" in name:
            continue
        value = shards.get(ckpt, name)
        # The router (gate weight and correction bias) stays float32 on every backend.
        router = name.endswith((".mlp.gate.weight", ".mlp.gate.e_score_correction_bias"))
        value = value.astype(mx.float32 if router else dtype)
        if input_major and value.ndim == 2 and name != "model.embed_tokens.weight":
            value = mx.contiguous(value.T)
        put(name, value)

    H, nope, v = args.num_attention_heads, args.qk_nope_head_dim, args.v_head_dim
    for i in model.stage:
        pre = f"model.layers.{i}."
        kv_b = shards.get(ckpt, pre + "self_attn.kv_b_proj.weight").astype(dtype)
        kv_b = kv_b.reshape(H, nope + v, args.kv_lora_rank)
        put(pre + "self_attn.w_uk", mx.contiguous(kv_b[:, :nope, :]))
        put(pre + "self_attn.w_uv_t", mx.contiguous(kv_b[:, nope:, :].swapaxes(-1, -2)))
        if args.is_moe_layer(i) and i not in slots:
            experts = (stack_experts(ckpt, shards, i, dtype) if pack is None
                       else pack_experts(pack, i, dtype))
            for key, value in experts.items():
                put(pre + "mlp.experts." + key, value)
        if not lazy:
            mx.eval([w for k, w in weights.items() if k.startswith(pre)])

    missing = set(expected) - set(weights)
    if missing:
        raise AssertionError(f"internal: parameters not loaded: {sorted(missing)[:5]}")
    model.load_weights(list(weights.items()), strict=True)
    if not lazy:
        mx.eval(model.parameters())
    model.eval()
    model.expert_cache = cache
    return model


def pack_experts(pack, layer: int, dtype: mx.Dtype) -> dict[str, mx.array]:
    """All of a layer's experts read from the pack into stacked arrays (no cache machinery)."""
    from .experts.cache import LayerPool

    pool = LayerPool(layer, pack.args, pack.args.n_routed_experts, dtype)
    for e in range(pack.args.n_routed_experts):
        dest = {f"{p}.weight": pool.views[f"{p}.weight"][e] for p in EXPERT_PROJS}
        pack.read_into(layer, e, dest)
        pool.fill(e, dest)
    return dict(pool.arrays)


def attach_expert_cache(model: Model, source, slots: dict[int, int], dtype: mx.Dtype,
                        prefetch: bool, read_threads: int):
    """Replace the streamed layers' experts with cache-backed ones; prefetch chains them."""
    from .experts.cache import ExpertCache
    from .model.moe import StreamedExperts

    args = model.args
    # The cache keeps what it reads: a page-cache copy of every streamed expert would eat the
    # memory the budget was planned for (F_NOCACHE on macOS, DONTNEED after reads on Linux).
    source.page_cache = False
    cache = ExpertCache(args, source.read_into, slots, dtype, threads=read_threads,
                        prefetch=prefetch)
    streamed = sorted(slots)
    for pos, i in enumerate(streamed):
        nxt = streamed[pos + 1] if pos + 1 < len(streamed) else None
        predict = None
        if nxt is not None and nxt == i + 1:
            router = model.layers[nxt].mlp.gate
            predict = (lambda r: (lambda x: r(x)[0]))(router)
        model.layers[i].mlp.experts = StreamedExperts(args, i, cache, nxt, predict)
    return cache


def stack_experts(ckpt: Checkpoint, shards: _Shards, layer: int,
                  dtype: mx.Dtype) -> dict[str, mx.array]:
    """A layer's routed experts as stacked MLX affine-int4 arrays (biases = -8 * scale, exact)."""
    args = ckpt.args
    pre = f"model.layers.{layer}.mlp.experts."
    out = {}
    shapes = expert_shapes(args)
    for proj in EXPERT_PROJS:
        shape = shards.get(ckpt, f"{pre}0.{proj}.weight_shape")
        if [int(d) for d in np.array(shape)] != list(shapes[proj]):
            raise CheckpointError(
                f"{ckpt.tensors[f'{pre}0.{proj}.weight_shape'].file}: {pre}0.{proj}.weight_shape "
                f"is {np.array(shape).tolist()}, expected {list(shapes[proj])}")
        packed = [shards.get(ckpt, f"{pre}{e}.{proj}.weight_packed")
                  for e in range(args.n_routed_experts)]
        scales = [shards.get(ckpt, f"{pre}{e}.{proj}.weight_scale")
                  for e in range(args.n_routed_experts)]
        s = mx.stack(scales).astype(dtype)
        out[f"{proj}.weight"] = mx.stack(packed).view(mx.uint32)
        out[f"{proj}.scales"] = s
        if _expert_biases():
            out[f"{proj}.biases"] = -8 * s
    return out


def _expert_biases() -> bool:
    """Whether routed experts are stored with MLX's biases (the gather_qmm fallback) or
    bias-free, as released (the Metal kernels: `mlx_kernels.needs_biases`)."""
    from mlx_kernels.dispatch import KernelsUnavailable, needs_biases

    try:
        return needs_biases()
    except KernelsUnavailable as e:
        raise UsageError(str(e)) from None
