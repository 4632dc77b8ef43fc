"""A scripted test double at the model boundary: replays fixed outputs through the real pipeline.

`--model scripted:FILE` — FILE is a JSON list of outputs, one per generation (model call), each the
raw text the model would emit with its special tokens (`<think>`, tool-call markers,
`<|im_end|>`). The text is tokenized with the real tokenizer and forced token by token through
logits, so the engine, the parser and the UI run exactly as with the network.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import mlx.core as mx

from ..errors import KimiError
from .cache import LatentCache

PREFIX = "scripted:"
FORCED_LOGIT = 1e4  # so far above the rest that any sampler (temperature, top-p...) picks it


class ScriptedCache(LatentCache):
    """Tracks positions only (offset, trim, as the latent cache does) so prefix reuse works."""

    def update_and_fetch(self, latent: mx.array) -> mx.array:  # pragma: no cover - unused
        raise NotImplementedError("the scripted model has no attention")

    def empty(self) -> bool:
        return self.offset == 0

    @property
    def state(self):
        return []

    @property
    def nbytes(self) -> int:
        return 0

    @staticmethod
    def batched(caches: list[ScriptedCache]) -> BatchScriptedCache:
        return BatchScriptedCache([c.offset for c in caches],
                                  [list(getattr(c, "queue", [])) for c in caches])


class BatchScriptedCache:
    """The batch form: per row its position and the rest of its own scripted output."""

    def __init__(self, lengths: list[int], queues: list[list[int]]):
        self.lengths = lengths
        self.queues = queues

    def filter(self, keep: list[int]) -> None:
        self.lengths = [self.lengths[i] for i in keep]
        self.queues = [self.queues[i] for i in keep]

    def extend(self, *others: BatchScriptedCache) -> None:
        for other in others:
            self.lengths += other.lengths
            self.queues += other.queues

    @property
    def state(self):
        return []


class ScriptedModel:
    """Follows the model protocol; each generation emits the next scripted output."""

    def __init__(self, outputs: list[str], tokenizer, tokens_per_second: float = 0.0,
                 source: str = "scripted"):
        self.outputs = outputs
        self.tokenizer = tokenizer
        self.vocab_size = tokenizer.vocab_size
        self.delay = 1.0 / tokens_per_second if tokens_per_second > 0 else 0.0
        self.source = source
        self.calls = 0  # generations started
        self.expert_cache = None
        self.layers: list = []
        self._queue: list[int] = []
        self._prompt_tokens: int | None = None
        self._rows: dict[int, mx.array] = {}  # forced logits, by token id

    def make_cache(self) -> list[ScriptedCache]:
        return [ScriptedCache()]

    def begin_generation(self, prompt_tokens: int | None = None) -> None:
        """Called by the engine before each prefill: the next output becomes current.

        `prompt_tokens` (the prompt's length) lets prefill chunks before the last one leave the
        script alone: only the last chunk's logits are sampled.
        """
        if self.calls >= len(self.outputs):
            raise KimiError(f"{self.source}: the script has {len(self.outputs)} outputs and "
                            f"generation {self.calls + 1} asked for another")
        text = self.outputs[self.calls]
        self.calls += 1
        ids = self.tokenizer.encode(text)
        if not ids or ids[-1] not in self.tokenizer.stop_ids:
            ids.append(self.tokenizer.im_end_id)  # a script ends its turn unless it says so
        self._queue = ids
        self._prompt_tokens = prompt_tokens

    def _forced(self, nxt: int) -> mx.array:
        row = self._rows.get(nxt)
        if row is None:
            row = self._rows[nxt] = mx.zeros((self.vocab_size,)).at[nxt].add(FORCED_LOGIT)
        return row

    def _batch_step(self, cache: BatchScriptedCache) -> mx.array:
        """One decode step of a batch: each row emits the next token of its own output."""
        if self.delay:
            time.sleep(self.delay)
        rows = []
        for i, q in enumerate(cache.queues):
            cache.lengths[i] += 1
            rows.append(self._forced(q.pop(0) if q else self.tokenizer.im_end_id))
        return mx.stack(rows)[:, None]

    def __call__(self, ids: mx.array, cache: list | None = None) -> mx.array:
        B, L = ids.shape
        if cache and isinstance(cache[0], BatchScriptedCache):
            return self._batch_step(cache[0])
        if cache:
            cache[0].offset += L
            cache[0].queue = self._queue  # this sequence's output, should it join a batch
        logits = mx.zeros((B, L, self.vocab_size))
        if cache and self._prompt_tokens is not None and cache[0].offset < self._prompt_tokens:
            return logits  # an earlier prefill chunk: nobody samples its logits
        nxt = self._queue.pop(0) if self._queue else self.tokenizer.im_end_id
        if self.delay and L == 1:
            time.sleep(self.delay)
        row = self._forced(nxt)
        if B == 1 and L == 1:
            return row[None, None]
        return mx.concatenate([logits[:, :-1], mx.broadcast_to(row, (B, 1, self.vocab_size))],
                              axis=1)


def load_scripted(spec: str, tokenizer, tokens_per_second: float = 0.0) -> ScriptedModel:
    """`scripted:FILE[@RATE]`: RATE tokens/s (0 or absent: as fast as possible)."""
    body = spec[len(PREFIX):]
    rate = tokens_per_second
    if "@" in body:
        body, r = body.rsplit("@", 1)
        try:
            rate = float(r)
        except ValueError:
            raise KimiError(f"{spec}: bad rate {r!r} (use scripted:FILE@TOKENS_PER_SECOND)"
                            ) from None
    path = Path(body).expanduser()
    try:
        outputs = json.loads(path.read_text())
    except FileNotFoundError:
        raise KimiError(f"{path}: no such script file") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise KimiError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(outputs, list) or not all(isinstance(o, str) for o in outputs):
        raise KimiError(f"{path}: expected a JSON list of strings (one output per model call)")
    return ScriptedModel(outputs, tokenizer, rate, source=str(path))
