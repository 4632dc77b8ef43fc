"""Pipeline parallel over `mx.distributed`: rank r runs its block of layers; hidden states go
rank to rank with send/recv, the last rank's logits come back to rank 0, which samples.

Rank 0 holds a `PipelineModel` (the model protocol: `model(ids, cache) -> logits`), so the
engine, chat, agent and bench drive it unchanged; the other ranks `follow` its messages. Each
message starts with a small int32 header; a following rank mirrors rank 0's KV cache by the
offset the header carries (the engine trims its cache between turns; the followers trim theirs
to match), keyed by the cache's id so several caches (bench, sessions) stay apart.
"""

from __future__ import annotations

import atexit
import hashlib
import json
import time
import weakref
from collections import OrderedDict
from dataclasses import dataclass

import mlx.core as mx

from .. import config
from ..checkpoint.layout import checkpoint_specs
from ..checkpoint.reader import DTYPE_SIZES, check_config, read_json, resolve_model_path
from ..errors import KimiError
from .group import PeerLost, backend, init_group, step_watchdog, stop_on_sigterm
from .split import LAYER_RE, LayerRange, parse_split, proportional_split, ranges

OP_FORWARD, OP_STATS, OP_STOP = 1, 2, 3
HEADER = 6  # op, cache id, cache offset, batch, length, oldest live cache id (0: unknown)
HASH_WORDS = 8  # the config hash as int32 words in the start-up exchange
STAT_COLS = 4  # per rank: decode compute s, decode steps, all compute s, all steps


def config_hash(cfg: dict) -> bytes:
    """What two ranks must agree on: the checkpoint's config.json, canonically serialized."""
    return hashlib.sha256(json.dumps(cfg, sort_keys=True).encode()).digest()


def weight_memory() -> int:
    """Memory this machine can give to weights: its memory less the headroom the automatic
    expert cache also keeps (the larger of 8 GB and 15%)."""
    from ..experts.cache import _machine_memory

    total = _machine_memory()
    return max(1 << 30, total - max(8 << 30, int(0.15 * total)))


def layer_bytes(args) -> list[int]:
    """Bytes of each layer as released; the embedding counts to layer 0, the final norm and
    lm_head to the last layer (where the split rule puts them)."""
    n_layers = args.num_hidden_layers
    out = [0] * n_layers
    for spec in checkpoint_specs(args):
        n = DTYPE_SIZES[spec.dtypes[0]]
        for d in spec.shape:
            n *= d
        m = LAYER_RE.match(spec.name)
        if m:
            out[min(int(m.group(1)), n_layers - 1)] += n
        else:
            out[0 if spec.name.startswith("model.embed_tokens.") else n_layers - 1] += n
    return out


def _send(x: mx.array, dst: int, group) -> None:
    mx.eval(mx.distributed.send(x, dst, group=group))


def _recv(shape, dtype, src: int, group) -> mx.array:
    x = mx.distributed.recv(shape, dtype, src, group=group)
    mx.eval(x)
    return x


@dataclass
class CommStats:
    """What rank 0 measures: round trips of its messages and their bytes (the followers'
    compute comes with OP_STATS)."""

    decode_steps: int = 0
    decode_round_trip: float = 0.0  # from rank 0's first send to the logits back
    decode_bytes: int = 0
    steps: int = 0
    bytes: int = 0


