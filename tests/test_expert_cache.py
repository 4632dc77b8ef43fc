"""The expert cache changes speed, never results: bit-identical logits and tokens at every budget.

Runs on expert packs converted from synthetic checkpoints; budgets from the smallest that can run
a token (top_k slots per layer) to all-but-one expert.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

import kimi_cli
from kimi_cli.checkpoint.reader import open_checkpoint
from kimi_cli.errors import KimiError
from kimi_cli.experts.cache import parse_size, plan_slots, slot_nbytes
from kimi_cli.experts.convert import convert
from kimi_cli.loader import default_dtype
from kimi_cli.model.args import ModelArgs

PROMPT = [5, 17, 300, 42, 8, 99, 123, 7, 64, 3, 11, 500, 600, 700, 20, 21, 22, 23, 24, 25, 26]


@pytest.fixture(scope="module")
def tiny_pack(tiny_ckpt: Path, tmp_path_factory) -> Path:
    dst = tmp_path_factory.mktemp("packs") / "tiny-pack"
    convert(tiny_ckpt, dst)
    return dst


def budget_for(pack: Path, slots: int) -> int:
    args = open_checkpoint(pack, with_experts=False).args
    layers = sum(args.is_moe_layer(i) for i in range(args.num_hidden_layers))
    return slots * layers * slot_nbytes(args, default_dtype())


def run(model, steps: int = 16):
    """Greedy decode after a prefill; every step's logits and the tokens."""
    cache = model.make_cache()
    logits = model(mx.array([PROMPT]), cache=cache)[:, -1]
    out, tokens = [logits], []
    for _ in range(steps):
        y = mx.argmax(logits, axis=-1)
        tokens.append(y.item())
        logits = model(y[:, None], cache=cache)[:, -1]
        out.append(logits)
    return tokens, mx.concatenate(out)


@pytest.fixture(scope="module")
def resident(tiny_pack: Path):
    model, _ = kimi_cli.load(tiny_pack)
    assert model.expert_cache is None
    return run(model)


@pytest.mark.parametrize("slots", [3, 4, 6, 9])
@pytest.mark.parametrize("prefetch", [False, True])
def test_cache_is_bit_identical_to_resident(tiny_pack, resident, slots, prefetch):
    model, _ = kimi_cli.load(tiny_pack, expert_cache=budget_for(tiny_pack, slots),
                             prefetch=prefetch)
    assert model.expert_cache is not None
    assert set(model.expert_cache.stats.slots.values()) == {slots}
    tokens, logits = run(model)
    assert tokens == resident[0]
    assert mx.array_equal(logits, resident[1]).item()
    stats = model.expert_cache.stats.to_dict()
    assert stats["misses"] > 0
    model.expert_cache.close()


def test_smallest_budget_misses_on_almost_every_token(tiny_pack, resident):
    # top_k slots per layer: every token that routes differently from the last one misses.
    model, _ = kimi_cli.load(tiny_pack, expert_cache=budget_for(tiny_pack, 3), prefetch=False)
    tokens, _ = run(model)
    assert tokens == resident[0]
    stats = model.expert_cache.stats
    total = stats.total()
    assert total.hit_rate < 0.5
    assert total.evictions > 0
    assert total.bytes_read >= total.misses * 1  # every miss read a block
    assert all(s.misses > 0 for s in stats.layers.values())


def test_prefill_chunk_routing_to_more_experts_than_slots(tiny_pack, resident):
    # The 21-token prompt routes to all 10 experts of a layer; 3 slots force grouped loading.
    model, _ = kimi_cli.load(tiny_pack, expert_cache=budget_for(tiny_pack, 3))
    cache = model.make_cache()
    logits = model(mx.array([PROMPT]), cache=cache)[:, -1]
    assert mx.array_equal(logits, resident[1][:1]).item()


def test_budget_that_holds_every_expert_skips_the_cache(tiny_pack):
    model, _ = kimi_cli.load(tiny_pack, expert_cache=budget_for(tiny_pack, 10))
    assert model.expert_cache is None


def test_budget_too_small_is_a_clear_error(tiny_pack):
    with pytest.raises(KimiError, match="too small: it must hold at least 3 experts per MoE"):
        kimi_cli.load(tiny_pack, expert_cache=budget_for(tiny_pack, 2))


