"""Which rank runs which layers, and which tensors (so which shards) a block of layers needs.

The one split rule: the loader of each rank and `kimi download --rank I/N` both use it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from ..errors import UsageError

LAYER_RE = re.compile(r"^model\.layers\.(\d+)\.")


@dataclass(frozen=True)
class LayerRange:
    """Layers `start`..`end` (inclusive) of a model with `n_layers` layers."""

    start: int
    end: int
    n_layers: int

    def __str__(self) -> str:
        return f"layers {self.start}-{self.end} of {self.n_layers}"

    @property
    def layers(self) -> range:
        return range(self.start, self.end + 1)

    @property
    def first(self) -> bool:
        return self.start == 0

    @property
    def last(self) -> bool:
        return self.end == self.n_layers - 1

    def holds(self, tensor: str) -> bool:
        """Whether a machine running these layers needs `tensor`.

        The rule: a layer's tensors go with that layer; the embedding with layer 0 (the first
        rank embeds the tokens); the final norm and lm_head with the last layer (the last rank
        produces the logits); tensors of layers past the last (an MTP head) with the last layer.
        """
        m = LAYER_RE.match(tensor)
        if m:
            i = int(m.group(1))
            return self.start <= min(i, self.n_layers - 1) <= self.end
        if tensor.startswith("model.embed_tokens."):
            return self.first
        return self.last  # model.norm, lm_head and anything unforeseen

    def to_dict(self) -> dict:
        return {"start": self.start, "end": self.end}


def ranges(sizes: list[int], n_layers: int) -> list[LayerRange]:
    """Contiguous blocks of `sizes[r]` layers in rank order (rank 0 the first layers)."""
    out, start = [], 0
    for n in sizes:
        out.append(LayerRange(start, start + n - 1, n_layers))
        start += n
    return out


def even_split(world: int, n_layers: int) -> list[int]:
    """Blocks that differ by at most one layer; the low ranks take the extra ones."""
    if world > n_layers:
        raise UsageError(f"{world} ranks for {n_layers} layers; use at most {n_layers}")
    base, extra = divmod(n_layers, world)
    return [base + (1 if r < extra else 0) for r in range(world)]


def proportional_split(memory: list[int], layer_bytes: list[int]) -> list[int]:
    """Layers per rank so that each rank's share of the weights follows its share of memory.

    `layer_bytes[i]` is what layer i costs (with the embedding counted in layer 0 and the final
    norm and lm_head in the last). Each cut goes to the layer boundary nearest the rank's
    cumulative target (on a tie the lower rank takes the layer, as in the even split); every
    rank keeps at least one layer.
    """
    world, n = len(memory), len(layer_bytes)
    if world > n:
        raise UsageError(f"{world} ranks for {n} layers; use at most {n}")
    if any(m <= 0 for m in memory):
        return even_split(world, n)
    total_mem, total = sum(memory), sum(layer_bytes)
    cum = [0]
    for b in layer_bytes:
        cum.append(cum[-1] + b)
    cuts, acc = [0], 0
    for r in range(world - 1):
        acc += memory[r]
        target = total * acc / total_mem
        lo, hi = cuts[-1] + 1, n - (world - 1 - r)  # leave a layer for every later rank
        cuts.append(min(range(lo, hi + 1), key=lambda c: (abs(cum[c] - target), -c)))
    cuts.append(n)
    return [b - a for a, b in zip(cuts, cuts[1:])]


def parse_split(text: str, world: int, n_layers: int) -> list[int] | None:
    """`--split`: None for auto, else the explicit layers per rank (`30,31`)."""
    s = (text or "auto").strip().lower()
    if s == "auto":
        return None
    if not re.fullmatch(r"\d+(\s*,\s*\d+)*", s):
        raise UsageError(f"--split: expected auto or layers per rank (e.g. 30,31), got {text!r}")
    sizes = [int(x) for x in s.split(",")]
    if len(sizes) != world:
        raise UsageError(f"--split {text}: {len(sizes)} blocks for {world} ranks")
    if any(x < 1 for x in sizes) or sum(sizes) != n_layers:
        raise UsageError(f"--split {text}: every rank needs at least one layer and the blocks "
                         f"must add up to the model's {n_layers} layers")
    return sizes


def parse_rank(text: str) -> tuple[int, int]:
    """`--rank I/N`: machine I (0-based) of N."""
    m = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", text)
    if not m:
        raise UsageError(f"--rank: expected I/N (e.g. 0/2), got {text!r}")
    rank, world = int(m.group(1)), int(m.group(2))
    if world < 1 or rank >= world:
        raise UsageError(f"--rank {text}: I must be in 0..N-1")
    return rank, world


def rank_layers(rank: int, world: int, n_layers: int, split: str | None = None) -> LayerRange:
    """Rank I of N's block: `split` (`--split`) when given, else the even split."""
    sizes = parse_split(split, world, n_layers) if split else None
    try:
        return ranges(sizes or even_split(world, n_layers), n_layers)[rank]
    except UsageError as e:
        raise UsageError(f"--rank: {e}") from None
