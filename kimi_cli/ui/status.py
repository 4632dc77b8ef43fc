"""The status line after each chat turn, and the longer /stats and /context reports."""

from __future__ import annotations

from .. import config


def kilo(n: int) -> str:
    """Token counts the way context sizes are quoted: 262144 -> 256K, 1536 -> 1.5K."""
    if n < 1024:
        return str(n)
    k = n / 1024
    return f"{k:.1f}K".replace(".0K", "K") if k < 100 else f"{k:.0f}K"


def expert_delta(before: dict | None, after: dict | None) -> dict | None:
    """Expert-cache hits and misses of one turn, from two `stats.to_dict()` snapshots."""
    if after is None:
        return None
    hits = after.get("hits", 0) - (before or {}).get("hits", 0)
    misses = after.get("misses", 0) - (before or {}).get("misses", 0)
    n = hits + misses
    return {"hits": hits, "misses": misses, "hit_rate": hits / n if n else 1.0}


def status_line(stats, context_tokens: int, experts: dict | None = None) -> str:
    """`context 1.2K/256K · 1,236 prompt tok (1,024 reused) · prefill 812 tok/s · decode 34.1
    tok/s · experts 93% hit`: the context used, the prompt and how much of it the KV cache
    already held, the two speeds, and the expert cache when it is on."""
    parts = [f"context {kilo(context_tokens)}/{kilo(config.CONTEXT_LENGTH)}",
             f"{stats.prompt_tokens:,} prompt tok ({stats.reused_tokens:,} reused)",
             f"prefill {stats.prompt_tps:,.0f} tok/s",
             f"decode {stats.generation_tps:,.1f} tok/s"]
    if experts is not None:
        parts.append(f"experts {experts['hit_rate']:.0%} hit")
    return " · ".join(parts)
