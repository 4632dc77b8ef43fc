"""Expert-cache benchmark: release shards vs expert pack as the source of misses, same disk.

Builds synthetic checkpoints with the release's real expert dimensions (uniform and skewed
routing) and their packs, then, interleaving the sources and repeating: miss throughput (parallel
reads into slots, as the cache does), decode tok/s at shares of the experts, raw sequential reads.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import mlx.core as mx
import numpy as np

import kimi_cli
from kimi_cli.checkpoint.layout import EXPERT_PROJS
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


def decode(path: Path, pct: int, tokens: int, prompt: list[int]) -> dict:
    model, _ = kimi_cli.load(path, expert_cache="off" if pct >= 100 else f"{pct}%experts")
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
    res = {"tokens": out, "decode_tps": tokens / dt, "prefill_s": t_prefill,
           "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9}
    if ec:
        after = ec.stats.to_dict(per_layer=False)
        hits = after["hits"] - before["hits"]
        misses = after["misses"] - before["misses"]
        read = after["bytes_read"] - before["bytes_read"]
        busy = after["read_busy_seconds"] - before["read_busy_seconds"]
        res.update({
            "hit_rate": hits / max(1, hits + misses),
            "misses_per_token": misses / tokens,
            "gb_read_per_token": read / tokens / 1e9,
            "read_gbps": read / busy / 1e9 if busy else 0.0,
            "stall_ms_per_token": 1e3 * (after["stall_seconds"] - before["stall_seconds"])
            / tokens,
        })
        ec.close()
    return res


def open_source(path: Path):
    """The reader the cache would use for `path` (a pack or a release directory), uncached."""
    from kimi_cli.experts.pack import is_pack_dir, open_pack
    from kimi_cli.experts.release import ReleaseSource

    if is_pack_dir(path):
        src = open_pack(path, page_cache=False)
        return src, src.args, 1.0
    ckpt = open_checkpoint(path)
    moe = [i for i in range(ckpt.args.num_hidden_layers) if ckpt.args.is_moe_layer(i)]
    src = ReleaseSource(ckpt, moe, page_cache=False)
    return src, ckpt.args, src.reads_per_expert()


def miss_throughput(path: Path, misses: int, threads: int, seed: int) -> dict:
    """Random experts read into distinct slots by `threads` readers (the cache's miss path),
    then the slot finish (bf16 scales -> compute dtype, biases) timed on its own."""
    from concurrent.futures import ThreadPoolExecutor

    from kimi_cli.experts.cache import LayerPool

    src, args, preads = open_source(path)
    moe = [i for i in range(args.num_hidden_layers) if args.is_moe_layer(i)]
    rng = np.random.default_rng(seed)
    picks = [(int(rng.choice(moe)), int(e)) for e in rng.integers(0, args.n_routed_experts,
                                                                     misses)]
    pool = LayerPool(moe[0], args, misses, default_dtype())
    dests = [{f"{p}.weight": pool.views[f"{p}.weight"][i] for p in EXPERT_PROJS}
             for i in range(misses)]
    t0 = time.perf_counter()
    with ThreadPoolExecutor(threads) as ex:
        nbytes = sum(ex.map(lambda i: src.read_into(*picks[i], dests[i]), range(misses)))
    read_s = time.perf_counter() - t0
    t1 = time.perf_counter()
    for i in range(misses):
        pool.fill(i, dests[i])
    fill_s = time.perf_counter() - t1
    src.close()
    return {"gbps": nbytes / read_s / 1e9, "bytes_per_miss": nbytes / misses,
            "preads_per_miss": preads, "read_ms_per_miss": 1e3 * read_s / misses,
            "fill_ms_per_miss": 1e3 * fill_s / misses,
            "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9}


def expert_files(path: Path) -> list[Path]:
    return sorted((path / "experts").glob("*.bin")) or sorted(path.glob("*.safetensors"))


def child(kind: str, path: Path, arg: str, a) -> dict:
    drop_page_cache(expert_files(path))
    cmd = [sys.executable, __file__, f"--{kind}", f"{path}:{arg}", "--tokens", str(a.tokens),
           "--misses", str(a.misses), "--threads", str(a.threads)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode:
        sys.exit(f"{kind} {path} {arg} failed:\n{proc.stderr}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def median(xs: list[float]) -> float:
    return float(np.median(xs)) if xs else float("nan")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--workdir", default="/tmp/kimi-bench-cache")
    ap.add_argument("--experts", type=int, default=32)
    ap.add_argument("--layers", type=int, default=4, help="total layers (first is dense)")
    ap.add_argument("--tokens", type=int, default=6)
    ap.add_argument("--budgets", default="25,50", help="shares of the experts, in percent")
    ap.add_argument("--skews", default="0,2", help="router skews (0 = uniform)")
    ap.add_argument("--source", default="release,pack", help="release, pack or both")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--misses", type=int, default=48, help="per miss-path run (0: skip them)")
    ap.add_argument("--threads", type=int, default=4)
    ap.add_argument("--no-decode", action="store_true")
    ap.add_argument("--json", default=None)
    ap.add_argument("--one", default=None, help=argparse.SUPPRESS)  # internal: path:pct
    ap.add_argument("--read", default=None, help=argparse.SUPPRESS)  # internal: path:seed
    a = ap.parse_args()
    if a.one or a.read:
        path, arg = (a.one or a.read).rsplit(":", 1)
        if a.read:
            print(json.dumps(miss_throughput(Path(path), a.misses, a.threads, int(arg))))
            return
        args = open_checkpoint(path, with_experts=False).args
        prompt = np.random.default_rng(0).integers(0, args.vocab_size - 256, size=16).tolist()
        print(json.dumps(decode(Path(path), int(arg), a.tokens, prompt)))
        return
    sources = [s.strip() for s in a.source.split(",")]
    work = Path(a.workdir)
    work.mkdir(parents=True, exist_ok=True)
    dirs: dict[float, dict[str, Path]] = {}
    for skew in [float(x) for x in a.skews.split(",")]:
        src = work / f"io-e{a.experts}-l{a.layers}-s{skew}"
        pack = work / (src.name + "-pack")
        if not (src / "config.json").exists():
            print(f"writing synthetic checkpoint {src} ...", file=sys.stderr, flush=True)
            write_checkpoint(src, "io", 0, n_routed_experts=a.experts,
                             num_hidden_layers=a.layers, router_skew=skew)
        if "pack" in sources and not (pack / "pack.json").exists():
            print(f"converting {src} ...", file=sys.stderr, flush=True)
            convert(src, pack)
        dirs[skew] = {"release": src, "pack": pack}
    args = open_checkpoint(next(iter(dirs.values()))["release"], with_experts=False).args
    moe = sum(args.is_moe_layer(i) for i in range(args.num_hidden_layers))
    print(f"MLX {mx.__version__} on {mx.default_device()}; {moe} MoE layers x "
          f"{args.n_routed_experts} experts of {slot_nbytes(args, default_dtype()) / 1e6:.1f} MB "
          f"in a slot; load average {os.getloadavg()[0]:.2f} (shared machine)", flush=True)
    report: dict = {"disk_read_gbps": {}, "misses": {}, "decode": {}}
    first = next(iter(dirs.values()))
    for rep in range(a.repeats if a.misses else 0):  # interleave: load hits both alike
        order = sources if rep % 2 == 0 else sources[::-1]
        for s in order:
            drop_page_cache(expert_files(first[s]))
            report["disk_read_gbps"].setdefault(s, []).append(raw_read_gbps(expert_files(first[s])))
            r = child("read", first[s], str(rep), a)
            report["misses"].setdefault(s, []).append(r)
    for s in sources if a.misses else []:
        runs = report["misses"][s]
        each = ", ".join(f"{r['gbps']:.2f}" for r in runs)
        print(f"miss path, {s:7s}: {median([r['gbps'] for r in runs]):.2f} GB/s "
              f"(runs {each}), "
              f"{runs[0]['preads_per_miss']:.2f} preads/miss, read "
              f"{median([r['read_ms_per_miss'] for r in runs]):.1f} ms/miss, slot finish "
              f"{median([r['fill_ms_per_miss'] for r in runs]):.1f} ms/miss; raw sequential "
              f"{median(report['disk_read_gbps'][s]):.2f} GB/s", flush=True)
    if a.no_decode:
        budgets = []
    else:
        budgets = [int(p) for p in a.budgets.split(",")]
    for skew, paths in dirs.items():
        for pct in budgets:
            key = f"skew {skew} / {pct}%"
            for rep in range(a.repeats):
                order = sources if rep % 2 == 0 else sources[::-1]
                for s in order:
                    r = child("one", paths[s], str(pct), a)
                    report["decode"].setdefault(key, {}).setdefault(s, []).append(r)
            row = report["decode"][key]
            toks = {tuple(r["tokens"]) for s in sources for r in row[s]}
            cells = []
            for s in sources:
                rs = row[s]
                cells.append(f"{s}: {median([r['decode_tps'] for r in rs]):.3f} tok/s, stall "
                             f"{median([r.get('stall_ms_per_token', 0) for r in rs]):.0f} "
                             f"ms/tok, hit "
                             f"{median([r.get('hit_rate', 1) for r in rs]):.1%}, "
                             f"{median([r.get('gb_read_per_token', 0) for r in rs]):.3f} GB/tok, "
                             f"{median([r.get('read_gbps', 0) for r in rs]):.2f} GB/s, RSS "
                             f"{max(r['peak_rss_gb'] for r in rs):.2f} GB")
            print(f"{key:16s} " + " | ".join(cells) + f" | identical tokens: {len(toks) == 1}",
                  flush=True)
    if a.json:
        Path(a.json).write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
