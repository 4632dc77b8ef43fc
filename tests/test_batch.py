"""Batched decoding on synthetic checkpoints: every sequence of a batch is its batch-1 run.

Prompts of different lengths, sequences finishing at different steps, joining a running batch
and leaving it; greedy tokens equal, logits within 1e-5 of the largest logit (float32 on the CPU
backend; measured: bit-identical), seeded sampling equal to `Engine` with the same seed; through
the expert cache too, which reads each missing expert once per layer and step.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import mlx.core as mx
import pytest

import kimi_cli
from kimi_cli.batch import BatchDecoder, generate_batch
from kimi_cli.engine import Done, Engine, SamplingSettings, Token
from kimi_cli.model.cache import BatchLatentCache

TEXTS = ["Hello, World!", "The quick brown fox jumps over the lazy dog. Kimi is", "def",
         "What is the weather in Beijing today? It is sunny, with a high of 25"]
LOGIT_RTOL = 1e-5  # of the largest |logit| of the row


@pytest.fixture(scope="module")
def loaded(tiny_ckpt: Path):
    return kimi_cli.load(tiny_ckpt)


@pytest.fixture(scope="module")
def prompts(loaded) -> list[list[int]]:
    tok = loaded[1]
    out = [tok.encode(t) for t in TEXTS]
    assert len({len(p) for p in out}) == len(out)
    return out


def single(model, tok, prompt, settings, stop_ids=frozenset()) -> Done:
    events = list(Engine(model, tok).generate(prompt, settings, stop_ids=set(stop_ids)))
    return events[-1]


def collect(events) -> tuple[dict[int, list[int]], dict[int, Done]]:
    tokens: dict[int, list[int]] = {}
    done: dict[int, Done] = {}
    for i, ev in events:
        assert i not in done, "an event after the sequence's Done"
        if isinstance(ev, Token):
            tokens.setdefault(i, []).append(ev.id)
        else:
            done[i] = ev
    return tokens, done


def greedy(max_tokens: int, **kw) -> SamplingSettings:
    return SamplingSettings(temperature=0.0, max_tokens=max_tokens, **kw)


def test_each_sequence_of_a_batch_decodes_as_it_does_alone(loaded, prompts):
    model, tok = loaded
    settings = [greedy(6 + 5 * i) for i in range(len(prompts))]  # finish at different steps
    ref = [single(model, tok, p, s) for p, s in zip(prompts, settings)]
    tokens, done = collect(generate_batch(model, tok, prompts, settings, stop_ids=set()))
    for i, r in enumerate(ref):
        assert tokens[i] == r.token_ids == done[i].token_ids
        assert done[i].finish_reason == "length"
        assert len(tokens[i]) == settings[i].max_tokens


def test_a_sequence_stopping_on_a_stop_token_leaves_the_others_exact(loaded, prompts):
    model, tok = loaded
    free = single(model, tok, prompts[1], greedy(12)).token_ids
    stop = {next(t for k, t in enumerate(free) if k >= 3 and t not in free[:k])}
    ref = [single(model, tok, p, greedy(12), stop) for p in prompts]
    dec = BatchDecoder(model, tok)
    uids = [dec.add(p, greedy(12), stop) for p in prompts]
    tokens, done = collect(dec.run())
    assert done[uids[1]].finish_reason == "stop" and len(tokens[uids[1]]) < 12
    for uid, r in zip(uids, ref):
        assert tokens[uid] == r.token_ids
        assert done[uid].finish_reason == r.finish_reason


def test_a_sequence_joining_a_running_batch_decodes_as_it_does_alone(loaded, prompts):
    model, tok = loaded
    ref = [single(model, tok, p, greedy(10)) for p in prompts]
    dec = BatchDecoder(model, tok)
    events = []
    first = [dec.add(p, greedy(10), set()) for p in prompts[:2]]
    for _ in range(4):
        events += dec.step()
    late = [dec.add(p, greedy(10), set()) for p in prompts[2:]]
    events += list(dec.run())
    tokens, done = collect(events)
    for uid, r in zip(first + late, ref):
        assert tokens[uid] == r.token_ids


def test_a_cancelled_sequence_leaves_and_the_rest_decode_exactly(loaded, prompts):
    model, tok = loaded
    ref = [single(model, tok, p, greedy(10)) for p in prompts]
    dec = BatchDecoder(model, tok)
    uids = [dec.add(p, greedy(10), set()) for p in prompts]
    events = dec.step() + dec.step()
    cancelled = dec.cancel(uids[0])
    assert cancelled.finish_reason == "interrupted"
    assert cancelled.token_ids == ref[0].token_ids[:3]  # the prefill's token, then two steps
    assert uids[0] not in dec.active
    tokens, _ = collect(events + list(dec.run()))
    for uid, r in zip(uids[1:], ref[1:]):
        assert tokens[uid] == r.token_ids
    assert dec.cancel(uids[0]) is None


def test_batched_logits_equal_batch_one_logits_within_tolerance(loaded, prompts):
    model, _ = loaded
    singles, firsts = [], []
    for p in prompts:
        cache = model.make_cache()
        firsts.append(mx.argmax(model(mx.array([p]), cache=cache)[:, -1], axis=-1).item())
        singles.append(cache)
    ref = []
    for p, y in zip(prompts, firsts):
        cache = model.make_cache()
        model(mx.array([p]), cache=cache)
        rows = []
        for _ in range(6):
            lg = model(mx.array([[y]]), cache=cache)[:, -1]
            rows.append(lg)
            y = mx.argmax(lg, axis=-1).item()
        ref.append(mx.concatenate(rows))
    batch = [BatchLatentCache.merge(list(layer)) for layer in zip(*singles)]
    ys, rows = firsts, []
    for _ in range(6):
        lg = model(mx.array([[y] for y in ys]), cache=batch)[:, -1]
        rows.append(lg)
        ys = mx.argmax(lg, axis=-1).tolist()
    out = mx.stack(rows, axis=1)
    for i, r in enumerate(ref):
        err = mx.abs(out[i] - r).max().item()
        assert err <= LOGIT_RTOL * mx.abs(r).max().item(), f"row {i}: {err}"


def test_each_sequence_samples_as_the_engine_does_with_its_own_settings_and_seed(loaded, prompts):
    model, tok = loaded
    filters = [{}, {"top_k": 20}, {"top_p": 0.8}, {"min_p": 0.05, "temperature": 0.7}]
    settings = [SamplingSettings(**{"temperature": 1.0, "max_tokens": 10, "seed": 100 + i, **f})
                for i, f in enumerate(filters)]
    ref = [single(model, tok, p, s) for p, s in zip(prompts, settings)]
    tokens, _ = collect(generate_batch(model, tok, prompts, settings, stop_ids=set()))
    for i, r in enumerate(ref):
        assert tokens[i] == r.token_ids
    same_prompt = [prompts[0]] * 3
    tokens, _ = collect(generate_batch(model, tok, same_prompt, settings[:3], stop_ids=set()))
    assert len({tuple(t) for t in tokens.values()}) > 1  # own seeds: own trajectories


def test_one_prompt_many_sequences_prefills_once(loaded, prompts):
    model, tok = loaded
    dec = BatchDecoder(model, tok)
    for _ in range(3):
        dec.add(prompts[3], greedy(2))
    _, done = collect(dec.run())
    assert [d.stats.prefilled_tokens for d in done.values()] == [len(prompts[3]), 0, 0]


# Through the expert cache


@pytest.fixture(scope="module")
def tiny_pack(tiny_ckpt: Path, tmp_path_factory) -> Path:
    from kimi_cli.experts.convert import convert

    dst = tmp_path_factory.mktemp("packs") / "tiny-pack"
    convert(tiny_ckpt, dst)
    return dst


def load_streaming(pack: Path, slots: int):
    from kimi_cli.checkpoint.reader import open_checkpoint
    from kimi_cli.experts.cache import slot_nbytes
    from kimi_cli.loader import default_dtype

    args = open_checkpoint(pack, with_experts=False).args
    layers = sum(args.is_moe_layer(i) for i in range(args.num_hidden_layers))
    model, tok = kimi_cli.load(pack, expert_cache=slots * layers * slot_nbytes(
        args, default_dtype()), prefetch=False)
    assert model.expert_cache is not None
    return model, tok


def record_reads(cache) -> list[tuple[float, int, int]]:
    """(forward pass, layer, expert) of every read the cache makes from now on."""
    reads: list[tuple[float, int, int]] = []
    inner = cache.read_fn

    def read(layer, expert, dest):
        reads.append((cache._tick, layer, expert))
        return inner(layer, expert, dest)

    cache.read_fn = read
    return reads


def test_a_batch_through_the_expert_cache_decodes_as_resident(loaded, tiny_pack, prompts):
    model, tok = loaded
    ref = [single(model, tok, p, greedy(8)) for p in prompts]
    streamed, stok = load_streaming(tiny_pack, 4)
    reads = record_reads(streamed.expert_cache)
    tokens, _ = collect(generate_batch(streamed, stok, prompts, greedy(8), stop_ids=set()))
    for i, r in enumerate(ref):
        assert tokens[i] == r.token_ids
    assert reads, "the budget should make the batch miss"
    # However many rows want an expert, one read per missing expert per layer and step.
    assert max(Counter(reads).values()) == 1
    streamed.expert_cache.close()


def test_identical_sequences_read_what_one_reads_alone(tiny_pack, prompts):
    def bytes_read(n: int) -> tuple[int, int]:
        model, tok = load_streaming(tiny_pack, 3)
        collect(generate_batch(model, tok, [prompts[1]] * n, greedy(8), stop_ids=set()))
        t = model.expert_cache.stats.total()
        model.expert_cache.close()
        return t.misses, t.bytes_read

    alone = bytes_read(1)
    assert alone[0] > 0
    assert bytes_read(4) == alone


def test_a_batch_wide_enough_to_sort_its_expert_rows_decodes_exactly(loaded):
    from mlx_kernels.experts import SORT_MIN_ROWS

    model, tok = loaded
    words = " ".join(TEXTS).split()
    n = SORT_MIN_ROWS // model.args.num_experts_per_tok + 1
    prompts = [tok.encode(" ".join(words[i : i + 2 + i % 5])) for i in range(n)]
    ref = [single(model, tok, p, greedy(4)) for p in prompts]
    tokens, _ = collect(generate_batch(model, tok, prompts, greedy(4), stop_ids=set()))
    assert [tokens[i] for i in range(n)] == [r.token_ids for r in ref]
