"""Expert-cache benchmark: decode speed, hit rate and reads at budgets below the experts' size.

Builds (or takes) a synthetic checkpoint with the release's real expert dimensions, converts it to
an expert pack, and decodes at budgets of 100%, 50% and 25% of the experts (uniform and skewed
routing), next to the raw sequential read speed of the same disk.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

import mlx.core as mx
import numpy as np

import kimi_cli
from kimi_cli.checkpoint.reader import open_checkpoint
from kimi_cli.checkpoint.synthetic import write_checkpoint
from kimi_cli.experts.cache import slot_nbytes
from kimi_cli.experts.convert import convert
from kimi_cli.loader import default_dtype


def raw_read_gbps(files: list[Path], limit: int = 2 << 30) -> float:
    """Sequential read of the pack's layer files with 8 MiB preads, page cache dropped first."""
    done, t0 = 0, time.perf_counter()
    for f in files:
        fd = os.open(f, os.O_RDONLY)
        try:
            if hasattr(os, "posix_fadvise"):
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            off = 0
            while done < limit:
                b = os.pread(fd, 8 << 20, off)
                if not b:
                    break
                off += len(b)
                done += len(b)
        finally:
            os.close(fd)
    return done / (time.perf_counter() - t0) / 1e9


def drop_page_cache(files: list[Path]) -> None:
    for f in files:
        fd = os.open(f, os.O_RDONLY)
        try:
            if hasattr(os, "posix_fadvise"):
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def decode(pack: Path, budget: int | None, tokens: int, prompt: list[int]) -> dict:
    model, _ = kimi_cli.load(pack, expert_cache=budget)
    cache = model.make_cache()
    t0 = time.perf_counter()
    logits = model(mx.array([prompt]), cache=cache)[:, -1]
    y = mx.argmax(logits, axis=-1)
    mx.eval(y)
    t_prefill = time.perf_counter() - t0
    ec = model.expert_cache
    before = ec.stats.to_dict(per_layer=False) if ec else None
    out = []
    t1 = time.perf_counter()
    for _ in range(tokens):
        out.append(y.item())
        y = mx.argmax(model(y[:, None], cache=cache)[:, -1], axis=-1)
    out.append(y.item())
    dt = time.perf_counter() - t1
    res = {"tokens": out, "decode_tps": tokens / dt, "decode_s_per_token": dt / tokens,
           "prefill_s": t_prefill,
           "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9}
    if ec:
        after = ec.stats.to_dict(per_layer=False)
        n = tokens
        hits = after["hits"] - before["hits"]
        misses = after["misses"] - before["misses"]
        read = after["bytes_read"] - before["bytes_read"]
        busy = after["read_busy_seconds"] - before["read_busy_seconds"]
        stall = (after["stall_seconds"] - before["stall_seconds"]) / n
        sync = (after["sync_ms_per_token"] * after["tokens"]
                - before["sync_ms_per_token"] * before["tokens"]) / 1e3 / n
        res.update({
            "hit_rate": hits / max(1, hits + misses),
            "misses_per_token": misses / n,
            "gb_read_per_token": read / n / 1e9,
            "read_gbps": read / busy / 1e9 if busy else 0.0,
            "stall_ms_per_token": 1e3 * stall,
            # Waiting for the router's ids: the compute queued before each streamed layer,
            # plus the host synchronization itself.
            "router_wait_ms_per_token": 1e3 * sync,
            "other_ms_per_token": 1e3 * (dt / n - stall - sync),
            "prefetch_precision": after["prefetch_precision"],
            "resident_gb": after["resident_bytes"] / 1e9,
        })
        ec.close()
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--workdir", default="/tmp/kimi-bench-cache")
    ap.add_argument("--experts", type=int, default=64)
    ap.add_argument("--layers", type=int, default=4, help="total layers (first is dense)")
    ap.add_argument("--tokens", type=int, default=8)
    ap.add_argument("--budgets", default="100,50,25")
    ap.add_argument("--skew", type=float, default=0.0, help="router bias skew (0 = uniform)")
    ap.add_argument("--json", default=None)
    ap.add_argument("--keep", action="store_true")
    ap.add_argument("--one", default=None, help=argparse.SUPPRESS)  # internal: pack:pct
    a = ap.parse_args()
    if a.one:  # one budget in its own process, so peak RSS is this budget's own
        path, pct = a.one.rsplit(":", 1)
        pack = Path(path)
        args = open_checkpoint(pack, with_experts=False).args
        moe = sum(args.is_moe_layer(i) for i in range(args.num_hidden_layers))
        all_bytes = moe * args.n_routed_experts * slot_nbytes(args, default_dtype())
        prompt = np.random.default_rng(0).integers(0, args.vocab_size - 256, size=16).tolist()
        budget = None if int(pct) >= 100 else all_bytes * int(pct) // 100
        print(json.dumps(decode(pack, budget, a.tokens, prompt)))
        return
    work = Path(a.workdir)
    work.mkdir(parents=True, exist_ok=True)
    src = work / f"io-e{a.experts}-l{a.layers}-s{a.skew}"
    pack = work / (src.name + "-pack")
    if not (pack / "pack.json").exists():
        if not (src / "config.json").exists():
            print(f"writing synthetic checkpoint {src} ...", file=sys.stderr, flush=True)
            write_checkpoint(src, "io", 0, n_routed_experts=a.experts,
                             num_hidden_layers=a.layers, router_skew=a.skew)
        print("converting ...", file=sys.stderr, flush=True)
        convert(src, pack)
        if not a.keep:
            shutil.rmtree(src)
    args = open_checkpoint(pack, with_experts=False).args
    dtype = default_dtype()
    moe = sum(args.is_moe_layer(i) for i in range(args.num_hidden_layers))
    all_bytes = moe * args.n_routed_experts * slot_nbytes(args, dtype)
    files = sorted((pack / "experts").glob("*.bin"))
    disk = raw_read_gbps(files)
    print(f"MLX {mx.__version__} on {mx.default_device()}; {moe} MoE layers x "
          f"{args.n_routed_experts} experts, {all_bytes / 1e9:.2f} GB of experts in slots; "
          f"raw sequential read {disk:.2f} GB/s; router skew {a.skew}")
    results = {}
    ref_tokens = None
    for pct in [int(p) for p in a.budgets.split(",")]:
        drop_page_cache(files)
        proc = subprocess.run([sys.executable, __file__, "--one", f"{pack}:{pct}",
                               "--tokens", str(a.tokens)], capture_output=True, text=True)
        if proc.returncode:
            sys.exit(f"budget {pct}% failed:\n{proc.stderr}")
        r = json.loads(proc.stdout.strip().splitlines()[-1])
        if ref_tokens is None:
            ref_tokens = r["tokens"]
        r["identical_tokens"] = r["tokens"] == ref_tokens
        r["read_vs_disk"] = (r.get("read_gbps", 0) / disk) if disk else None
        results[f"{pct}%"] = r
        show = {k: (round(v, 4) if isinstance(v, float) else v) for k, v in r.items()
                if k != "tokens"}
        print(f"budget {pct:3d}%: {json.dumps(show)}", flush=True)
    if a.json:
        Path(a.json).write_text(json.dumps({"disk_read_gbps": disk, "results": results},
                                           indent=2))


if __name__ == "__main__":
    main()
