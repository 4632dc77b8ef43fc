"""The unified-memory expert cache: per MoE layer a pool of slots, misses streamed from the pack.

Slots are stacked MLX arrays, so one gather matmul runs over slot indices; misses are read by
background threads (`os.preadv`, GIL released) straight into slot memory. Outputs are identical
to the fully resident model: the cache changes speed, never results.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import asdict, dataclass, field
from typing import Protocol

import mlx.core as mx
import numpy as np

from ..checkpoint.layout import EXPERT_PROJS, expert_shapes
from ..errors import KimiError, UsageError
from ..model.args import ModelArgs

# Reads that a block source performs: fill `dest` (region name -> writable array) for one expert.
ReadFn = Callable[[int, int, dict[str, np.ndarray]], int]


class ExpertSource(Protocol):
    """Where misses come from: the release's own shards (`experts.release`) or an expert pack
    (`experts.pack`). `read_into` fills a slot's packed words in place and adds the raw bf16
    scales to `dest`; it returns the bytes read."""

    page_cache: bool  # False: reads bypass the OS page cache

    def read_into(self, layer: int, expert: int, dest: dict[str, np.ndarray]) -> int: ...

    def close(self) -> None: ...


@dataclass
class LayerStats:
    hits: int = 0
    misses: int = 0
    bytes_read: int = 0
    read_seconds: float = 0.0  # summed over reader threads (per-read latency)
    stall_seconds: float = 0.0  # main thread waiting for reads
    sync_seconds: float = 0.0  # main thread waiting for the router's ids
    evictions: int = 0
    prefetched: int = 0
    prefetch_used: int = 0
    uses: int = 0  # (token, expert) pairs computed

    def add(self, other: LayerStats) -> None:
        for k, v in asdict(other).items():
            setattr(self, k, getattr(self, k) + v)

    @property
    def hit_rate(self) -> float:
        n = self.hits + self.misses
        return self.hits / n if n else 1.0


@dataclass
class CacheStats:
    layers: dict[int, LayerStats] = field(default_factory=dict)
    tokens: int = 0
    read_busy_seconds: float = 0.0  # wall time with at least one read in flight
    resident_bytes: int = 0
    slots: dict[int, int] = field(default_factory=dict)
    wall_seconds: float = 0.0

    def total(self) -> LayerStats:
        t = LayerStats()
        for s in self.layers.values():
            t.add(s)
        return t

    def to_dict(self, per_layer: bool = True) -> dict:
        t = self.total()
        n = max(1, self.tokens)
        d = {
            "hit_rate": t.hit_rate,
            "hits": t.hits,
            "misses": t.misses,
            "misses_per_token": t.misses / n,
            "bytes_read": t.bytes_read,
            "gb_read_per_token": t.bytes_read / n / 1e9,
            # Achieved: bytes over the wall time during which reads were in flight.
            "read_gbps": (t.bytes_read / self.read_busy_seconds / 1e9)
            if self.read_busy_seconds else 0.0,
            "read_busy_seconds": self.read_busy_seconds,
            "stall_seconds": t.stall_seconds,
            "stall_ms_per_token": 1e3 * t.stall_seconds / n,
            "sync_ms_per_token": 1e3 * t.sync_seconds / n,
            "evictions": t.evictions,
            "prefetched": t.prefetched,
            "prefetch_used": t.prefetch_used,
            "prefetch_precision": (t.prefetch_used / t.prefetched) if t.prefetched else None,
            "resident_bytes": self.resident_bytes,
            "tokens": self.tokens,
        }
        if per_layer:
            d["layers"] = {
                str(k): {**asdict(v), "hit_rate": v.hit_rate, "slots": self.slots.get(k)}
                for k, v in sorted(self.layers.items())
            }
        return d


def slot_nbytes(args: ModelArgs, dtype: mx.Dtype) -> int:
    """Bytes one expert occupies in a slot: packed words, then scales (and, for the gather_qmm
    fallback only, biases) in `dtype`. On Metal the kernels need no biases: the release's bytes."""
    from mlx_kernels import expert_bytes

    return expert_bytes(expert_shapes(args).values(), args.group_size, dtype.size)


