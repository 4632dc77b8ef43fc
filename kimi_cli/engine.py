"""Generation: chunked prefill, decode, sampling, stop tokens and prompt (KV) cache reuse.

`Engine.generate(prompt_ids, settings)` yields events (prefill progress, tokens, done with
timings). Between calls the KV cache keeps the longest common token prefix, so a follow-up turn
processes only its new tokens.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field

import mlx.core as mx

from . import config


@dataclass
class SamplingSettings:
    temperature: float = config.DEFAULT_TEMPERATURE
    top_p: float = config.DEFAULT_TOP_P
    min_p: float = config.DEFAULT_MIN_P
    top_k: int = config.DEFAULT_TOP_K
    max_tokens: int = config.DEFAULT_MAX_TOKENS
    seed: int | None = None

    def validate(self) -> None:
        from .errors import UsageError

        if self.temperature < 0:
            raise UsageError("--temperature must be >= 0")
        if not 0 < self.top_p <= 1:
            raise UsageError("--top-p must be in (0, 1]")
        if not 0 <= self.min_p < 1:
            raise UsageError("--min-p must be in [0, 1)")
        if self.top_k < 0:
            raise UsageError("--top-k must be >= 0")
        if self.max_tokens < 1:
            raise UsageError("--max-tokens must be >= 1")
        if self.seed is not None and not 0 <= self.seed <= config.SEED_MAX:
            raise UsageError(f"--seed must be in 0..{config.SEED_MAX}")


@dataclass
class Stats:
    prompt_tokens: int = 0
    reused_tokens: int = 0  # prompt tokens whose KV came from the previous call
    prefilled_tokens: int = 0  # prompt tokens processed by this call
    generation_tokens: int = 0
    prompt_time: float = 0.0
    generation_time: float = 0.0
    ttft: float = 0.0
    peak_memory_gb: float = 0.0

    @property
    def prompt_tps(self) -> float:
        return self.prefilled_tokens / self.prompt_time if self.prompt_time > 0 else 0.0

    @property
    def generation_tps(self) -> float:
        # Decode speed: tokens after the first over the time after the first (as mlx-lm).
        n = self.generation_tokens - 1
        return n / self.generation_time if self.generation_time > 0 and n > 0 else 0.0

    def to_dict(self) -> dict:
        d = asdict(self)
        d["prompt_tps"] = self.prompt_tps
        d["generation_tps"] = self.generation_tps
        return d


@dataclass
class PrefillProgress:
    processed: int
    total: int


@dataclass
class Token:
    id: int
    text: str  # newly completed text (special tokens by name; never half a UTF-8 character)


@dataclass
class Done:
    finish_reason: str  # "stop", "length" or "interrupted"
    token_ids: list[int] = field(default_factory=list)
    stats: Stats = field(default_factory=Stats)


Event = PrefillProgress | Token | Done


def common_prefix(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


class Engine:
    """Owns the model's KV cache and the token ids it holds."""

    def __init__(self, model, tokenizer, prefill_chunk: int = config.PREFILL_CHUNK):
        self.model = model
        self.tokenizer = tokenizer
        self.prefill_chunk = prefill_chunk
        self.cache = model.make_cache()
        self.cached_ids: list[int] = []

    def reset(self) -> None:
        self.cache = self.model.make_cache()
        self.cached_ids = []

    def _trim_to(self, n: int) -> None:
        for c in self.cache:
            c.trim(c.offset - n)
        self.cached_ids = self.cached_ids[:n]

    def prefill(self, ids: list[int], stats: Stats) -> Iterator[PrefillProgress | mx.array]:
        """Bring the cache to `ids[:-1]`-plus-last; yields progress, then the last logits."""
        reuse = common_prefix(self.cached_ids, ids)
        reuse = min(reuse, len(ids) - 1)  # the last prompt token must run to get logits
        self._trim_to(reuse)
        stats.prompt_tokens = len(ids)
        stats.reused_tokens = reuse
        todo = ids[reuse:]
        stats.prefilled_tokens = len(todo)
        done = 0
        logits = None
        for start in range(0, len(todo), self.prefill_chunk):
            chunk = todo[start : start + self.prefill_chunk]
            logits = self.model(mx.array(chunk)[None], cache=self.cache)[:, -1, :]
            mx.eval(logits, [c.state for c in self.cache])
            self.cached_ids.extend(chunk)
            done += len(chunk)
            yield PrefillProgress(done, len(todo))
        yield logits

    def generate(self, prompt_ids: list[int], settings: SamplingSettings | None = None,
                 stop_ids: set[int] | None = None) -> Iterator[Event]:
        settings = settings or SamplingSettings()
        if not prompt_ids:
            raise ValueError("empty prompt")
        # Imported here: mlx_lm's package import pulls in transformers (~2 s), which a usage
        # error or --print-prompt should not pay for.
        from mlx_lm.sample_utils import make_sampler

        stop = self.tokenizer.stop_ids if stop_ids is None else stop_ids
        sampler = make_sampler(
            temp=settings.temperature,
            top_p=settings.top_p if settings.top_p < 1 else 0.0,
            min_p=settings.min_p,
            top_k=settings.top_k,
        )
        if settings.seed is not None:
            mx.random.seed(settings.seed)
        begin = getattr(self.model, "begin_generation", None)
        if begin is not None:  # the scripted test double starts its next output
            begin(len(prompt_ids))
        mx.reset_peak_memory()
        stats = Stats()
        t0 = time.perf_counter()
        logits = None
        for item in self.prefill(prompt_ids, stats):
            if isinstance(item, PrefillProgress):
                yield item
            else:
                logits = item

        def sample(lg: mx.array) -> mx.array:
            lg = lg.astype(mx.float32)
            return sampler(lg - mx.logsumexp(lg, axis=-1, keepdims=True))

        detok = self.tokenizer.detokenizer()
        y = sample(logits)
        mx.async_eval(y)
        generated: list[int] = []
        finish = "length"
        t_first = None
        try:
            while True:
                # Queue the next step before reading this token, so the host never waits idle.
                need_more = len(generated) + 1 < settings.max_tokens
                if need_more:
                    next_logits = self.model(y[:, None], cache=self.cache)[:, -1, :]
                    next_y = sample(next_logits)
                    mx.async_eval(next_y)
                tok = y.item()
                if t_first is None:
                    t_first = time.perf_counter()
                    stats.prompt_time = t_first - t0
                    stats.ttft = stats.prompt_time
                generated.append(tok)
                if need_more:
                    self.cached_ids.append(tok)
                last = tok in stop or not need_more
                text = "" if tok in stop else detok.add_token(tok)
                if last:
                    text += detok.finalize()
                    finish = "stop" if tok in stop else "length"
                yield Token(tok, text)
                if last:
                    break
                y = next_y
        finally:
            stats.generation_tokens = len(generated)
            stats.generation_time = time.perf_counter() - (t_first or t0)
            self._sync_cache()
        stats.peak_memory_gb = mx.get_peak_memory() / 1e9
        yield Done(finish, generated, stats)

    def _sync_cache(self) -> None:
        """Keep `cached_ids` equal to what the cache holds (a queued step may have run)."""
        offset = self.cache[0].offset if self.cache else 0
        if offset < len(self.cached_ids):
            self.cached_ids = self.cached_ids[:offset]
        elif offset > len(self.cached_ids):
            # The step queued after the last token fed one token we did not record: drop it.
            for c in self.cache:
                c.trim(offset - len(self.cached_ids))
