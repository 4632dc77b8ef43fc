"""Heavy mode: N trajectories of one prompt decoded as one batch, then one aggregation turn.

The aggregate reads the N final answers, not their reasoning (`chat/heavy_prompt.py`), and
writes the answer with reasoning of its own. Ctrl-C stops every trajectory and keeps what is done.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace

from . import config
from .batch import BatchDecoder, check_batch_fits
from .chat.heavy_prompt import aggregation_message
from .chat.parser import OutputParser, ReasoningDelta, TextDelta, ToolCall
from .chat.reply import Reply, generate_reply
from .chat.template import render
from .engine import Done, Engine, PrefillProgress, SamplingSettings, Stats, Token


@dataclass
class Trajectory:
    index: int  # 1-based, as shown
    seed: int | None
    reasoning: str = ""
    content: str = ""
    token_ids: list[int] = field(default_factory=list)
    finish_reason: str | None = None  # None while it runs
    stats: Stats = field(default_factory=Stats)
    tool_calls: int = 0  # calls it wrote (heavy runs have no tools: counted, not run)

    @property
    def phase(self) -> str:
        if self.finish_reason is not None:
            return "done"
        return "answer" if self.content else "reasoning"

    @property
    def answer(self) -> str | None:
        """What the aggregate sees: the final answer of a trajectory that finished its turn."""
        return self.content if self.finish_reason == "stop" and self.content.strip() else None

    def to_dict(self) -> dict:
        return {"index": self.index, "seed": self.seed, "text": self.content,
                "reasoning": self.reasoning, "tokens": len(self.token_ids),
                "finish_reason": self.finish_reason, "token_ids": self.token_ids,
                "tool_calls": self.tool_calls, "generation_tps": self.stats.generation_tps}


@dataclass
class HeavyResult:
    trajectories: list[Trajectory]
    prompt_ids: list[int]
    aggregate: Reply | None = None  # None when interrupted before it
    aggregate_prompt_ids: list[int] = field(default_factory=list)
    prefill_time: float = 0.0
    batch_time: float = 0.0

    @property
    def interrupted(self) -> bool:
        return self.aggregate is None or self.aggregate.finish_reason == "interrupted"


def trajectory_seeds(seed: int | None, n: int) -> list[int]:
    """N seeds from one (each trajectory reproducible alone with `kimi run --seed`)."""
    base = seed if seed is not None else random.SystemRandom().randrange(config.SEED_MAX)
    return [(base + i) % (config.SEED_MAX + 1) for i in range(n + 1)]  # the last: aggregate


def run_trajectories(engine: Engine, tokenizer, prompt_ids: list[int], seeds: list[int],
                     settings: SamplingSettings,
                     on_update: Callable[[list[Trajectory]], None] | None = None,
                     on_progress: Callable[[PrefillProgress], None] | None = None,
                     ) -> tuple[list[Trajectory], float]:
    """Decode one trajectory per seed as one batch. Ctrl-C stops them all: the ones still
    running end "interrupted" with what they had. Returns them and the seconds of decoding."""
    trajs = [Trajectory(i + 1, s) for i, s in enumerate(seeds)]
    parsers = [OutputParser(tokenizer) for _ in seeds]
    dec = BatchDecoder(engine.model, tokenizer, engine)
    update = on_update or (lambda t: None)

    def handle(t: Trajectory, events) -> None:
        for ev in events:
            if isinstance(ev, ReasoningDelta):
                t.reasoning += ev.text
            elif isinstance(ev, TextDelta):
                t.content += ev.text
            elif isinstance(ev, ToolCall):
                t.tool_calls += 1

    def finish(t: Trajectory, done: Done) -> None:
        t.finish_reason = done.finish_reason
        t.stats = done.stats
        handle(t, parsers[t.index - 1].finish(done.finish_reason))

    uids: dict[int, Trajectory] = {}
    t0 = time.perf_counter()
    try:
        for t in trajs:
            uids[dec.add(prompt_ids, replace(settings, seed=t.seed), on_progress=on_progress)] = t
        update(trajs)
        while dec.busy:
            for uid, ev in dec.step():
                t = uids[uid]
                if isinstance(ev, Token):
                    t.token_ids.append(ev.id)
                    handle(t, parsers[t.index - 1].feed(ev.id))
                elif isinstance(ev, Done):
                    finish(t, ev)
            update(trajs)
    except KeyboardInterrupt:
        for uid, done in dec.cancel_all():
            finish(uids[uid], done)
        for t in trajs:  # not even prefilled
            if t.finish_reason is None:
                t.finish_reason = "interrupted"
        update(trajs)
    return trajs, time.perf_counter() - t0


def run_heavy(engine: Engine, tokenizer, messages: list[dict], n: int,
              settings: SamplingSettings,
              on_update: Callable[[list[Trajectory]], None] | None = None,
              on_event: Callable[[object], None] | None = None,
              on_progress: Callable[[PrefillProgress], None] | None = None,
              on_aggregate: Callable[[], None] | None = None) -> HeavyResult:
    """`messages` end with the user's question. N trajectories answer it; if none was
    interrupted, the aggregation turn (the same conversation, the question replaced by the
    aggregation message) streams through `on_event` as a normal reply."""
    template = tokenizer.chat_template
    prompt_ids = tokenizer.encode(render(messages, template=template))
    check_batch_fits(engine.model, n, len(prompt_ids) + settings.max_tokens)
    seeds = trajectory_seeds(settings.seed, n)
    trajs, seconds = run_trajectories(engine, tokenizer, prompt_ids, seeds[:n], settings,
                                      on_update, on_progress)
    result = HeavyResult(trajs, prompt_ids, batch_time=seconds)
    if any(t.finish_reason == "interrupted" for t in trajs):
        return result
    question = messages[-1]["content"]
    agg_messages = messages[:-1] + [
        {"role": "user", "content": aggregation_message(question, [t.answer for t in trajs])}]
    result.aggregate_prompt_ids = tokenizer.encode(render(agg_messages, template=template))
    if on_aggregate is not None:
        on_aggregate()
    result.aggregate = generate_reply(engine, tokenizer, result.aggregate_prompt_ids,
                                      replace(settings, seed=seeds[n]), on_event)
    return result