def fmt_bytes(n: float) -> str:
    for unit, div in (("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if n >= div:
            return f"{n / div:.2f} {unit}"
    return f"{int(n)} B"


def parse_size(text: str, total: int | None = None) -> int:
    """'40GB', '512MiB', '25%' (of `total`), or a plain byte count."""
    s = text.strip().upper().replace(" ", "")
    try:
        if s.endswith("%"):
            if total is None:
                raise ValueError
            return int(total * float(s[:-1]) / 100)
        units = {"TIB": 1 << 40, "GIB": 1 << 30, "MIB": 1 << 20, "KIB": 1 << 10,
                 "TB": 10**12, "GB": 10**9, "MB": 10**6, "KB": 10**3, "T": 10**12,
                 "G": 10**9, "M": 10**6, "K": 10**3, "B": 1}
        for u, mult in units.items():
            if s.endswith(u):
                return int(float(s[: -len(u)]) * mult)
        return int(float(s))
    except ValueError:
        raise KimiError(f"bad size {text!r}: use e.g. 40GB, 512MiB or 25%") from None


class LayerPool:
    """`capacity` slots of one MoE layer's experts, as stacked arrays the gather matmul indexes."""

    def __init__(self, layer: int, args: ModelArgs, capacity: int, dtype: mx.Dtype):
        self.layer = layer
        self.capacity = capacity
        self.dtype = dtype
        gs = args.group_size
        from mlx_kernels import needs_biases

        self.arrays: dict[str, mx.array] = {}
        for proj, (rows, cols) in expert_shapes(args).items():
            self.arrays[f"{proj}.weight"] = mx.zeros((capacity, rows, cols // 8), mx.uint32)
            self.arrays[f"{proj}.scales"] = mx.zeros((capacity, rows, cols // gs), dtype)
            if needs_biases():  # only the gather_qmm fallback reads them
                self.arrays[f"{proj}.biases"] = mx.zeros((capacity, rows, cols // gs), dtype)
        mx.eval(list(self.arrays.values()))
        # Writable host views of the evaluated buffers (unified memory on Apple silicon).
        self.views = {k: np.array(v, copy=False) for k, v in self.arrays.items()}
        self.nbytes = sum(v.nbytes for v in self.arrays.values())

    def fill(self, slot: int, staged: dict[str, np.ndarray]) -> None:
        """Finish a slot after its packed words were read in place: scales and biases."""
        for proj in EXPERT_PROJS:
            s16 = staged[f"{proj}.scales"]  # raw bf16 bits as uint16
            if self.dtype == mx.float32:
                s = (s16.astype(np.uint32) << 16).view(np.float32)
                self.views[f"{proj}.scales"][slot] = s
                if f"{proj}.biases" in self.views:
                    np.multiply(s, -8.0, out=self.views[f"{proj}.biases"][slot])
            else:  # bf16 pools: copy the bits; -8*s is exact in bf16 (exponent + 3)
                self.views[f"{proj}.scales"][slot].view(np.uint16)[...] = s16
                if f"{proj}.biases" not in self.views:
                    continue
                s = (s16.astype(np.uint32) << 16).view(np.float32) * -8.0
                self.views[f"{proj}.biases"][slot].view(np.uint16)[...] = (
                    s.view(np.uint32) >> 16).astype(np.uint16)


class ExpertCache:
    """Slot pools for the streamed layers, the expert -> slot maps, eviction and the readers."""

    def __init__(self, args: ModelArgs, read_fn: ReadFn, slots: dict[int, int],
                 dtype: mx.Dtype, threads: int = 4, prefetch: bool = True,
                 freq_weight: float = 2.0, pinned: dict[int, list[int]] | None = None):
        self.args = args
        self.read_fn = read_fn
        self.dtype = dtype
        self.prefetch_enabled = prefetch
        self.freq_weight = freq_weight
        self.pools = {layer: LayerPool(layer, args, c, dtype) for layer, c in slots.items()}
        self.stats = CacheStats(slots=dict(slots))
        self.stats.resident_bytes = sum(p.nbytes for p in self.pools.values())
        E = args.n_routed_experts
        self._slot_of: dict[int, np.ndarray] = {L: np.full(E, -1, np.int64) for L in slots}
        self._expert_in: dict[int, np.ndarray] = {L: np.full(c, -1, np.int64)
                                                   for L, c in slots.items()}
        self._last: dict[int, np.ndarray] = {L: np.zeros(c) for L, c in slots.items()}
        self._freq: dict[int, np.ndarray] = {L: np.zeros(c) for L, c in slots.items()}
        self._pinned: dict[int, set[int]] = {L: set() for L in slots}  # slots
        self.pinned_experts: dict[int, set[int]] = {L: set() for L in slots}
        self._pending: dict[tuple[int, int], tuple[int, Future]] = {}  # (L, e) -> (slot, fut)
        self._prefetched: dict[int, set[int]] = {L: set() for L in slots}
        self._counts: dict[int, np.ndarray] = {L: np.zeros(E, np.int64) for L in slots}
        self._tick = 0.0
        self._lock = threading.Lock()
        self._inflight = 0
        self._busy_since = 0.0
        self._pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="kimi-expert")
        for L in slots:
            self.stats.layers[L] = LayerStats()
        for L, experts in (pinned or {}).items():
            if L in self.pools:
                self.pin(L, experts)

    # -- public ------------------------------------------------------------------------------

    def close(self) -> None:
        self._pool.shutdown(wait=True)

    def begin_token(self, n: int = 1) -> None:
        """Called once per forward pass: advances the recency clock, counts tokens."""
        self._tick += 1
        self.stats.tokens += n
        for L in self._freq:
            self._freq[L] *= 0.98  # decayed frequency: recent popularity counts most

    def pin(self, layer: int, experts: list[int]) -> None:
        experts = list(dict.fromkeys(experts))[: max(0, self.pools[layer].capacity -
                                                      self.args.num_experts_per_tok)]
        self.acquire(layer, np.array(experts, dtype=np.int64))
        self._pinned[layer] = {int(self._slot_of[layer][e]) for e in experts}
        self.pinned_experts[layer] = set(int(e) for e in experts)

    def free_capacity(self, layer: int) -> int:
        """Slots a request may fill with experts that are not pinned."""
        return self.pools[layer].capacity - len(self._pinned[layer])

    def acquire(self, layer: int, experts: np.ndarray) -> np.ndarray:
        """Make `experts` (unique ids) resident in `layer`'s pool; return their slots."""
        pool = self.pools[layer]
        if len(experts) > pool.capacity:
            raise AssertionError("more experts than slots: split the request")
        st = self.stats.layers[layer]
        slot_of = self._slot_of[layer]
        wanted = set(int(e) for e in experts)
        waits: list[tuple[int, int, Future]] = []
        for e in experts:
            e = int(e)
            key = (layer, e)
            if key in self._pending:  # a prefetch (or earlier request) is reading it
                slot, fut = self._pending[key]
                waits.append((e, slot, fut))
                st.hits += 1
                continue
            if slot_of[e] >= 0:
                st.hits += 1
                if e in self._prefetched[layer]:
                    st.prefetch_used += 1
                    self._prefetched[layer].discard(e)
                continue
            st.misses += 1
            slot = self._victim(layer, wanted)
            waits.append((e, slot, self._start_read(layer, e, slot)))
        t0 = time.perf_counter()
        for e, slot, fut in waits:
            try:
                fut.result()
            except BaseException:
                self._pending.pop((layer, e), None)
                self._slot_of[layer][e] = -1
                self._expert_in[layer][slot] = -1
                raise
            self._pending.pop((layer, e), None)
            if e in self._prefetched[layer]:
                st.prefetch_used += 1
                self._prefetched[layer].discard(e)
        st.stall_seconds += time.perf_counter() - t0
        slots = slot_of[experts]
        self._last[layer][slots] = self._tick
        self._freq[layer][slots] += 1
        return slots

    def prefetch(self, layer: int, experts: np.ndarray) -> None:
        """Start reading likely experts of `layer` in the background (first to evict if unused)."""
        if not self.prefetch_enabled or layer not in self.pools:
            return
        slot_of = self._slot_of[layer]
        st = self.stats.layers[layer]
        budget = self.pools[layer].capacity - self.args.num_experts_per_tok
        started = 0
        for e in experts:
            e = int(e)
            if slot_of[e] >= 0 or (layer, e) in self._pending or started >= budget:
                continue
            slot = self._victim(layer, set(), prefetch=True)
            if slot < 0:
                break
            self._start_read(layer, e, slot)
            self._prefetched[layer].add(e)
            # Admitted as least recent: evicted first unless it gets used.
            self._last[layer][slot] = self._tick - 1e6
            st.prefetched += 1
            started += 1

    def add_sync_time(self, layer: int, seconds: float) -> None:
        self.stats.layers[layer].sync_seconds += seconds

    def add_uses(self, layer: int, experts: np.ndarray) -> None:
        """Count routed (token, expert) pairs: the profile that pinning uses."""
        self.stats.layers[layer].uses += experts.size
        np.add.at(self._counts[layer], experts.reshape(-1), 1)

    def profile(self, top: int | None = None) -> dict[int, list[int]]:
        """The most used experts per streamed layer, most used first (for `pinned=`)."""
        out = {}
        for L, c in self._counts.items():
            order = np.argsort(-c, kind="stable")
            order = order[c[order] > 0]
            out[L] = order[: top or self.pools[L].capacity // 2].tolist()
        return out

    # -- internals -----------------------------------------------------------------------------

    def _reap(self, layer: int) -> set[int]:
        """Forget finished background reads; a failed one leaves its slot empty. Busy slots."""
        busy = set()
        for (L, e), (slot, fut) in list(self._pending.items()):
            if L != layer:
                continue
            if not fut.done():
                busy.add(slot)
            elif fut.exception() is not None and e in self._prefetched[layer]:
                # A failed prefetch: unmap, so a demand read retries and reports the error.
                del self._pending[(L, e)]
                self._prefetched[layer].discard(e)
                self._slot_of[layer][e] = -1
                self._expert_in[layer][slot] = -1
            elif fut.exception() is None:
                del self._pending[(L, e)]
        return busy

    def _victim(self, layer: int, protect: set[int], prefetch: bool = False) -> int:
        """Least valuable slot: never one the current request needs, is pinned or is being read."""
        expert_in = self._expert_in[layer]
        busy = self._reap(layer)
        free = np.nonzero(expert_in < 0)[0]
        for s in free:
            if int(s) not in busy:
                return int(s)
        score = self._last[layer] + self.freq_weight * np.log1p(self._freq[layer])
        score = score.copy()
        for s in self._pinned[layer] | busy:
            score[s] = np.inf
        for e in protect:
            s = self._slot_of[layer][e]
            if s >= 0:
                score[s] = np.inf
        if prefetch:
            # Never evict something used this very token for a guess.
            score[self._last[layer] >= self._tick] = np.inf
        s = int(np.argmin(score))
        if not np.isfinite(score[s]):
            if prefetch:
                return -1
            # A demand request never fails because guesses are in flight: take their slots.
            if not self._reclaim_prefetch(layer, protect):
                raise AssertionError("no evictable slot")
            return self._victim(layer, protect)
        old = int(expert_in[s])
        if old >= 0:
            self._slot_of[layer][old] = -1
            self._prefetched[layer].discard(old)
            self.stats.layers[layer].evictions += 1
        expert_in[s] = -1
        return s

    def _reclaim_prefetch(self, layer: int, protect: set[int]) -> bool:
        """Free a slot held by an in-flight prefetch the request does not need: cancel a read
        still queued (it never touches the slot), else wait until a running one has finished
        writing. False when no such prefetch exists."""
        held = [(e, slot, fut) for (L, e), (slot, fut) in self._pending.items()
                if L == layer and e not in protect and e in self._prefetched[layer]
                and not fut.done()]
        for e, slot, fut in held:
            if fut.cancel():
                del self._pending[(layer, e)]
                self._prefetched[layer].discard(e)
                self._slot_of[layer][e] = -1
                self._expert_in[layer][slot] = -1
                return True
        if not held:
            return False
        t0 = time.perf_counter()
        wait([fut for _, _, fut in held], return_when=FIRST_COMPLETED)
        self.stats.layers[layer].stall_seconds += time.perf_counter() - t0
        return True  # the finished read is reaped (and its slot evictable) on the next look

    def _start_read(self, layer: int, expert: int, slot: int) -> Future:
        pool = self.pools[layer]
        self._expert_in[layer][slot] = expert
        self._slot_of[layer][expert] = slot
        self._freq[layer][slot] = 0
        st = self.stats.layers[layer]

        def work() -> None:
            t0 = time.perf_counter()
            with self._lock:
                if self._inflight == 0:
                    self._busy_since = t0
                self._inflight += 1
            n = 0
            try:
                dest = {f"{p}.weight": pool.views[f"{p}.weight"][slot] for p in EXPERT_PROJS}
                n = self.read_fn(layer, expert, dest)
                pool.fill(slot, dest)
            finally:
                t1 = time.perf_counter()
                with self._lock:
                    st.bytes_read += n
                    st.read_seconds += t1 - t0
                    self._inflight -= 1
                    if self._inflight == 0:
                        self.stats.read_busy_seconds += t1 - self._busy_since

        fut = self._pool.submit(work)
        self._pending[(layer, expert)] = (slot, fut)
        return fut


def plan_slots(args: ModelArgs, budget: int, dtype: mx.Dtype,
               per_layer: int | None = None, layers: range | None = None) -> dict[int, int]:
    """Slots per MoE layer (of `layers`, default all) for a byte budget (or `per_layer`
    slots): equal shares; {} when every expert fits."""
    layers = range(args.num_hidden_layers) if layers is None else layers
    moe_layers = [i for i in layers if args.is_moe_layer(i)]
    per_expert = slot_nbytes(args, dtype)
    E, k = args.n_routed_experts, args.num_experts_per_tok
    if per_layer is None:
        per_layer = budget // max(1, len(moe_layers)) // per_expert
    need = k * per_expert * len(moe_layers)
    if per_layer < k:
        raise KimiError(
            f"expert cache budget {fmt_bytes(budget)} is too small: it must hold at least "
            f"{k} experts per MoE layer ({fmt_bytes(need)})")
    if per_layer >= E:
        return {}
    return {L: int(per_layer) for L in moe_layers}


EXPERT_CACHE_SPELLINGS = ("a size (40GB, 512MiB), a share of machine memory (25%), a share "
                          "of the experts (25%experts), auto or off")


def parse_cache_spec(spec: str | int | None) -> tuple[str, float]:
    """`--expert-cache` as (kind, value): ("auto", 0), ("off", 0), ("bytes", n),
    ("memory", fraction of machine memory) or ("experts", fraction of each layer's experts)."""
    if spec is None:
        return "auto", 0
    if isinstance(spec, int):
        return "bytes", spec
    s = spec.strip().lower().replace(" ", "")
    if s in ("auto", "off"):
        return s, 0
    bad = UsageError(f"--expert-cache {spec!r}: use {EXPERT_CACHE_SPELLINGS}")
    for suffix, kind in (("%experts", "experts"), ("%memory", "memory"), ("%", "memory")):
        if s.endswith(suffix):
            try:
                share = float(s[: -len(suffix)])
            except ValueError:
                raise bad from None
            if not 0 < share <= 100:
                raise UsageError(f"--expert-cache {spec!r}: a share must be above 0% and at "
                                 "most 100%")
            return kind, share / 100
    try:
        n = parse_size(s)
    except KimiError:
        raise bad from None
    if n <= 0:
        raise bad
    return "bytes", n


@dataclass
class CachePlan:
    """What `--expert-cache` came to for one model: the budget, the slots, where misses come
    from. Reported on stderr when streaming and in `--format json` whenever the flag is given."""

    spec: str
    explicit: bool  # the user gave --expert-cache
    budget: int | None  # bytes; None with "off"
    slots: dict[int, int]  # streamed layer -> slots; {} when every layer's experts fit
    moe_layers: int
    n_experts: int
    slot_bytes: int
    source: str | None = None  # "release" or "pack" when streaming

    @property
    def share(self) -> float:
        if not self.slots:
            return 1.0
        return sum(self.slots.values()) / (len(self.slots) * self.n_experts)

    @property
    def slot_total(self) -> int:
        return sum(self.slots.values()) * self.slot_bytes

    def to_dict(self) -> dict:
        return {
            "spec": self.spec,
            "streaming": bool(self.slots),
            "all_layers_fit": not self.slots,
            "budget_bytes": self.budget,
            "experts_held_share": self.share,
            "slots_per_layer": (min(self.slots.values()) if self.slots else self.n_experts),
            "experts_per_layer": self.n_experts,
            "streamed_layers": len(self.slots),
            "moe_layers": self.moe_layers,
            "source": self.source,
        }

    def describe(self) -> str:
        per = min(self.slots.values())
        budget = self.budget or 0
        of = f"budget {fmt_bytes(budget)}, " if budget > 1.01 * self.slot_total else ""
        return (f"kimi: expert cache {fmt_bytes(self.slot_total)} ({of}--expert-cache "
                f"{self.spec}): {self.share:.0%} "
                f"of the experts held ({per} of {self.n_experts} per layer, {len(self.slots)} "
                f"layers); misses are read from the {self.source}")


def make_plan(args: ModelArgs, spec: str | int | None, dtype: mx.Dtype, resident_bytes: int,
              kv_bytes: int, layers: range | None = None) -> CachePlan:
    """Turn `--expert-cache` into slots: auto (the default) streams only when the resident
    model would not fit in this machine's memory; off keeps every expert resident."""
    kind, value = parse_cache_spec(spec)
    moe = sum(args.is_moe_layer(i) for i in (layers or range(args.num_hidden_layers)))
    per_expert = slot_nbytes(args, dtype)
    text = str(spec) if spec is not None else "auto"
    if isinstance(spec, int):
        text = f"{spec}B"
    plan = CachePlan(text, spec is not None, None, {}, moe, args.n_routed_experts, per_expert)
    if kind == "off":
        return plan
    per_layer = None
    if kind == "auto":
        plan.budget = default_budget(args, resident_bytes, kv_bytes)
    elif kind == "bytes":
        plan.budget = int(value)
    elif kind == "memory":
        plan.budget = int(_machine_memory() * value)
    else:
        per_layer = int(args.n_routed_experts * value)
        plan.budget = per_layer * per_expert * moe
    plan.slots = plan_slots(args, plan.budget, dtype, per_layer, layers)
    return plan


def default_budget(args: ModelArgs, resident_bytes: int, kv_bytes: int) -> int:
    """Machine memory minus resident weights, KV cache and headroom (the larger of 8 GB, 15%)."""
    total = _machine_memory()
    headroom = max(8 << 30, int(0.15 * total))
    return max(0, total - resident_bytes - kv_bytes - headroom)


def _machine_memory() -> int:
    try:
        import os

        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):  # pragma: no cover
        return 16 << 30


