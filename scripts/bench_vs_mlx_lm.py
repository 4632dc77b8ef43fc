"""Prefill and decode tokens/s of our model vs stock mlx-lm (bf16) and mlx-lm cast to float32.

Same checkpoint, same run, contenders interleaved per repeat; also the memory-bandwidth floor.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import mlx.core as mx
import numpy as np
from mlx.utils import tree_map
from mlx_lm.models.cache import make_prompt_cache
from mlx_lm.utils import load_model

import kimi_cli
from kimi_cli import config
from kimi_cli.bench import (
    _arrays,
    cache_bytes_per_token,
    machine_info,
    measure_bandwidth,
    weight_bytes_per_token,
)


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------
# Contenders and one measurement


@dataclass
class Contender:
    name: str
    model: object
    make_cache: Callable[[], list]
    weight_bytes: dict = field(default_factory=dict)
    kv_bytes_per_token: float = 0.0
    prefill: list[float] = field(default_factory=list)
    decode: list[float] = field(default_factory=list)


def load_contenders(path: Path) -> tuple[list[Contender], object]:
    ours, _ = kimi_cli.load(path)
    stock, _ = load_model(path)
    f32, _ = load_model(path)
    f32.update(tree_map(lambda x: x.astype(mx.float32) if x.dtype == mx.bfloat16 else x,
                        f32.parameters()))
    mx.eval(f32.parameters())
    return [
        Contender("ours", ours, ours.make_cache),
        Contender("mlx-lm bf16", stock, lambda: make_prompt_cache(stock)),
        Contender("mlx-lm f32", f32, lambda: make_prompt_cache(f32)),
    ], ours.args


def run_once(c: Contender, prompt: list[int], n: int, chunk: int) -> tuple[float, float, list]:
    """Prefill `prompt` with a fresh cache, then n greedy decode steps: (pp tok/s, tg tok/s)."""
    model, cache = c.model, c.make_cache()
    t = time.perf_counter()
    for start in range(0, len(prompt), chunk):
        ids = mx.array(prompt[start : start + chunk])[None]
        logits = model(ids, cache=cache)[:, -1, :]
        mx.eval(logits, [s for x in cache for s in _arrays(x.state)])
    pp = len(prompt) / (time.perf_counter() - t)

    # Pipelined like mlx-lm's generate_step: queue step i+1 before reading token i.
    y = mx.argmax(logits, axis=-1)
    mx.eval(y)
    t = time.perf_counter()
    for _ in range(n):
        nxt = mx.argmax(model(y[:, None], cache=cache)[:, -1, :], axis=-1)
        mx.async_eval(nxt)
        y.item()
        y = nxt
    y.item()
    tg = n / (time.perf_counter() - t)
    return pp, tg, cache



# ---------------------------------------------------------------------------------------------
# Report


def summary(xs: list[float]) -> tuple[float, float]:
    return statistics.median(xs), (statistics.stdev(xs) if len(xs) > 1 else 0.0)


def report(p: int, n: int, contenders: list[Contender], bw: dict) -> tuple[str, list[dict]]:
    ours = contenders[0]
    pp_ours, tg_ours = statistics.median(ours.prefill), statistics.median(ours.decode)
    depth = p + (n + 1) / 2  # mean cached tokens read per decode step
    lines = [
        f"### pp{p} / tg{n} (decode at depth {p}), median ± stdev over {len(ours.prefill)} repeats",
        "",
        "| contender | pp tok/s | tg tok/s | ours/it pp | ours/it tg | MB/token | floor tok/s "
        "| tg/floor |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    rows = []
    for c in contenders:
        pp, pp_sd = summary(c.prefill)
        tg, tg_sd = summary(c.decode)
        touched = c.weight_bytes["total"] + c.kv_bytes_per_token * depth
        floor = bw["gbps"] * 1e9 / touched
        rows.append({
            "contender": c.name, "prompt_tokens": p, "decode_tokens": n,
            "prefill_tps": c.prefill, "decode_tps": c.decode,
            "prefill_tps_median": pp, "prefill_tps_stdev": pp_sd,
            "decode_tps_median": tg, "decode_tps_stdev": tg_sd,
            "ratio_ours_prefill": pp_ours / pp, "ratio_ours_decode": tg_ours / tg,
            "weight_bytes_per_token": c.weight_bytes, "kv_bytes_per_cached_token":
                c.kv_bytes_per_token, "bytes_per_decode_token": touched,
            "floor_decode_tps": floor, "decode_vs_floor": tg / floor,
        })
        lines.append(
            f"| {c.name} | {pp:.1f} ± {pp_sd:.1f} | {tg:.1f} ± {tg_sd:.1f} | "
            f"{pp_ours / pp:.2f}x | {tg_ours / tg:.2f}x | {touched / 1e6:.2f} | {floor:.0f} | "
            f"{tg / floor:.1%} |"
        )
    return "\n".join(lines), rows


def byte_table(contenders: list[Contender]) -> str:
    lines = ["| contender | dense MB | top-k experts MB | embed row KB | KV KB/cached token |",
             "|---|---:|---:|---:|---:|"]
    for c in contenders:
        w = c.weight_bytes
        lines.append(f"| {c.name} | {w['dense'] / 1e6:.2f} | {w['routed_experts'] / 1e6:.2f} | "
                     f"{w['embedding_row'] / 1e3:.1f} | {c.kv_bytes_per_token / 1e3:.2f} |")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------


def parse_lengths(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError("prompt lengths must be >= 1")
    return values


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    src = parser.add_mutually_exclusive_group()
    src.add_argument("--model", type=Path, help="release-format checkpoint directory")
    src.add_argument("--preset", help="build a synthetic checkpoint (tiny, small, io) in a temp "
                                      "dir (default: small)")
    parser.add_argument("--seed", type=int, default=1, help="synthetic checkpoint seed")
    parser.add_argument("-p", type=parse_lengths, default=[128], metavar="N[,N...]",
                        help="prompt length(s) (default 128)")
    parser.add_argument("-n", type=int, default=64, help="decode tokens (default 64)")
    parser.add_argument("-r", type=int, default=3, help="repeats after a warm-up (default 3)")
    parser.add_argument("--chunk", type=int, default=config.PREFILL_CHUNK,
                        help=f"prefill chunk (default {config.PREFILL_CHUNK}, as the engine)")
    parser.add_argument("--json", type=Path, metavar="OUT", help="write all samples as JSON")
    args = parser.parse_args(argv)
    if args.n < 1 or args.r < 1 or args.chunk < 1:
        parser.error("-n, -r and --chunk must be >= 1")

    with tempfile.TemporaryDirectory(prefix="kimi-bench-") as tmp:
        if args.model is not None:
            path = args.model
            if not (path / "config.json").is_file():
                parser.error(f"--model {path}: no config.json there")
        else:
            from kimi_cli.checkpoint.synthetic import write_checkpoint

            name = args.preset or "small"
            log(f"building synthetic checkpoint preset={name} seed={args.seed} ...")
            try:
                path = write_checkpoint(Path(tmp) / name, name, args.seed)
            except ValueError as e:
                parser.error(f"--preset: {e}")
        return bench(path, args)


def bench(path: Path, args: argparse.Namespace) -> int:
    sys.stdout.reconfigure(line_buffering=True)  # keep stdout and stderr progress in order
    info = machine_info()
    print(f"MLX {info['mlx']} (mlx-lm {info['mlx_lm']}), device {info['device']}, "
          f"Metal {'yes' if info['metal'] else 'no'}; CPU {info['chip']}, {info['cores']} cores; "
          f"{info['platform']}")
    log("measuring memory bandwidth ...")
    bw = measure_bandwidth()
    print(f"memory bandwidth (copy of {bw['buffer_mb']} MB, read+write bytes, best of "
          f"{bw['tries']}): numpy copyto {bw['numpy_copy_gbps']:.2f} GB/s, MLX a+0 "
          f"{bw['mlx_copy_gbps']:.2f} GB/s (a fresh output buffer per op) -> floor uses "
          f"{bw['used']} ({bw['gbps']:.2f} GB/s)")

    log(f"loading {path} three times (ours, mlx-lm bf16, mlx-lm f32) ...")
    contenders, margs = load_contenders(path)
    top_k, n_exp = margs.num_experts_per_tok, margs.n_routed_experts
    for c in contenders:
        c.weight_bytes = weight_bytes_per_token(c.model, top_k, n_exp)
    print(f"checkpoint {path}: {margs.num_hidden_layers} layers, hidden {margs.hidden_size}, "
          f"{n_exp} experts top-{top_k}, vocab {margs.vocab_size}")

    rng = np.random.default_rng(0)
    results = {"machine": info, "bandwidth": bw, "checkpoint": str(path), "rows": []}
    for p in args.p:
        prompt = rng.integers(0, margs.vocab_size, size=p).tolist()
        for c in contenders:
            c.prefill, c.decode = [], []
            log(f"warm-up {c.name} p={p} n={args.n}")
            _, _, cache = run_once(c, prompt, args.n, args.chunk)
            c.kv_bytes_per_token = cache_bytes_per_token(cache)
            del cache
            mx.clear_cache()
        for r in range(args.r):
            for c in contenders:
                pp, tg, cache = run_once(c, prompt, args.n, args.chunk)
                del cache
                mx.clear_cache()
                c.prefill.append(pp)
                c.decode.append(tg)
                log(f"repeat {r + 1}/{args.r} {c.name}: pp{p} {pp:.1f} tok/s, "
                    f"tg{args.n} {tg:.1f} tok/s")
        if p == args.p[0]:
            print("\nbytes read per decode token (from model.parameters() and the cache state):")
            print(byte_table(contenders))
        text, rows = report(p, args.n, contenders, bw)
        print()
        print(text)
        results["rows"].extend(rows)
    print("\nfloor = bandwidth / (weights read per token + KV bytes x mean depth); "
          "ratio ours/it > 1 means ours is faster")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
        log(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
