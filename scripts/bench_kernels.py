"""Expert-kernel benchmark for a Mac: the bias-free Metal kernels against gather_qmm, same run.

Per MoE layer at the release's expert dims (7168 x 2048, top-8): time and achieved GB/s at decode
and prefill sizes; then decode/prefill tok/s of a synthetic `io`-preset checkpoint on both paths.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import mlx.core as mx
import numpy as np

from mlx_kernels import combine, expert_bytes, expert_swiglu
from mlx_kernels.experts import SORT_MIN_ROWS, QuantizedWeight
from mlx_kernels.kernels import Tiling, switch_mlp

HIDDEN, INTER, TOP_K, GROUP = 7168, 2048, 8, 32
SHAPES = [(INTER, HIDDEN), (INTER, HIDDEN), (HIDDEN, INTER)]


def layer(slots: int, dtype: mx.Dtype, seed: int = 0):
    """A layer's `slots` experts with random packed words and bf16-valued scales."""
    rng = np.random.default_rng(seed)
    out = []
    for rows, cols in SHAPES:
        w = mx.array(rng.integers(0, 2**32, size=(slots, rows, cols // 8), dtype=np.uint32))
        s = mx.array((rng.random((slots, rows, cols // GROUP)) * 0.02 + 1e-3).astype(np.float32))
        s = s.astype(mx.bfloat16).astype(dtype)
        out.append(QuantizedWeight(w, s, -8 * s))
    mx.eval([q for w in out for q in w])
    return out


def timed(fn, repeats: int) -> float:
    mx.eval(fn())  # warm-up: kernel compilation, allocations
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        mx.eval(fn())
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def bench_layer(tokens: list[int], slots: int, repeats: int, launch, dtype: mx.Dtype) -> list[dict]:
    experts = layer(slots, dtype)
    free = [q._replace(biases=None) for q in experts]
    rng = np.random.default_rng(1)
    per_release = expert_bytes(SHAPES, GROUP, dtype.size, biases=False)
    per_biased = expert_bytes(SHAPES, GROUP, dtype.size, biases=True)
    rows = []
    for n in tokens:
        x = mx.array(rng.standard_normal((1, n, HIDDEN)).astype(np.float32)).astype(dtype)
        inds = mx.array(np.stack([rng.choice(slots, TOP_K, replace=False) for _ in range(n)])
                        .astype(np.uint32)).reshape(1, n, TOP_K)
        w = mx.array(rng.random((1, n, TOP_K)).astype(np.float32))
        used = len(np.unique(np.array(inds)))
        paths = {"gather_qmm": (lambda x=x, inds=inds, w=w: combine(
            expert_swiglu(x, inds, *experts, GROUP), w), per_biased)}
        if n * TOP_K >= SORT_MIN_ROWS:  # KIMI_KERNELS_PREFILL=qmm: biases made per call
            paths["qmm_fly"] = (lambda x=x, inds=inds, w=w: combine(
                expert_swiglu(x, inds, *free, GROUP), w), per_release)
        if launch is not None:
            paths["kernels"] = (lambda x=x, inds=inds, w=w: switch_mlp(launch, x, inds, w, *free),
                                per_release)
        for name, (fn, per_expert) in paths.items():
            t = timed(fn, repeats)
            rows.append({"path": name, "tokens": n, "experts_touched": used,
                         "ms": 1e3 * t, "bytes": used * per_expert,
                         "gbps": used * per_expert / t / 1e9,
                         "release_gbps": used * per_release / t / 1e9})
    return rows


def sweep(slots: int, repeats: int, launch, dtype: mx.Dtype) -> list[dict]:
    """Decode (one token) at several tilings: output rows per simdgroup x simdgroups per group."""
    gate, up, down = [q._replace(biases=None) for q in layer(slots, dtype)]
    rng = np.random.default_rng(2)
    x = mx.array(rng.standard_normal((1, 1, HIDDEN)).astype(np.float32)).astype(dtype)
    inds = mx.array(rng.choice(slots, TOP_K, replace=False).astype(np.uint32)).reshape(1, 1, TOP_K)
    w = mx.array(rng.random((1, 1, TOP_K)).astype(np.float32))
    per_release = expert_bytes(SHAPES, GROUP, dtype.size, biases=False)
    rows = []
    for r in (1, 2, 4, 8):
        for sg in (1, 2, 4, 8):
            tiles = (Tiling(1, r, sg), Tiling(0, r, sg))
            t = timed(lambda tiles=tiles: switch_mlp(launch, x, inds, w, gate, up, down,
                                                     decode=tiles), repeats)
            rows.append({"rows": r, "simdgroups": sg, "ms": 1e3 * t,
                         "gbps": TOP_K * per_release / t / 1e9})
    return rows


def kimi_bench(model: Path, mode: str, prompt: int, gen: int, repeats: int) -> dict:
    env = {**os.environ, "KIMI_KERNELS": mode}
    kimi = [sys.executable, "-m", "kimi_cli.cli"]
    r = subprocess.run([*kimi, "bench", "-m", str(model), "-p", str(prompt), "-n", str(gen),
                        "-r", str(repeats), "-o", "json"], env=env, capture_output=True,
                       text=True)
    if r.returncode != 0:
        raise SystemExit(f"kimi bench ({mode}) failed:\n{r.stderr}")
    out = {}
    for res in json.loads(r.stdout)["results"]:
        out[res["test"]] = res["tps_mean"]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", default="1,4,32,128,512",
                    help="tokens per layer call: 1 is decode, the rest prefill chunks")
    ap.add_argument("--slots", type=int, default=64, help="experts resident in the layer")
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--model", type=Path, help="a synthetic io-preset checkpoint (or any)")
    ap.add_argument("--build", type=Path,
                    help="write the io-preset checkpoint here first (1.7 GB)")
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--gen", type=int, default=32)
    ap.add_argument("--emu", action="store_true",
                    help="off Metal: run the kernels' C++ emulation (a functional check; its "
                         "times mean nothing)")
    ap.add_argument("--sweep", action="store_true",
                    help="also time decode at 16 tilings (rows per simdgroup x simdgroups)")
    ap.add_argument("--json", action="store_true", help="one JSON document on stdout")
    a = ap.parse_args()

    metal = mx.metal.is_available()
    if metal:
        from mlx_kernels.metal import launch
    elif a.emu:
        from mlx_kernels.emu import Emulator

        launch = Emulator()
    else:
        launch = None
        print("no Metal GPU: only the gather_qmm path runs (--emu checks the kernels' "
              "emulation)", file=sys.stderr)
    dtype = mx.bfloat16 if metal else mx.float32
    tokens = [int(t) for t in a.tokens.split(",")]
    report = {"metal": metal, "device": str(mx.default_device()), "dtype": str(dtype),
              "slots": a.slots, "layer": bench_layer(tokens, a.slots, a.repeats, launch, dtype)}

    if a.sweep and launch is not None:
        report["decode_tilings"] = sweep(a.slots, a.repeats, launch, dtype)

    model = a.model
    if a.build is not None:
        from kimi_cli.checkpoint.synthetic import write_checkpoint

        model = write_checkpoint(a.build, "io", seed=0)
    if model is not None:
        report["model"] = {"path": str(model), "prompt": a.prompt, "gen": a.gen}
        for mode in ("mlx", "auto") if metal else ("mlx",):
            name = "kernels" if mode == "auto" else "gather_qmm"
            report["model"][name] = kimi_bench(model, mode, a.prompt, a.gen, max(1, a.repeats // 3))

    if a.json:
        json.dump(report, sys.stdout, indent=2)
        print()
        return
    print(f"{report['device']}, {dtype}, {a.slots} slots, top-{TOP_K}, "
          f"{HIDDEN}x{INTER} experts; median of {a.repeats}")
    print(f"{'path':<11}{'tokens':>7}{'experts':>8}{'ms':>10}{'GB/s':>8}{'release GB/s':>14}")
    for r in report["layer"]:
        print(f"{r['path']:<11}{r['tokens']:>7}{r['experts_touched']:>8}{r['ms']:>10.3f}"
              f"{r['gbps']:>8.1f}{r['release_gbps']:>14.1f}")
    for r in report.get("decode_tilings", []):
        print(f"decode tiling rows={r['rows']} simdgroups={r['simdgroups']}: "
              f"{r['ms']:.3f} ms, {r['gbps']:.1f} GB/s")
    if "model" in report:
        m = report["model"]
        for name in ("gather_qmm", "kernels"):
            if name in m:
                tps = ", ".join(f"{t} {v:.2f} tok/s" for t, v in m[name].items())
                print(f"model {name:<11} {tps}")


if __name__ == "__main__":
    main()
