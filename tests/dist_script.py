"""Run by tests/test_distributed.py, alone or as every rank under mlx.launch: greedy tokens and
the prompt's final logits as one JSON line on stdout (rank 0 only; the other ranks follow).

argv: CHECKPOINT PROMPT_IDS(comma-separated) N_TOKENS [EXPERT_CACHE_ON_RANK:SPEC]
"""

from __future__ import annotations

import json
import os
import sys

import mlx.core as mx

from kimi_cli.engine import Engine, SamplingSettings
from kimi_cli.loader import load


def main() -> None:
    path, ids, n = sys.argv[1], [int(x) for x in sys.argv[2].split(",")], int(sys.argv[3])
    cache = None
    if len(sys.argv) > 4:  # an expert cache on one rank only, e.g. "1:40%experts"
        rank, spec = sys.argv[4].split(":", 1)
        cache = spec if os.environ.get("MLX_RANK", "0") == rank else "off"
    model, tok = load(path, expert_cache=cache)
    c = model.make_cache()
    logits = model(mx.array(ids)[None], cache=c)[:, -1, :].astype(mx.float32)
    engine = Engine(model, tok)
    tokens = [ev.id for ev in engine.generate(ids, SamplingSettings(temperature=0, max_tokens=n),
                                              stop_ids=set())
              if hasattr(ev, "id")]
    streamed = model.expert_cache is not None
    sys.stdout.write(json.dumps({"tokens": tokens, "logits": logits[0].tolist(),
                                 "rank0_streams": streamed}) + "\n")


if __name__ == "__main__":
    main()
