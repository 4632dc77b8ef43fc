"""Peak memory, max RSS, KV-cache bytes and prefill time of long prompts through `Engine`.

Chunked prefill (config.PREFILL_CHUNK) at each length, plus one unchunked prefill for contrast.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import mlx.core as mx
import numpy as np

from kimi_cli import config

GB = 1e9
MB = 1e6


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def max_rss_bytes() -> int:
    # Linux reports ru_maxrss in KiB, macOS in bytes.
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss if sys.platform == "darwin" else rss * 1024


# ---------------------------------------------------------------------------------------------
# One measurement, in its own process: ru_maxrss is a high-water mark for the whole process,
# so each length gets a fresh one to have a max RSS of its own.


def measure(ckpt: Path, length: int, chunk: int, label: str) -> dict:
    import kimi_cli
    from kimi_cli.engine import Done, Engine, PrefillProgress, SamplingSettings

    t = time.perf_counter()
    model, tokenizer = kimi_cli.load(ckpt)
    load_s = time.perf_counter() - t
    weights = mx.get_active_memory()
    rss_after_load = max_rss_bytes()

    ids = np.random.default_rng(0).integers(0, model.args.vocab_size, size=length).tolist()
    engine = Engine(model, tokenizer, prefill_chunk=chunk)
    settings = SamplingSettings(temperature=0.0, max_tokens=1)
    n_chunks = -(-length // chunk)
    every = max(1, n_chunks // 16)
    mx.reset_peak_memory()  # Engine.generate resets it too; this keeps the contract explicit
    t0 = last = time.perf_counter()
    done = None
    chunk_s: list[float] = []
    for i, ev in enumerate(engine.generate(ids, settings, stop_ids=set()), start=1):
        if isinstance(ev, PrefillProgress):
            now = time.perf_counter()
            chunk_s.append(now - last)
            if i % every == 0 or ev.processed == ev.total:
                log(f"  [{label}] {ev.processed}/{ev.total} tokens, {now - t0:.1f} s, "
                    f"{ev.processed / (now - t0):.0f} tok/s, last chunk {now - last:.2f} s, "
                    f"peak {mx.get_peak_memory() / GB:.3f} GB")
            last = now
        elif isinstance(ev, Done):
            done = ev
    total_s = time.perf_counter() - t0
    stats = done.stats
    return {
        "label": label,
        "length": length,
        "chunk": chunk,
        "chunks": n_chunks,
        "load_s": load_s,
        "prefill_s": stats.prompt_time,
        "prefill_tps": stats.prompt_tps,
        "total_s": total_s,
        "weights_bytes": weights,
        "peak_bytes": mx.get_peak_memory(),
        "engine_peak_gb": stats.peak_memory_gb,
        "max_rss_after_load_bytes": rss_after_load,
        "max_rss_bytes": max_rss_bytes(),
        "kv_cache_bytes": sum(c.nbytes for c in engine.cache),
        "kv_buffer_bytes": sum(c.latent.nbytes for c in engine.cache if c.latent is not None),
        "cached_tokens": engine.cache[0].offset,
        "chunk_s": chunk_s,
    }


def run_child(ckpt: Path, length: int, chunk: int, label: str) -> dict:
    with tempfile.NamedTemporaryFile(suffix=".json") as out:
        cmd = [sys.executable, __file__, "--child-ckpt", str(ckpt), "--child-out", out.name,
               "--lengths", str(length), "--chunk", str(chunk), "--child-label", label]
        subprocess.run(cmd, check=True)
        return json.loads(Path(out.name).read_text())


def estimate_prefill_s(rows: list[dict], length: int, chunk: int) -> float | None:
    """Predict a chunked prefill's time from the longest measured run with the same chunk.

    A chunk costs a + b * (keys it attends to): fit on that run's chunks, sum over the new run's.
    """
    runs = [r for r in rows if r["chunk"] == chunk and len(r["chunk_s"]) >= 3]
    if not runs:
        return None
    r = max(runs, key=lambda r: r["length"])
    keys = [min((i + 1) * chunk, r["length"]) for i in range(len(r["chunk_s"]))]
    # The first chunk also pays one-time warm-up; leave it out of the fit.
    b, a = np.polyfit(keys[1:], r["chunk_s"][1:], 1)
    return sum(a + b * min((i + 1) * chunk, length) for i in range(-(-length // chunk)))


# ---------------------------------------------------------------------------------------------


def table(rows: list[dict]) -> str:
    lines = [
        "| run | tokens | chunk | prefill s | prefill tok/s | MLX peak MB | peak - weights MB "
        "| max RSS MB | KV cache MB | KV buffer MB | wall s |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['label']} | {r['length']} | {r['chunk']} | {r['prefill_s']:.1f} | "
            f"{r['prefill_tps']:.0f} | {r['peak_bytes'] / MB:.0f} | "
            f"{(r['peak_bytes'] - r['weights_bytes']) / MB:.0f} | {r['max_rss_bytes'] / MB:.0f} | "
            f"{r['kv_cache_bytes'] / MB:.2f} | {r['kv_buffer_bytes'] / MB:.2f} | "
            f"{r['total_s']:.1f} |"
        )
    return "\n".join(lines)


def parse_lengths(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError("lengths must be >= 1")
    return values


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", type=parse_lengths, default=[2048, 8192, 32768],
                        metavar="N[,N...]", help="prompt lengths (default 2048,8192,32768)")
    parser.add_argument("--preset", default="small", help="synthetic checkpoint preset")
    parser.add_argument("--seed", type=int, default=1, help="synthetic checkpoint seed")
    parser.add_argument("--model", type=Path, help="use this checkpoint instead of a synthetic one")
    parser.add_argument("--chunk", type=int, default=config.PREFILL_CHUNK,
                        help=f"prefill chunk (default {config.PREFILL_CHUNK})")
    parser.add_argument("--unchunked", type=int, default=2048, metavar="N",
                        help="also prefill N tokens in one forward for contrast (0: skip)")
    parser.add_argument("--max-minutes", type=float, metavar="M",
                        help="skip a length whose prefill is predicted (from the runs before it) "
                             "to take longer than M minutes (default: run everything)")
    parser.add_argument("--predict", type=parse_lengths, default=[], metavar="N[,N...]",
                        help="only predict these lengths' chunked prefill time from the runs")
    parser.add_argument("--json", type=Path, metavar="OUT", help="write the rows as JSON")
    parser.add_argument("--child-ckpt", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--child-out", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--child-label", default="", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.chunk < 1 or args.unchunked < 0:
        parser.error("--chunk must be >= 1 and --unchunked >= 0")

    if args.child_ckpt is not None:
        row = measure(args.child_ckpt, args.lengths[0], args.chunk, args.child_label)
        args.child_out.write_text(json.dumps(row))
        return 0

    sys.stdout.reconfigure(line_buffering=True)
    print(f"MLX {mx.__version__}, device {mx.default_device()}")
    with tempfile.TemporaryDirectory(prefix="kimi-prefill-mem-") as tmp:
        if args.model is not None:
            ckpt = args.model
            if not (ckpt / "config.json").is_file():
                parser.error(f"--model {ckpt}: no config.json there")
        else:
            from kimi_cli.checkpoint.synthetic import write_checkpoint

            log(f"building synthetic checkpoint preset={args.preset} seed={args.seed} ...")
            try:
                ckpt = write_checkpoint(Path(tmp) / args.preset, args.preset, args.seed)
            except ValueError as e:
                parser.error(f"--preset: {e}")
        print(f"checkpoint: {args.model or f'synthetic {args.preset} (seed {args.seed})'}")

        plan = [(n, args.chunk, f"chunked {n}") for n in args.lengths]
        if args.unchunked:
            plan.append((args.unchunked, args.unchunked, f"one forward {args.unchunked}"))
        plan += [(n, args.chunk, f"predict chunked {n}") for n in args.predict]
        rows = []
        t_all = time.perf_counter()
        skipped = []
        for n, chunk, label in plan:
            guess = estimate_prefill_s(rows, n, chunk)
            if guess is not None:
                log(f"{label}: predicted prefill {guess:.0f} s ({guess / 60:.1f} min)")
                if label.startswith("predict"):
                    skipped.append((label, guess))
                    continue
                if args.max_minutes is not None and guess > 60 * args.max_minutes:
                    skipped.append((label, guess))
                    log(f"{label}: skipped (over --max-minutes {args.max_minutes:g})")
                    continue
            log(f"{label}: prefill {n} tokens in chunks of {chunk}, then 1 token ...")
            t = time.perf_counter()
            try:
                rows.append(run_child(ckpt, n, chunk, label))
            except subprocess.CalledProcessError as e:
                print(f"{label}: failed (exit {e.returncode})")
                continue
            log(f"{label}: done in {time.perf_counter() - t:.1f} s")
    print()
    print(table(rows))
    if rows:
        r0 = rows[0]
        print(f"\nweights resident (MLX active after load): {r0['weights_bytes'] / MB:.0f} MB; "
              f"max RSS after load: {r0['max_rss_after_load_bytes'] / MB:.0f} MB; "
              f"total {time.perf_counter() - t_all:.0f} s")
    for label, guess in skipped:
        print(f"{label}: not run; predicted prefill {guess:.0f} s ({guess / 60:.1f} min) "
              f"from the per-chunk times of the longest run (a + b * keys per chunk)")
    print("MLX peak: mx.get_peak_memory() over prefill + 1 token; max RSS: getrusage ru_maxrss "
          "of a fresh process per row (includes loading); KV cache: filled tokens, KV buffer: "
          "allocated")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))
        log(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
