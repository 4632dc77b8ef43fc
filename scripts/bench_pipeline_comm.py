"""Per-message and per-token communication cost of the layer pipeline over mx.distributed.

Run as every rank of a group: `mlx.launch -n 2 --backend ring -- python
scripts/bench_pipeline_comm.py`. Rank 0 prints the one-way time (half a ping-pong; median and 10th
percentile) of the messages a decode token sends: the int32 header, the hidden state, the last
rank's logits row.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import mlx.core as mx

from kimi_cli.distributed.pipeline import HEADER


def one_way(group, shape, dtype, repeats: int) -> tuple[float, float]:
    """Seconds for one message of `shape`/`dtype` from rank 0 to rank 1 (ping-pong / 2): the
    median and the 10th percentile (what the link does when the cores are free)."""
    x = mx.zeros(shape, dtype=dtype)
    mx.eval(x)
    times = []
    for i in range(repeats + 3):
        t0 = time.perf_counter()
        if group.rank() == 0:
            mx.eval(mx.distributed.send(x, 1, group=group))
            mx.eval(mx.distributed.recv_like(x, 1, group=group))
        else:
            y = mx.distributed.recv_like(x, 0, group=group)
            mx.eval(y)
            mx.eval(mx.distributed.send(y, 0, group=group))
        if i >= 3:  # warm-up
            times.append((time.perf_counter() - t0) / 2)
    return statistics.median(times), statistics.quantiles(times, n=10)[0]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--hidden", type=int, default=7168, help="hidden size (the release: 7168)")
    ap.add_argument("--vocab", type=int, default=163840, help="vocabulary (the release: 163840)")
    ap.add_argument("--repeats", type=int, default=200)
    args = ap.parse_args()
    group = mx.distributed.init(strict=True)
    msgs = {
        "header (int32)": ((HEADER,), mx.int32),
        "hidden state (bf16)": ((1, 1, args.hidden), mx.bfloat16),
        "hidden state (f32)": ((1, 1, args.hidden), mx.float32),
        "logits row (bf16)": ((1, args.vocab), mx.bfloat16),
        "logits row (f32)": ((1, args.vocab), mx.float32),
    }
    out = {}
    for name, (shape, dtype) in msgs.items():
        median, p10 = one_way(group, shape, dtype, args.repeats)
        n = dtype.size
        for d in shape:
            n *= d
        out[name] = {"bytes": n, "one_way_ms": 1e3 * median, "one_way_ms_p10": 1e3 * p10}
    if group.rank() == 0:
        for name, v in out.items():
            print(f"{name:22s} {v['bytes']:>8d} B  one way {v['one_way_ms']:.3f} ms median, "
                  f"{v['one_way_ms_p10']:.3f} ms 10th percentile")
        print(json.dumps(out))


if __name__ == "__main__":
    main()
