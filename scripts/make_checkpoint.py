"""Write a synthetic checkpoint in the release's exact format (random weights) to a directory.

Usage: python scripts/make_checkpoint.py OUT --preset tiny --seed 0 [--experts N --layers N ...]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from kimi_cli.checkpoint.synthetic import PRESETS, write_checkpoint


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path, help="directory to write (replaced if it exists)")
    parser.add_argument("--preset", choices=sorted(PRESETS), default="tiny")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--experts", type=int, help="n_routed_experts")
    parser.add_argument("--layers", type=int, help="num_hidden_layers")
    parser.add_argument("--router-skew", type=float,
                        help="router bias making a few experts popular (0: uniform)")
    parser.add_argument("--shard-bytes", type=int,
                        help="shard size limit (small values split experts across shards)")
    args = parser.parse_args(argv)

    overrides = {}
    if args.experts is not None:
        overrides["n_routed_experts"] = args.experts
    if args.layers is not None:
        overrides["num_hidden_layers"] = args.layers
    if args.router_skew is not None:
        overrides["router_skew"] = args.router_skew
    if args.shard_bytes is not None:
        overrides["shard_bytes"] = args.shard_bytes
    try:
        path = write_checkpoint(args.out, args.preset, args.seed, **overrides)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2

    from kimi_cli.checkpoint.reader import open_checkpoint

    ckpt = open_checkpoint(path)
    total = sum(f.stat().st_size for f in path.iterdir() if f.is_file())
    experts = sum(t.nbytes for t in ckpt.tensors.values() if ".mlp.experts." in t.name)
    print(path)
    print(f"total bytes: {total} ({total / 1e6:.1f} MB)")
    print(f"expert bytes: {experts} ({experts / 1e6:.1f} MB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
