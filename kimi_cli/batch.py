"""Batched decoding: B sequences advance together, one forward pass per step (continuous batching).

Each sequence is prefilled alone through an `Engine` (chunked, reusing its KV prefix), then joins
the running batch with its own sampler, seed and stop condition; a finished sequence leaves it.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import mlx.core as mx

from . import config
from .engine import Done, Engine, Event, PrefillProgress, SamplingSettings, Stats, Token
from .errors import KimiError

Sampler = Callable[[mx.array], mx.array]  # logits [1, vocab] -> token id [1]


def make_sampler(settings: SamplingSettings) -> tuple[Sampler, int | None]:
    """The engine's sampling (mlx-lm's filters, then a categorical draw) with a random state of
    its own: a sequence seeded with s draws exactly what `Engine.generate` seeded with s draws.
    Returns the sampler and the seed it uses (None at temperature 0)."""
    from mlx_lm.sample_utils import apply_min_p, apply_top_k, apply_top_p

    def logprobs(lg: mx.array) -> mx.array:
        lg = lg.astype(mx.float32)
        return lg - mx.logsumexp(lg, axis=-1, keepdims=True)

    s = settings
    if s.temperature == 0:
        return (lambda lg: mx.argmax(logprobs(lg), axis=-1)), None
    seed = s.seed if s.seed is not None else random.SystemRandom().randrange(config.SEED_MAX)
    # mx.random's global state advances as (state, key) = split(state) per draw: the same here.
    state = [mx.random.key(seed)]
    filters: list[Callable[[mx.array], mx.array]] = []
    if 0 < s.top_p < 1:
        filters.append(lambda x: apply_top_p(x, s.top_p))
    if s.min_p:
        filters.append(lambda x: apply_min_p(x, s.min_p))
    if s.top_k > 0:
        filters.append(lambda x: apply_top_k(x, s.top_k))

    def sample(lg: mx.array) -> mx.array:
        x = logprobs(lg)
        for f in filters:
            x = f(x)
        state[0], key = mx.random.split(state[0])
        return mx.random.categorical(x * (1.0 / s.temperature), key=key)

    return sample, seed


def _kv_room(model, memory: int | None = None):
    """What the KV cache may use: (per-token bytes, free bytes, weights, expert cache, headroom)
    beside the weights and the expert cache, with the automatic expert budget's headroom;
    None for a model without a KV cache (the scripted test double)."""
    from mlx.utils import tree_flatten

    from .experts.cache import _machine_memory

    args = getattr(model, "args", None)
    if args is None:
        return None
    per_token = args.kv_bytes_per_token(model.model.embed_tokens.weight.dtype.size)
    memory = memory or _machine_memory()
    weights = sum(v.nbytes for _, v in tree_flatten(model.parameters()))
    experts = model.expert_cache.stats.resident_bytes if model.expert_cache is not None else 0
    headroom = max(8 << 30, int(0.15 * memory))
    return per_token, max(0, memory - weights - experts - headroom), weights, experts, headroom


def max_batch_context(model, sequences: int, memory: int | None = None) -> int | None:
    """The most tokens each of `sequences` sequences may hold with the KV cache fitting."""
    room = _kv_room(model, memory)
    return None if room is None else room[1] // (sequences * room[0])


def check_batch_fits(model, sequences: int, context: int, memory: int | None = None,
                     remedy: str = "use fewer --trajectories, a lower --max-tokens or a "
                                   "smaller --expert-cache") -> None:
    """Refuse a batch whose KV cache (`sequences` x `context` tokens) cannot fit beside the
    weights and the expert cache, with the headroom the automatic expert budget keeps."""
    from .experts.cache import fmt_bytes

    room = _kv_room(model, memory)
    if room is None:
        return
    per_token, free, weights, experts, headroom = room
    need = sequences * context * per_token
    if need > free:
        raise KimiError(
            f"{sequences} sequences of up to {context:,} tokens need {fmt_bytes(need)} of KV "
            f"cache ({fmt_bytes(per_token)} per token); "
            f"{fmt_bytes(free)} is free beside the weights ({fmt_bytes(weights)}), the expert "
            f"cache ({fmt_bytes(experts)}) and {fmt_bytes(headroom)} of headroom: {remedy}")


@dataclass
class Sequence:
    uid: int
    settings: SamplingSettings
    stop: set[int]
    sample: Sampler
    seed: int | None
    detok: object
    stats: Stats
    t0: float
    t_first: float = 0.0
    token_ids: list[int] = field(default_factory=list)
    cache: list | None = None  # a batch-of-one cache until the sequence joins the batch
    prompt_ids: list[int] = field(default_factory=list)


class BatchDecoder:
    """A running batch over one model: `add` sequences (prefilled at once), `step` them all
    forward by one token, `cancel` one. Events come back as (uid, Token | Done) pairs."""

    def __init__(self, model, tokenizer, engine: Engine | None = None, keep_kv: bool = False):
        self.model = model
        # keep_kv: the last sequence to leave hands its KV back to the engine (a server's next
        # request that extends it, an agent's next turn, prefills only its new tokens).
        self.keep_kv = keep_kv
        self.tokenizer = tokenizer
        self.engine = engine or Engine(model, tokenizer)  # prefills; keeps the prompt's KV
        self.rows: list[Sequence] = []  # in the batch, in the order of the cache's rows
        self.cache: list | None = None
        self._joining: list[Sequence] = []
        self._outbox: list[tuple[int, Event]] = []
        self._next_uid = 0
        self._last: tuple[list[int], mx.array] | None = None  # last prompt prefilled, its logits
        self.seeds: dict[int, int | None] = {}

    @property
    def active(self) -> list[int]:
        return [s.uid for s in self._joining + self.rows]

    @property
    def busy(self) -> bool:
        """Sequences still running, or events not yet returned by `step`."""
        return bool(self._joining or self.rows or self._outbox)

    def add(self, prompt_ids: list[int], settings: SamplingSettings | None = None,
            stop_ids: set[int] | None = None,
            on_progress: Callable[[PrefillProgress], None] | None = None) -> int:
        """Prefill one sequence now (alone, through the engine) and sample its first token; it
        joins the batch at the next `step`, whose events carry that first token."""
        if not prompt_ids:
            raise ValueError("empty prompt")
        settings = settings or SamplingSettings()
        sample, seed = make_sampler(settings)
        uid = self._next_uid
        self._next_uid += 1
        stop = self.tokenizer.stop_ids if stop_ids is None else stop_ids
        seq = Sequence(uid, settings, stop, sample, seed, self.tokenizer.detokenizer(), Stats(),
                       time.perf_counter(), prompt_ids=list(prompt_ids))
        self.seeds[uid] = seed
        begin = getattr(self.model, "begin_generation", None)
        if begin is not None:  # the scripted test double starts this sequence's output
            begin(len(prompt_ids))
        if (begin is None and self._last is not None and self._last[0] == prompt_ids
                and self.engine.cached_ids == prompt_ids):
            # The prompt of the previous sequence (N trajectories): its logits, no forward pass.
            logits = self._last[1]
            st = seq.stats
            st.prompt_tokens = st.reused_tokens = len(prompt_ids)
        else:
            logits = None
            try:
                for item in self.engine.prefill(prompt_ids, seq.stats):
                    if isinstance(item, PrefillProgress):
                        if on_progress is not None:
                            on_progress(item)
                    else:
                        logits = item
            except BaseException:  # Ctrl-C mid-prefill: the engine's ids match its cache again
                self._last = None
                self.engine._sync_cache()
                raise
            self._last = (list(prompt_ids), logits)
        y = sample(logits)
        # The engine's KV as it is now (arrays are values: later prefills do not change it);
        # copied once, when the sequence joins the batch.
        seq.cache = [c.batched([c]) for c in self.engine.cache]
        mx.eval(y)
        seq.t_first = time.perf_counter()
        seq.stats.prompt_time = seq.stats.ttft = seq.t_first - seq.t0
        if not self._take(seq, y.item(), self._outbox):
            self._joining.append(seq)
        return uid

    def step(self) -> list[tuple[int, Event]]:
        """Join the sequences added since the last step, run one forward pass over the batch,
        sample each row; finished rows leave. Returns the events in order."""
        events, self._outbox = self._outbox, []
        if self._joining:  # all at once: each layer's batch buffer is copied once
            joining, self._joining = self._joining, []
            if self.cache is None:
                self.cache, joining[0].cache = joining[0].cache, None
            for mine, *theirs in zip(self.cache, *(s.cache for s in joining if s.cache)):
                if theirs:
                    mine.extend(*theirs)
            for seq in joining:
                seq.cache = None
            self.rows += joining
        if not self.rows:
            return events
        ids = mx.array([[s.token_ids[-1]] for s in self.rows])
        logits = self.model(ids, cache=self.cache)[:, -1, :]
        ys = [s.sample(logits[i : i + 1]) for i, s in enumerate(self.rows)]
        mx.eval(ys, [c.state for c in self.cache])
        keep = [i for i, (s, y) in enumerate(zip(self.rows, ys))
                if not self._take(s, y.item(), events)]
        if self.keep_kv and not keep and len(self.rows) == 1:
            self._return_kv(self.rows[0])
        self._leave(keep)
        return events

    def cancel(self, uid: int) -> Done | None:
        """Stop one sequence where it is (finish reason "interrupted"); None if it is not here."""
        for seq in self._joining:
            if seq.uid == uid:
                self._joining.remove(seq)
                return self._done(seq, "interrupted")
        for i, seq in enumerate(self.rows):
            if seq.uid == uid:
                self._leave([j for j in range(len(self.rows)) if j != i])
                return self._done(seq, "interrupted")
        return None

    def cancel_all(self) -> list[tuple[int, Done]]:
        return [(uid, d) for uid in self.active if (d := self.cancel(uid)) is not None]

    def run(self) -> Iterator[tuple[int, Event]]:
        """Step until every sequence has finished."""
        while self.busy:
            yield from self.step()

    # -- internals -----------------------------------------------------------------------------

    def _take(self, seq: Sequence, tok: int, out: list) -> bool:
        """Record a sampled token; True when it ends the sequence."""
        seq.token_ids.append(tok)
        stop = tok in seq.stop
        last = stop or len(seq.token_ids) >= seq.settings.max_tokens
        text = "" if stop else seq.detok.add_token(tok)
        if last:
            text += seq.detok.finalize()
        out.append((seq.uid, Token(tok, text)))
        if last:
            out.append((seq.uid, self._done(seq, "stop" if stop else "length")))
        return last

    def _done(self, seq: Sequence, finish: str) -> Done:
        st = seq.stats
        st.generation_tokens = len(seq.token_ids)
        st.generation_time = time.perf_counter() - (seq.t_first or seq.t0)
        st.peak_memory_gb = mx.get_peak_memory() / 1e9
        return Done(finish, list(seq.token_ids), st)

    def _return_kv(self, seq: Sequence) -> None:
        """The engine's cache becomes this (only) row's: its prompt and all but its last token
        (whose KV no step has computed), as after `Engine.generate`."""
        ids = seq.prompt_ids + seq.token_ids[:-1]
        if any(c.lengths[0] != len(ids) for c in self.cache):
            return  # not the shape this expects: the engine keeps the prompt's KV
        cache = self.model.make_cache()
        for single, rows in zip(cache, self.cache):
            single.offset = len(ids)
            latent = getattr(rows, "latent", None)
            if latent is not None:
                single.latent = latent[:1, :, rows.idx - len(ids) : rows.idx, :]
        self.engine.cache, self.engine.cached_ids = cache, ids
        self._last = None

    def _leave(self, keep: list[int]) -> None:
        if len(keep) == len(self.rows):
            return
        self.rows = [self.rows[i] for i in keep]
        if not self.rows:
            self.cache = None
            return
        for c in self.cache:
            c.filter(keep)


def generate_batch(model, tokenizer, prompts: list[list[int]],
                   settings: list[SamplingSettings] | SamplingSettings | None = None,
                   engine: Engine | None = None, stop_ids: set[int] | None = None,
                   ) -> Iterator[tuple[int, Event]]:
    """Decode `prompts` as one batch: yields (index into prompts, Token | Done) as they come."""
    if not isinstance(settings, list):
        settings = [settings or SamplingSettings()] * len(prompts)
    dec = BatchDecoder(model, tokenizer, engine)
    index = {dec.add(p, s, stop_ids): i for i, (p, s) in enumerate(zip(prompts, settings))}
    try:
        for uid, ev in dec.run():
            yield index[uid], ev
    finally:
        dec.cancel_all()
