"""The generation engine on the tiny synthetic checkpoint: sampling, stopping, prompt-cache reuse.

Greedy decoding is the reference: whatever the engine does with its KV cache (reuse, trimming,
chunked prefill), greedy tokens must equal those of a fresh cache over the same prompt.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx
import pytest

import kimi_cli
from kimi_cli.chat.template import render
from kimi_cli.engine import Done, Engine, PrefillProgress, SamplingSettings, Token, common_prefix
from kimi_cli.errors import UsageError


@dataclass
class Run:
    ids: list[int]
    texts: list[str]
    done: Done
    progress: list[PrefillProgress]

    @property
    def text(self) -> str:
        return "".join(self.texts)


def run(engine: Engine, prompt: list[int], stop_ids: set[int] | None = None, **settings) -> Run:
    settings.setdefault("temperature", 0.0)
    events = list(engine.generate(prompt, SamplingSettings(**settings), stop_ids=stop_ids))
    tokens = [e for e in events if isinstance(e, Token)]
    assert isinstance(events[-1], Done)
    assert sum(isinstance(e, Done) for e in events) == 1
    assert [t.id for t in tokens] == events[-1].token_ids
    return Run([t.id for t in tokens], [t.text for t in tokens], events[-1],
               [e for e in events if isinstance(e, PrefillProgress)])


def assert_cache_consistent(engine: Engine) -> None:
    assert all(c.offset == len(engine.cached_ids) for c in engine.cache)


@pytest.fixture(scope="module")
def loaded(tiny_ckpt: Path):
    return kimi_cli.load(tiny_ckpt)


@pytest.fixture(scope="module")
def model(loaded):
    return loaded[0]


@pytest.fixture(scope="module")
def tok(loaded):
    return loaded[1]


@pytest.fixture(scope="module")
def prompt(tok) -> list[int]:
    messages = [{"role": "user", "content": "Hello, World! What is the weather in Beijing?"}]
    return tok.encode(render(messages, template=tok.chat_template))


def fresh(model, tok, **kw) -> Engine:
    return Engine(model, tok, **kw)


def first_new_token_step(ids: list[int], start: int = 3) -> int:
    """A step k >= start whose token did not occur before it (so a stop on it stops exactly there)."""
    return next(k for k in range(start, len(ids)) if ids[k] not in ids[:k])


# Greedy decoding and sampling


def test_greedy_equals_plain_argmax_loop(model, tok, prompt):
    steps = 24
    cache = model.make_cache()
    logits = model(mx.array(prompt)[None], cache=cache)[:, -1]
    expected = []
    for _ in range(steps):
        y = mx.argmax(logits, axis=-1)
        expected.append(y.item())
        logits = model(y[:, None], cache=cache)[:, -1]

    got = run(fresh(model, tok), prompt, stop_ids=set(), max_tokens=steps)
    assert got.ids == expected
    assert run(fresh(model, tok), prompt, stop_ids=set(), max_tokens=steps).ids == expected


def test_seeded_sampling_reproduces(model, tok, prompt):
    a = run(fresh(model, tok), prompt, stop_ids=set(), temperature=1.0, seed=7, max_tokens=24)
    b = run(fresh(model, tok), prompt, stop_ids=set(), temperature=1.0, seed=7, max_tokens=24)
    assert a.ids == b.ids


def test_different_seeds_sample_differently(model, tok, prompt):
    # 24 tokens over a ~1000-token vocabulary from a random model: a collision is not plausible.
    a = run(fresh(model, tok), prompt, stop_ids=set(), temperature=1.0, seed=7, max_tokens=24)
    b = run(fresh(model, tok), prompt, stop_ids=set(), temperature=1.0, seed=8, max_tokens=24)
    assert a.ids != b.ids


def test_max_tokens_is_respected(model, tok, prompt):
    for n in (1, 2, 13):
        r = run(fresh(model, tok), prompt, stop_ids=set(), max_tokens=n)
        assert len(r.ids) == n
        assert r.done.finish_reason == "length"
        assert r.done.stats.generation_tokens == n


# Stopping


def test_stops_on_a_given_stop_id(model, tok, prompt):
    free = run(fresh(model, tok), prompt, stop_ids=set(), max_tokens=24)
    k = first_new_token_step(free.ids)
    r = run(fresh(model, tok), prompt, stop_ids={free.ids[k]}, max_tokens=24)
    assert r.done.finish_reason == "stop"
    assert r.ids == free.ids[: k + 1]
    assert r.texts[-1] == ""  # stop tokens are not shown
    assert r.texts[:-1] == free.texts[:k]


class ForceToken:
    """The real model, except that the call ending at cache offset `at` makes `token` win."""

    def __init__(self, model, token: int, at: int):
        self.model, self.token, self.at = model, token, at

    @property
    def layers(self):
        return self.model.layers

    def make_cache(self):
        return self.model.make_cache()

    def __call__(self, ids: mx.array, cache=None) -> mx.array:
        logits = self.model(ids, cache=cache)
        if cache[0].offset == self.at:
            logits = logits + mx.where(mx.arange(logits.shape[-1]) == self.token, 1e4, 0.0)
        return logits


@pytest.mark.parametrize("name", ["<|im_end|>", "[EOS]"])
def test_stops_on_end_of_turn_tokens_by_default(model, tok, prompt, name):
    stop = tok.special_tokens[name]
    free = run(fresh(model, tok), prompt, stop_ids=set(), max_tokens=24)
    k = 5
    forced = ForceToken(model, stop, at=len(prompt) + k)
    r = run(Engine(forced, tok), prompt, max_tokens=24)  # stop_ids=None: the tokenizer's
    assert r.done.finish_reason == "stop"
    assert r.ids == free.ids[:k] + [stop]
    assert r.texts[-1] == ""
    assert name not in r.text


# Prompt (KV) cache reuse


def test_continuation_after_stop_prefills_only_the_new_tokens(model, tok, prompt):
    free = run(fresh(model, tok), prompt, stop_ids=set(), max_tokens=24)
    k = first_new_token_step(free.ids)
    engine = fresh(model, tok)
    first = run(engine, prompt, stop_ids={free.ids[k]}, max_tokens=24)
    assert_cache_consistent(engine)
    assert engine.cached_ids == prompt + first.ids  # the stop token ran through the model too

    new = tok.encode("<|im_user|>user<|im_middle|>And in Paris?<|im_end|>"
                     "<|im_assistant|>assistant<|im_middle|>")
    follow = prompt + first.ids + new
    second = run(engine, follow, stop_ids=set(), max_tokens=12)
    assert second.done.stats.reused_tokens == len(prompt) + len(first.ids)
    assert second.done.stats.prefilled_tokens == len(new)
    assert second.done.stats.prompt_tokens == len(follow)
    assert second.ids == run(fresh(model, tok), follow, stop_ids=set(), max_tokens=12).ids
    assert_cache_consistent(engine)


def test_continuation_after_length_reuses_the_common_prefix(model, tok, prompt):
    engine = fresh(model, tok)
    first = run(engine, prompt, stop_ids=set(), max_tokens=6)
    held = list(engine.cached_ids)
    assert_cache_consistent(engine)
    # The last token of a turn cut by max_tokens was never run through the model.
    assert held == prompt + first.ids[:-1]

    new = tok.encode(" and then some more words")
    follow = prompt + first.ids + new
    second = run(engine, follow, stop_ids=set(), max_tokens=12)
    assert second.done.stats.reused_tokens == common_prefix(held, follow)
    assert second.done.stats.prefilled_tokens == len(follow) - common_prefix(held, follow)
    assert second.done.stats.prefilled_tokens == len(new) + 1
    assert second.ids == run(fresh(model, tok), follow, stop_ids=set(), max_tokens=12).ids
    assert_cache_consistent(engine)


def test_prompt_diverging_midway_reuses_exactly_the_common_prefix(model, tok, prompt):
    engine = fresh(model, tok)
    run(engine, prompt, stop_ids=set(), max_tokens=8)
    m = len(prompt) // 2
    other = prompt[:m] + tok.encode("Quite a different question, about Paris.")
    assert other[m] != prompt[m]
    r = run(engine, other, stop_ids=set(), max_tokens=12)
    assert r.done.stats.reused_tokens == m
    assert r.done.stats.prefilled_tokens == len(other) - m
    assert r.ids == run(fresh(model, tok), other, stop_ids=set(), max_tokens=12).ids
    assert_cache_consistent(engine)


def test_identical_prompt_twice_reuses_all_but_the_last_token(model, tok, prompt):
    engine = fresh(model, tok)
    a = run(engine, prompt, stop_ids=set(), max_tokens=10)
    b = run(engine, prompt, stop_ids=set(), max_tokens=10)
    assert b.done.stats.reused_tokens == len(prompt) - 1
    assert b.done.stats.prefilled_tokens == 1
    assert a.ids == b.ids
    assert_cache_consistent(engine)


def test_cache_stays_consistent_when_the_consumer_stops_early(model, tok, prompt):
    engine = fresh(model, tok)
    gen = engine.generate(prompt, SamplingSettings(temperature=0.0, max_tokens=50), stop_ids=set())
    seen = []
    for ev in gen:
        if isinstance(ev, Token):
            seen.append(ev.id)
            if len(seen) == 3:
                break
    gen.close()
    assert_cache_consistent(engine)
    held = list(engine.cached_ids)
    assert len(held) >= len(prompt)
    assert held == (prompt + seen)[: len(held)]

    # What the cache holds is right: continuing from it matches a fresh run.
    follow = prompt + seen + tok.encode(" continue")
    r = run(engine, follow, stop_ids=set(), max_tokens=10)
    assert r.done.stats.reused_tokens == len(held)
    assert r.ids == run(fresh(model, tok), follow, stop_ids=set(), max_tokens=10).ids
    assert_cache_consistent(engine)


# Chunked prefill


def test_chunked_prefill_gives_the_same_tokens_and_reports_progress(model, tok, prompt):
    chunked = run(fresh(model, tok, prefill_chunk=3), prompt, stop_ids=set(), max_tokens=16)
    whole = run(fresh(model, tok, prefill_chunk=512), prompt, stop_ids=set(), max_tokens=16)
    assert chunked.ids == whole.ids
    total = len(prompt)
    assert [p.processed for p in chunked.progress] == [*range(3, total, 3), total]
    assert all(p.total == total for p in chunked.progress)
    assert [(p.processed, p.total) for p in whole.progress] == [(total, total)]


def test_long_prompt_in_chunks_across_cache_growth(model, tok):
    # Over 256 tokens: the latent cache grows while chunks of 100 arrive.
    long = tok.encode("The weather in Beijing is sunny, the weather in Paris is rainy. " * 30)
    assert len(long) > 300
    chunked = run(fresh(model, tok, prefill_chunk=100), long, stop_ids=set(), max_tokens=8)
    whole = run(fresh(model, tok, prefill_chunk=512), long, stop_ids=set(), max_tokens=8)
    assert chunked.ids == whole.ids
    assert chunked.progress[-1].processed == len(long)


# Streaming text


def test_token_texts_concatenate_to_the_decoded_ids(model, tok, prompt):
    # Sampling at temperature 1 from a random model produces byte-fragment tokens too.
    for settings in ({}, {"temperature": 1.0, "seed": 3}):
        r = run(fresh(model, tok), prompt, stop_ids=set(), max_tokens=120, **settings)
        assert r.text == tok.decode(r.ids)


def test_stop_token_text_is_left_out_of_the_stream(model, tok, prompt):
    free = run(fresh(model, tok), prompt, stop_ids=set(), max_tokens=24)
    k = first_new_token_step(free.ids)
    r = run(fresh(model, tok), prompt, stop_ids={free.ids[k]}, max_tokens=24)
    assert r.text == tok.decode(r.ids[:-1])


# Settings and stats


@pytest.mark.parametrize("bad", [
    {"temperature": -0.1},
    {"top_p": 0.0},
    {"top_p": 1.5},
    {"min_p": -0.1},
    {"min_p": 1.0},
    {"top_k": -1},
    {"max_tokens": 0},
])
def test_sampling_settings_reject_bad_values(bad):
    with pytest.raises(UsageError):
        SamplingSettings(**bad).validate()


def test_sampling_settings_accept_defaults_and_edges():
    SamplingSettings().validate()
    SamplingSettings(temperature=0.0, top_p=1.0, min_p=0.0, top_k=0, max_tokens=1).validate()


def test_empty_prompt_is_rejected(model, tok):
    with pytest.raises(ValueError):
        list(fresh(model, tok).generate([], SamplingSettings(temperature=0.0)))


def test_stats_are_present_and_sane(model, tok, prompt):
    r = run(fresh(model, tok), prompt, stop_ids=set(), max_tokens=8)
    st = r.done.stats
    assert st.prompt_tokens == len(prompt)
    assert st.reused_tokens == 0
    assert st.prefilled_tokens == len(prompt)
    assert st.generation_tokens == 8
    assert st.prompt_tps > 0
    assert st.generation_tps > 0
    assert st.ttft > 0
    assert st.peak_memory_gb > 0
    d = st.to_dict()
    for key in ("prompt_tokens", "generation_tokens", "prompt_tps", "generation_tps",
                "peak_memory_gb", "ttft", "reused_tokens", "prefilled_tokens"):
        assert key in d
