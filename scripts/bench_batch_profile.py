"""Where a batched decode step spends its time: attention, router, routed and shared experts,
dense MLP, lm_head, at B = 1, 2, 4, 8 sequences on one synthetic checkpoint (resident experts).

Each part runs alone on the inputs of a real step (B rows at a given depth), evaluated and timed
over repeats; "step" is the whole forward pass. Prints a table (ms per step, and per token).

    python scripts/bench_batch_profile.py [--preset small] [--depth 64] [--batches 1,2,4,8]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import mlx.core as mx

import kimi_cli
from kimi_cli.checkpoint.synthetic import write_checkpoint
from kimi_cli.model.cache import BatchLatentCache
from kimi_cli.model.moe import MoE


def timed(fn, repeats: int) -> float:
    """Median seconds of fn() (evaluated), after one warm-up."""
    mx.eval(fn())
    out = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        mx.eval(fn())
        out.append(time.perf_counter() - t0)
    return statistics.median(out)


def batch_cache(model, depth: int, rows: int, seed: int) -> list:
    ids = mx.random.randint(0, model.args.vocab_size - 300, (1, depth), key=mx.random.key(seed))
    single = model.make_cache()
    if depth:
        mx.eval(model(ids, cache=single))
    return [BatchLatentCache.merge([c] * rows) for c in single]


def restore(cache: list, saved: list) -> None:
    for c, (latent, idx, lengths) in zip(cache, saved):
        c.latent, c.idx, c.lengths = latent, idx, list(lengths)


def profile(model, B: int, depth: int, repeats: int) -> dict[str, float]:
    cache = batch_cache(model, depth, B, seed=B)
    saved = [(c.latent, c.idx, list(c.lengths)) for c in cache]
    ids = mx.array([[17 + i] for i in range(B)])
    parts = {"attention": 0.0, "router": 0.0, "routed experts": 0.0, "shared expert": 0.0,
             "dense mlp": 0.0, "norms+residual": 0.0}

    def step():
        restore(cache, saved)
        return model(ids, cache=cache)

    total = timed(step, repeats)
    h = model.model.embed_tokens(ids)
    mx.eval(h)
    for layer, c in zip(model.layers, cache):
        xn = layer.input_layernorm(h)
        mx.eval(xn)

        def attn(layer=layer, c=c, xn=xn):
            restore(cache, saved)
            return layer.self_attn(xn, c)

        parts["attention"] += timed(attn, repeats)
        restore(cache, saved)
        a = layer.self_attn(xn, c)
        h2 = h + a
        hn = layer.post_attention_layernorm(h2)
        mx.eval(hn)
        parts["norms+residual"] += timed(lambda h=h, layer=layer: layer.input_layernorm(h),
                                         repeats) * 2
        mlp = layer.mlp
        if isinstance(mlp, MoE):
            inds, w = mlp.gate(hn)
            mx.eval(inds, w)
            parts["router"] += timed(lambda mlp=mlp, hn=hn: mlp.gate(hn), repeats)
            parts["routed experts"] += timed(
                lambda mlp=mlp, hn=hn, inds=inds, w=w: mlp.experts(hn, inds, w), repeats)
            if mlp.shared_experts is not None:
                parts["shared expert"] += timed(lambda mlp=mlp, hn=hn: mlp.shared_experts(hn),
                                                repeats)
        else:
            parts["dense mlp"] += timed(lambda mlp=mlp, hn=hn: mlp(hn), repeats)
        h = h2 + mlp(hn)
        mx.eval(h)
    hn = model.model.norm(h)
    mx.eval(hn)
    parts["lm_head"] = timed(lambda: model.lm_head(hn), repeats)
    parts["step"] = total
    return parts


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, help="checkpoint (default: a fresh synthetic one)")
    ap.add_argument("--preset", default="small")
    ap.add_argument("--depth", type=int, default=64)
    ap.add_argument("--batches", default="1,2,4,8")
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        path = a.model or write_checkpoint(Path(tmp) / a.preset, a.preset, seed=1)
        model, _ = kimi_cli.load(path)
        batches = [int(b) for b in a.batches.split(",")]
        rows = {B: profile(model, B, a.depth, a.repeats) for B in batches}
    if a.json:
        print(json.dumps({"depth": a.depth, "ms_per_step": {
            B: {k: 1e3 * v for k, v in r.items()} for B, r in rows.items()}}, indent=1))
        return
    names = list(rows[batches[0]])
    print(f"ms per decode step (B rows at depth {a.depth}; per token = / B), "
          f"{mx.default_device()}")
    print(f"{'part':<16}" + "".join(f"{'B=' + str(B):>16}" for B in batches))
    for n in names:
        cells = "".join(f"{1e3 * rows[B][n]:>8.2f} ({1e3 * rows[B][n] / B:>5.2f})"
                        for B in batches)
        print(f"{n:<16}{cells}")
    base = rows[batches[0]]["step"]
    print(f"{'aggregate tok/s':<16}" + "".join(f"{B / rows[B]['step']:>16.1f}" for B in batches))
    print(f"{'vs B=1':<16}" + "".join(f"{base * B / rows[B]['step']:>15.2f}x" for B in batches))


if __name__ == "__main__":
    main()
