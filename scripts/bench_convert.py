"""Benchmark `kimi convert` against a plain sequential read + write of the same bytes, same disk.

Usage: python scripts/bench_convert.py [--model DIR | --preset io --experts N --layers N]
           [--workdir DIR] [--keep]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from kimi_cli.checkpoint.reader import open_checkpoint
from kimi_cli.checkpoint.synthetic import PRESETS
from kimi_cli.experts.convert import PIECE_BYTES, convert, measure_copy_throughput, peak_rss
from kimi_cli.experts.pack import open_pack


def _drop_page_cache(paths: list[Path]) -> None:
    """Make the conversion read from the disk, as the baseline does (Linux; no-op elsewhere)."""
    if not hasattr(os, "posix_fadvise"):
        return
    os.sync()
    for p in paths:
        fd = os.open(p, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, help="an existing release-format checkpoint")
    parser.add_argument("--preset", choices=sorted(PRESETS), default="io")
    parser.add_argument("--experts", type=int, default=16, help="n_routed_experts")
    parser.add_argument("--layers", type=int, help="num_hidden_layers (default: the preset's)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workdir", type=Path, default=Path("/work/tmp-bench"),
                        help="where the checkpoint, pack and copy test go (same disk)")
    parser.add_argument("--keep", action="store_true", help="keep the generated files")
    args = parser.parse_args(argv)

    work = args.workdir
    work.mkdir(parents=True, exist_ok=True)
    made = None
    if args.model:
        src = args.model
    else:
        made = src = work / f"ckpt-{args.preset}"
        cmd = [sys.executable, str(Path(__file__).with_name("make_checkpoint.py")), str(src),
               "--preset", args.preset, "--seed", str(args.seed), "--experts", str(args.experts)]
        if args.layers is not None:
            cmd += ["--layers", str(args.layers)]
        print(f"generating a synthetic checkpoint: {' '.join(cmd[1:])}\n"
              "  (in a child process, so its memory does not count in our peak RSS; "
              "this takes a while) ...", file=sys.stderr, flush=True)
        t = time.monotonic()
        subprocess.run(cmd, check=True, stdout=sys.stderr)
        print(f"  generated in {time.monotonic() - t:.0f} s", file=sys.stderr, flush=True)

    ckpt = open_checkpoint(src)
    experts = sum(t.nbytes for t in ckpt.tensors.values() if ".mlp.experts." in t.name)
    dst = work / "pack"
    if dst.exists():
        shutil.rmtree(dst)
    rss_before = peak_rss()

    last = [0.0]

    def progress(done: int, total: int, elapsed: float) -> None:
        if elapsed - last[0] >= 2 or done == total:
            last[0] = elapsed
            print(f"  convert {done / 1e9:.2f}/{total / 1e9:.2f} GB, {elapsed:.1f} s",
                  file=sys.stderr, flush=True)

    nbytes = ckpt.total_bytes() - sum(t.nbytes for t in ckpt.tensors.values()
                                      if t.name.endswith("weight_shape"))

    def baseline() -> float:
        print(f"plain sequential read+write of {nbytes / 1e9:.2f} GB in {work} ...",
              file=sys.stderr, flush=True)
        bps = measure_copy_throughput(work, nbytes)
        print(f"  {bps / 1e6:.0f} MB/s", file=sys.stderr, flush=True)
        return bps

    # Shared disks drift: measure the baseline before and after the conversion.
    try:
        copy_before = baseline()
        _drop_page_cache(ckpt.files)
        print("converting ...", file=sys.stderr, flush=True)
        result = convert(src, dst, progress)
        t = time.monotonic()
        with open_pack(dst) as pack:
            pack.verify()
        verify_s = time.monotonic() - t
        copy_after = baseline()
    finally:
        if not args.keep:
            shutil.rmtree(dst, ignore_errors=True)
            if made is not None:
                shutil.rmtree(made, ignore_errors=True)

    copy_bps = (copy_before + copy_after) / 2
    report = {
        "checkpoint": str(src),
        "tensor_bytes": result.bytes_total,
        "expert_bytes": experts,
        "shards": len(result.shards_converted),
        "convert_seconds": round(result.seconds, 2),
        "convert_mb_s": round(result.throughput / 1e6, 1),
        "copy_mb_s": round(copy_bps / 1e6, 1),
        "copy_mb_s_before_after": [round(copy_before / 1e6, 1), round(copy_after / 1e6, 1)],
        "ratio": round(result.throughput / copy_bps, 3),
        "verify_seconds": round(verify_s, 2),
        "piece_bytes": PIECE_BYTES,
        "peak_rss_mb": round(result.peak_rss / 1e6, 1),
        "peak_rss_before_convert_mb": round(rss_before / 1e6, 1),
    }
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