class PipelineModel:
    """Rank 0's view of the pipelined model: its own stage plus the other ranks behind
    send/recv. Returns the logits of the last position only ([B, 1, vocab]): that is all the
    engine and bench read, and it keeps the message back to rank 0 one row per sequence."""

    def __init__(self, stage, group, blocks: list[LayerRange], memory: list[int], dtype):
        self.stage = stage
        self.group = group
        self.blocks = blocks
        self.memory = memory
        self.dtype = dtype
        self.args = stage.args
        self.model_type = stage.model_type
        self.expert_cache = stage.expert_cache
        self.expert_plan = getattr(stage, "expert_plan", None)
        self.world = group.size()
        self.comm = CommStats()
        self.local = [0.0, 0, 0.0, 0]  # rank 0's own row of the compute table
        self._ids = 0
        self._live: weakref.WeakValueDictionary[int, _Cache] = weakref.WeakValueDictionary()
        self._closed = False
        self.watch = step_watchdog()
        atexit.register(self.close)

    @property
    def layers(self):
        return self.stage.layers

    def __getattr__(self, name: str):
        # Everything else (parameters(), input_major, ...) is rank 0's own stage: what
        # `kimi bench` sizes is then this rank's share of the weights.
        if name == "stage":
            raise AttributeError(name)
        return getattr(self.stage, name)

    def make_cache(self) -> list:
        cache = _Cache(self.stage.make_cache())
        self._ids += 1
        cache.id = self._ids
        self._live[cache.id] = cache
        return cache

    def __call__(self, inputs: mx.array, cache: list | None = None) -> mx.array:
        if cache is None:
            cache = self.make_cache()
        B, L = inputs.shape
        cid = getattr(cache, "id", id(cache) & 0x7FFFFFFF)
        offset = cache[0].offset
        self.watch.arm()
        try:
            t0 = time.perf_counter()
            h = self.stage.run_stage(inputs, cache)
            mx.eval(h, [c.state for c in cache])
            t1 = time.perf_counter()
            # The followers drop their mirrors of caches older than the oldest one alive here.
            oldest = min(self._live.keys(), default=0) if cid in self._live else 0
            header = mx.array([OP_FORWARD, cid, offset, B, L, oldest], dtype=mx.int32)
            _send(header, 1, self.group)
            _send(h, 1, self.group)
            logits = _recv((B, self.args.vocab_size), self.dtype, self.world - 1, self.group)
            t2 = time.perf_counter()
        except RuntimeError as e:
            raise _lost(e) from None
        finally:
            self.watch.disarm()
        sent = (header.nbytes * (self.world - 1) + h.nbytes * (self.world - 1)
                + logits.nbytes)
        self.local[2] += t1 - t0
        self.local[3] += 1
        self.comm.steps += 1
        self.comm.bytes += sent
        if L == 1:
            self.local[0] += t1 - t0
            self.local[1] += 1
            self.comm.decode_steps += 1
            self.comm.decode_round_trip += t2 - t1
            self.comm.decode_bytes += sent
        return logits[:, None, :]

    def collect(self) -> list[list[float]]:
        """Every rank's compute counters (rank 0's own and the followers', over the wire)."""
        table = mx.zeros((self.world, STAT_COLS), dtype=mx.float32)
        table[0] = mx.array(self.local, dtype=mx.float32)
        self.watch.arm()
        try:
            _send(mx.array([OP_STATS, 0, 0, 0, 0, 0], dtype=mx.int32), 1, self.group)
            _send(table, 1, self.group)
            table = _recv((self.world, STAT_COLS), mx.float32, self.world - 1, self.group)
        except RuntimeError as e:
            raise _lost(e) from None
        finally:
            self.watch.disarm()
        return table.tolist()

    def distributed_stats(self) -> dict:
        """The `distributed` object of `--format json` and `kimi bench`."""
        rows = self.collect()
        c = self.comm
        follower_decode = sum(r[0] for r in rows[1:])
        comm_s = max(0.0, c.decode_round_trip - follower_decode)
        per = max(1, c.decode_steps)
        return {
            "world_size": self.world,
            "backend": backend(),
            "ranks": [{"rank": r, **b.to_dict(), "layers": len(b.layers),
                       "memory_bytes": self.memory[r],
                       "compute_ms_per_token": 1e3 * rows[r][0] / max(1, rows[r][1]),
                       "compute_s": rows[r][2], "forward_passes": int(rows[r][3])}
                      for r, b in enumerate(self.blocks)],
            "decode_tokens": c.decode_steps,
            "comm_ms_per_token": 1e3 * comm_s / per,
            "comm_bytes_per_token": c.decode_bytes // per,
            "comm_bytes_total": c.bytes,
            "forward_passes": c.steps,
        }

    def close(self) -> None:
        """Tell the other ranks to exit (at the end of the run, whatever ended it)."""
        if self._closed:
            return
        self._closed = True
        import signal

        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # exiting already: mlx.launch may hurry
        try:
            self.watch.arm()
            _send(mx.array([OP_STOP, 0, 0, 0, 0, 0], dtype=mx.int32), 1, self.group)
        except RuntimeError:
            pass  # a rank is gone already: the others see the connection drop
        finally:
            self.watch.close()


class _Cache(list):
    """Rank 0's KV cache list, with the id the followers key their mirror of it by."""

    id = 0


def _lost(e: Exception) -> PeerLost:
    return PeerLost(f"another rank of the group stopped or cannot be reached ({e}); this run "
                    "cannot go on")