def test_release_directory_streams_without_a_pack(tiny_ckpt, tiny_pack):
    model, _ = kimi_cli.load(tiny_ckpt, expert_cache=budget_for(tiny_pack, 4))
    assert model.expert_cache is not None and model.expert_plan.source == "release shards"
    model.expert_cache.close()


def test_pack_loads_identically_to_the_release(tiny_ckpt, tiny_pack):
    from_release, _ = kimi_cli.load(tiny_ckpt)
    from_pack, _ = kimi_cli.load(tiny_pack)
    a = from_release(mx.array([PROMPT]))
    b = from_pack(mx.array([PROMPT]))
    assert mx.array_equal(a, b).item()


def test_corrupt_block_is_reported_not_used(tiny_pack, tmp_path):
    import shutil

    pack = tmp_path / "pack"
    shutil.copytree(tiny_pack, pack)
    layer_file = sorted((pack / "experts").glob("*.bin"))[0]
    data = bytearray(layer_file.read_bytes())
    data[100] ^= 0xFF  # inside expert 0's gate weights
    layer_file.write_bytes(bytes(data))
    model, _ = kimi_cli.load(pack, expert_cache=budget_for(pack, 3), prefetch=False)
    with pytest.raises(KimiError, match="expert 0 fails its checksum"):
        # Route everything through expert 0 of that layer by running many tokens.
        cache = model.make_cache()
        mx.eval(model(mx.array([PROMPT * 2]), cache=cache))


def test_eviction_keeps_hot_experts(tiny_pack):
    from kimi_cli.experts.cache import ExpertCache

    args = open_checkpoint(tiny_pack, with_experts=False).args
    reads: list[tuple[int, int]] = []

    def read(layer, expert, dest):
        reads.append((layer, expert))
        for k in list(dest):
            dest[k][...] = 0
        for p in ("gate_proj", "up_proj", "down_proj"):
            dest[f"{p}.scales"] = np.zeros(1, np.uint16)
        return 1


    cache = ExpertCache(args, read, {1: 4}, mx.float32, prefetch=False)
    cache.pools[1].fill = lambda slot, staged: None
    for _ in range(5):  # expert 0 is used on every token, the others rotate
        for other in (1, 2, 3, 4, 5, 6):
            cache.begin_token()
            cache.acquire(1, np.array([0, other]))
    assert reads.count((1, 0)) == 1  # the hot expert was never evicted
    assert cache.stats.layers[1].evictions > 0
    cache.close()


def test_parse_size():
    assert parse_size("40GB") == 40 * 10**9
    assert parse_size("512MiB") == 512 << 20
    assert parse_size("25%", total=1000) == 250
    assert parse_size("1000") == 1000
    with pytest.raises(KimiError, match="bad size"):
        parse_size("lots")


def test_expert_cache_spellings():
    from kimi_cli.errors import UsageError
    from kimi_cli.experts.cache import parse_cache_spec

    assert parse_cache_spec(None) == ("auto", 0)
    assert parse_cache_spec("auto") == ("auto", 0)
    assert parse_cache_spec("OFF") == ("off", 0)
    assert parse_cache_spec("40GB") == ("bytes", 40 * 10**9)
    assert parse_cache_spec(1234) == ("bytes", 1234)
    assert parse_cache_spec("25%") == ("memory", 0.25)
    assert parse_cache_spec("25%memory") == ("memory", 0.25)
    assert parse_cache_spec("25%experts") == ("experts", 0.25)
    for bad in ("lots", "0%", "101%experts", "-1GB", "%experts", "25%exp", "0"):
        with pytest.raises(UsageError, match="--expert-cache"):
            parse_cache_spec(bad)


def test_share_of_experts_sets_the_slots_per_layer():
    from kimi_cli.experts.cache import make_plan

    args = ModelArgs(
        hidden_size=64, moe_intermediate_size=32, num_hidden_layers=3, n_routed_experts=10,
        num_experts_per_tok=3, first_k_dense_replace=1)
    plan = make_plan(args, "50%experts", mx.float32, 0, 0)
    assert plan.slots == {1: 5, 2: 5} and plan.share == 0.5 and plan.explicit
    assert make_plan(args, "100%experts", mx.float32, 0, 0).slots == {}
    assert make_plan(args, "off", mx.float32, 0, 0).to_dict()["all_layers_fit"]
    with pytest.raises(KimiError, match="at least 3 experts"):
        make_plan(args, "20%experts", mx.float32, 0, 0)