def follow(stage, group, block: LayerRange, dtype) -> None:
    """A rank other than 0: run this block for every message until rank 0 says stop."""
    rank, world = group.rank(), group.size()
    prev, nxt = rank - 1, (rank + 1) % world
    last = rank == world - 1
    H = stage.args.hidden_size
    caches: OrderedDict[int, list] = OrderedDict()
    row = [0.0, 0, 0.0, 0]
    while True:
        header = _recv((HEADER,), mx.int32, prev, group)
        op, cid, offset, B, L, oldest = header.tolist()
        if op == OP_STOP:
            if not last:
                _send(header, nxt, group)
            return
        if op == OP_STATS:
            table = _recv((world, STAT_COLS), mx.float32, prev, group)
            table[rank] = mx.array(row, dtype=mx.float32)
            if not last:
                _send(header, nxt, group)
            _send(table, nxt, group)
            continue
        x = _recv((B, L, H), dtype, prev, group)
        for old in [k for k in caches if k < oldest]:
            del caches[old]  # rank 0 has let that cache go
        cache = caches.get(cid)
        if cache is None:
            cache = caches[cid] = stage.make_cache()
            while len(caches) > config.DIST_FOLLOWER_CACHES:
                caches.popitem(last=False)
        caches.move_to_end(cid)
        held = cache[block.start].offset
        if held < offset:
            raise KimiError(f"internal: rank {rank} holds {held} tokens of cache {cid}, rank 0 "
                            f"{offset}")
        for c in cache:
            c.trim(c.offset - offset)
        t0 = time.perf_counter()
        out = stage.run_stage(x, cache)
        if last:
            out = out[:, -1, :]
        mx.eval(out, [c.state for c in cache])
        dt = time.perf_counter() - t0
        row[2] += dt
        row[3] += 1
        if L == 1:
            row[0] += dt
            row[1] += 1
        if not last:
            _send(header, nxt, group)
        _send(out, nxt, group)


def load_pipeline(path, load_stage, dtype: mx.Dtype):
    """Join the group, agree on the checkpoint and the split, load this rank's block with
    `load_stage(root, stage)` (the loader's own `load`, handed in: the loader calls us); rank 0
    returns (PipelineModel, tokenizer), the other ranks follow rank 0 and exit here."""
    import os

    group = init_group()
    stop_on_sigterm()
    rank, world = group.rank(), group.size()
    root = resolve_model_path(path)
    cfg = read_json(root / "config.json")
    args = check_config(cfg, root / "config.json")
    split_text = os.environ.get("KIMI_SPLIT", "auto")
    try:
        mine = parse_split(split_text, world, args.num_hidden_layers)
    except KimiError:
        if rank == 0:
            raise
        raise SystemExit(0) from None  # rank 0 found the same and says it (one message)
    words = [int.from_bytes(config_hash(cfg)[4 * i: 4 * i + 4], "little", signed=True)
             for i in range(HASH_WORDS)]
    memory = weight_memory()
    local = words + [memory >> 20, dtype.size] + (mine or [0] * world)
    try:
        table = mx.distributed.all_gather(mx.array(local, dtype=mx.int32)[None], group=group)
        mx.eval(table)
    except RuntimeError as e:
        raise _lost(e) from None
    table = table.tolist()
    _agree(table, rank, root)
    memories = [row[HASH_WORDS] << 20 for row in table]
    sizes = mine or proportional_split(memories, layer_bytes(args))
    blocks = ranges(sizes, args.num_hidden_layers)
    model, tok = load_stage(root, blocks[rank])
    try:
        mx.eval(mx.distributed.all_sum(mx.ones(1), group=group))  # every rank has loaded
    except RuntimeError as e:
        raise PeerLost(f"another rank failed while loading its layers ({e})") from None
    if rank == 0:
        return PipelineModel(model, group, blocks, memories, dtype), tok
    import signal

    # Ctrl-C in the terminal reaches every local rank; it is rank 0's to act on (stop a reply,
    # exit), and the others end when rank 0 says so or goes away.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        follow(model, group, blocks[rank], dtype)
    except RuntimeError as e:
        raise PeerLost(f"rank 0 stopped or cannot be reached ({e})") from None
    raise SystemExit(0)


def _agree(table: list[list[int]], rank: int, root) -> None:
    """Same config.json, compute dtype and --split on every rank, or a refusal at start (said
    by rank 0; the others know it too and leave quietly)."""

    def refuse(message: str) -> Exception:
        # The others exit 0 so that mlx.launch lets rank 0 finish and report exit code 1.
        return KimiError(message) if rank == 0 else SystemExit(0)

    hashes = [tuple(row[:HASH_WORDS]) for row in table]
    if len(set(hashes)) > 1:
        odd = [r for r, h in enumerate(hashes) if h != hashes[0]]
        raise refuse(f"the ranks disagree on the checkpoint: config.json of rank "
                     f"{', '.join(map(str, odd))} differs from rank 0's ({root} here); every "
                     "machine needs the same model")
    if len({row[HASH_WORDS + 1] for row in table}) > 1:
        raise refuse("the ranks compute in different dtypes (mixed Metal and CPU machines)")
    splits = [tuple(row[HASH_WORDS + 2:]) for row in table]
    if len(set(splits)) > 1:
        raise refuse("the ranks were given different --split values; give every rank the "
                     "same one")