def test_plan_slots_equal_shares():
    args = ModelArgs(
        hidden_size=64, moe_intermediate_size=32, num_hidden_layers=3, n_routed_experts=10,
        num_experts_per_tok=3, first_k_dense_replace=1)
    per = slot_nbytes(args, mx.float32)
    assert plan_slots(args, 2 * 5 * per, mx.float32) == {1: 5, 2: 5}
    assert plan_slots(args, 2 * 10 * per, mx.float32) == {}


def test_profile_then_pin_keeps_hot_experts_resident(tiny_pack, resident):
    budget = budget_for(tiny_pack, 6)
    model, _ = kimi_cli.load(tiny_pack, expert_cache=budget, prefetch=False)
    run(model)
    profile = model.expert_cache.profile(top=2)
    assert set(profile) == {1, 2} and all(len(v) == 2 for v in profile.values())
    model.expert_cache.close()

    pinned_model, _ = kimi_cli.load(tiny_pack, expert_cache=budget, prefetch=False,
                                    pinned=profile)
    cache = pinned_model.expert_cache
    slots_before = {L: [int(cache._slot_of[L][e]) for e in ex] for L, ex in profile.items()}
    tokens, logits = run(pinned_model)
    assert tokens == resident[0]
    assert mx.array_equal(logits, resident[1]).item()
    for L, experts in profile.items():  # pinned experts never left their slots
        assert [int(cache._slot_of[L][e]) for e in experts] == slots_before[L]
    cache.close()


def _marking_cache(args, capacity: int, threads: int, blocked: set[int]):
    """A cache whose reader writes the expert's id into every word of its slot; reads of the
    experts in `blocked` start, then wait until `release` is set (in-flight prefetches)."""
    from kimi_cli.experts.cache import ExpertCache

    release, started = threading.Event(), []

    def read(layer, expert, dest):
        if expert in blocked:
            started.append(expert)
            assert release.wait(30), "test reader never released"
        for p in ("gate_proj", "up_proj", "down_proj"):
            dest[f"{p}.weight"][...] = expert
        return 1

    cache = ExpertCache(args, read, {1: capacity}, mx.float32, threads=threads, prefetch=True)
    cache.pools[1].fill = lambda slot, staged: None
    return cache, release, started


def _release_when_pending(cache, release, keys, timeout: float = 30.0):
    """Release the blocked reads only once every demand read in `keys` has been given a slot."""
    def go():
        deadline = time.monotonic() + timeout
        while not all(k in cache._pending for k in keys) and time.monotonic() < deadline:
            time.sleep(0.005)
        release.set()

    t = threading.Thread(target=go, daemon=True)
    t.start()
    return t


@pytest.mark.parametrize("wanted", [5, 6])
def test_demand_request_takes_the_slots_of_in_flight_prefetches(tiny_pack, wanted):
    # The crash: a grouped-prefill request as large as the pool while prefetch reads hold slots.
    # One reader thread: prefetch of expert 7 is running (blocked), 8 and 9 are queued. Five
    # wanted experts cancel the queued two; six must also wait for the running one to finish.
    args = open_checkpoint(tiny_pack, with_experts=False).args
    cache, release, started = _marking_cache(args, capacity=6, threads=1, blocked={7, 8, 9})
    cache.begin_token()
    cache.prefetch(1, np.array([7, 8, 9]))
    while not started:  # expert 7's read is in flight before the demand request comes
        time.sleep(0.001)
    experts = np.arange(wanted)
    helper = _release_when_pending(cache, release, [(1, e) for e in range(5)])
    slots = cache.acquire(1, experts)
    helper.join()
    assert sorted(slots.tolist()) == sorted(set(slots.tolist())) and len(slots) == wanted
    words = cache.pools[1].views["gate_proj.weight"]
    for e, s in zip(experts, slots):  # no late prefetch write landed in a handed-out slot
        assert (words[s] == e).all()
    cache.close()
    for e, s in zip(experts, slots):
        assert (words[s] == e).all()
    assert started == [7]  # the queued prefetches were cancelled, never read
