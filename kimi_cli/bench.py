"""`kimi bench`: llama-bench style speed tests (pp, tg, depth, repeats) with memory, expert-cache
stats and the decode bandwidth floor of this machine, optionally next to mlx-lm on the same files.

Also the reusable measuring pieces (machine, memory bandwidth, bytes read per decode token) that
scripts/bench_vs_mlx_lm.py and `kimi info` use.
"""

from __future__ import annotations

import csv
import gc
import io
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import IO

import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten

from . import config
from .errors import KimiError, UsageError

# Path components that name a layer's stacked routed experts (ours / mlx-lm's SwitchGLU).
ROUTED_EXPERT_PARTS = {"experts", "switch_mlp"}
# Copy buffers for the bandwidth measurement: larger than any last-level cache in use.
BANDWIDTH_MB = 128
BANDWIDTH_TRIES = 3
N_SPECIAL_TOKENS = 256  # the release's reserved ids at the top of the vocabulary
COMPARE_CHOICES = ("mlx-lm",)


# ---------------------------------------------------------------------------------------------
# Machine


def cpu_model() -> str:
    """The chip (Apple M3 Max, ...) or the CPU model name."""
    if sys.platform == "darwin":
        try:
            out = subprocess.run(["sysctl", "-n", "machdep.cpu.brand_string"],
                                 capture_output=True, text=True, timeout=5).stdout.strip()
            if out:
                return out
        except (OSError, subprocess.SubprocessError):
            pass
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_memory() -> int:
    from .experts.cache import _machine_memory

    return _machine_memory()


def backend() -> str:
    return "metal" if mx.default_device() == mx.gpu else "cpu"


def compute_dtype() -> mx.Dtype:
    """The dtype `kimi_cli.loader.default_dtype` computes in (float32 on the CPU backend, bf16 on
    Metal), without importing the loader and with it mlx-lm (seconds of imports for `info`)."""
    return mx.float32 if mx.default_device() == mx.cpu else mx.bfloat16


def machine_info(bandwidth: dict | None = None) -> dict:
    """Chip, cores, memory, backend and versions; with a bandwidth measurement if given."""
    try:
        import mlx_lm

        mlx_lm_version = mlx_lm.__version__
    except ImportError:  # pragma: no cover
        mlx_lm_version = None
    info = {
        "chip": cpu_model(),
        "cores": os.cpu_count(),
        "memory_gb": round(machine_memory() / 1e9, 2),
        "backend": backend(),
        "device": str(mx.default_device()),
        "metal": mx.metal.is_available(),
        "mlx": mx.__version__,
        "mlx_lm": mlx_lm_version,
        "platform": platform.platform(),
        "python": platform.python_version(),
    }
    if info["metal"]:
        try:
            info["gpu"] = mx.device_info().get("device_name")
        except Exception:  # noqa: BLE001 - informational only
            pass
    if bandwidth is not None:
        info["memory_bandwidth_gbps"] = round(bandwidth["gbps"], 2)
        info["bandwidth"] = bandwidth
    return info


def measure_bandwidth(mb: int = BANDWIDTH_MB, tries: int = BANDWIDTH_TRIES) -> dict:
    """Copy bandwidth (bytes read + written per second), best of `tries`, with NumPy (CPU) and
    MLX (the default device: the GPU on Apple Silicon); the floor uses the faster of the two."""
    n = mb * (1 << 20) // 4
    src = np.ones(n, dtype=np.float32)
    dst = np.ones(n, dtype=np.float32)  # touched, so no page faults inside the timing
    best_np = min(_timed(lambda: np.copyto(dst, src)) for _ in range(tries))
    a = mx.ones((n,), dtype=mx.float32)
    mx.eval(a)
    best_mx = min(_timed(lambda: mx.eval(a + 0)) for _ in range(tries + 1))
    moved = 2 * n * 4
    res = {"numpy_copy_gbps": moved / best_np / 1e9, "mlx_copy_gbps": moved / best_mx / 1e9,
           "buffer_mb": mb, "tries": tries}
    res["used"] = "numpy" if res["numpy_copy_gbps"] >= res["mlx_copy_gbps"] else "mlx"
    res["gbps"] = max(res["numpy_copy_gbps"], res["mlx_copy_gbps"])
    mx.clear_cache()  # the buffers are freed on return; drop MLX's cached copy too
    return res


def given_bandwidth(gbps: float | None) -> dict | None:
    """A bandwidth the user states (--bandwidth), in measure_bandwidth's shape."""
    if gbps is None:
        return None
    return {"gbps": gbps, "used": "given", "buffer_mb": None, "tries": 0}


def _timed(fn: Callable[[], object]) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


# ---------------------------------------------------------------------------------------------
# Bytes touched per decode token


def weight_bytes_per_token(model, top_k: int, n_experts: int) -> dict[str, int]:
    """Bytes of parameters one decode token reads, by walking `model.parameters()`.

    Dense weights (attention, dense MLP, shared experts, router, norms, lm_head) are read whole;
    a layer's stacked routed experts [E, ...] only for the top_k chosen; the embedding is a
    gather of one row. Layers streamed through an expert cache read top_k slots of their pool.
    """
    out = {"dense": 0, "routed_experts": 0, "embedding_row": 0}
    for name, arr in tree_flatten(model.parameters()):
        parts = name.split(".")
        if "embed_tokens" in parts:
            out["embedding_row"] += arr.nbytes // arr.shape[0]
        elif ROUTED_EXPERT_PARTS & set(parts):
            if arr.shape[0] != n_experts:
                raise ValueError(f"{name}: leading dim {arr.shape[0]} is not {n_experts} experts")
            out["routed_experts"] += arr.nbytes // n_experts * top_k
        else:
            out["dense"] += arr.nbytes
    cache = getattr(model, "expert_cache", None)
    if cache is not None:
        for pool in cache.pools.values():
            per_slot = sum(a.nbytes // a.shape[0] for a in pool.arrays.values())
            out["routed_experts"] += per_slot * top_k
    out["total"] = out["dense"] + out["routed_experts"] + out["embedding_row"]
    return out


def cache_bytes_per_token(cache: list) -> float:
    """KV bytes per cached token (all layers), from the cache's own state arrays [..., T, D]."""
    total = 0.0
    for c in cache:
        total += sum(a.nbytes / a.shape[-2] for a in _arrays(c.state)
                     if a.ndim >= 3 and a.shape[-2])
    return total


def decode_floor_tps(weight_bytes: int, kv_per_token: float, depth: float,
                     bandwidth_gbps: float) -> float:
    """Memory-bound ceiling on decode speed: bandwidth over the bytes one token must read."""
    return bandwidth_gbps * 1e9 / (weight_bytes + kv_per_token * depth)


def _arrays(state) -> list:
    items = state if isinstance(state, list | tuple) else [state]
    return [a for a in items if isinstance(a, mx.array)]


# ---------------------------------------------------------------------------------------------
# Tests


@dataclass(frozen=True)
class Test:
    kind: str  # "pp" (prompt processing) or "tg" (text generation)
    tokens: int
    depth: int = 0
    batch: int = 1  # tg: sequences decoded together (tokens each)

    @property
    def name(self) -> str:
        return (f"{self.kind}{self.tokens}" + (f"@d{self.depth}" if self.depth else "")
                + (f"x{self.batch}" if self.batch > 1 else ""))

    @property
    def mean_depth(self) -> float:
        """Mean cached tokens each decode step attends over (tg) ."""
        return self.depth + (self.tokens + 1) / 2


def cpu_hint(opts: BenchOptions) -> str | None:
    """A note for the CPU backend, where the default test sizes take minutes even on the demo."""
    if backend() != "cpu":
        return None
    work = (sum(opts.prompts) + 16 * sum(opts.gens) + sum(opts.depths)) * (opts.repeats + 1)
    if work < 10_000:
        return None
    return ("kimi bench: on MLX's CPU backend these test sizes can take minutes, even on the "
            "demo model; for a quick look try -p 64 -n 16 -r 2")


def parse_counts(text: str, flag: str) -> list[int]:
    """`512` or `128,512,2048`: token counts for -p, -n, -d (0 allowed: skips that test kind)."""
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise UsageError(f"{flag}: expected comma-separated integers, got {text!r}") from None
    if not values or min(values) < 0:
        raise UsageError(f"{flag}: expected non-negative integers, got {text!r}")
    return list(dict.fromkeys(values))


def plan_tests(prompts: list[int], gens: list[int], depths: list[int],
               batches: list[int] | None = None) -> list[Test]:
    """llama-bench's order: per depth, the pp tests then the tg tests (each at every batch
    size); a size of 0 is skipped."""
    tests = []
    for d in depths:
        tests += [Test("pp", p, d) for p in prompts if p > 0]
        tests += [Test("tg", n, d, b) for n in gens if n > 0 for b in batches or [1]]
    if not tests:
        raise UsageError("no tests to run: every -p and -n value is 0")
    return tests


@dataclass
class BenchOptions:
    prompts: list[int] = field(default_factory=lambda: [512])
    gens: list[int] = field(default_factory=lambda: [128])
    depths: list[int] = field(default_factory=lambda: [0])
    repeats: int = 5
    seed: int = 0
    chunk: int = config.PREFILL_CHUNK
    expert_cache: str | None = None
    prefetch: bool = True
    compare: str | None = None
    batches: list[int] = field(default_factory=lambda: [1])

    def validate(self) -> None:
        if min(self.batches) < 1:
            raise UsageError("-b/--batch: batch sizes must be at least 1")
        if self.repeats < 1:
            raise UsageError("-r/--repetitions must be at least 1")
        if self.chunk < 1:
            raise UsageError("--chunk must be at least 1")
        if self.compare is not None and self.compare not in COMPARE_CHOICES:
            raise UsageError(f"--compare: unknown {self.compare!r} (choose: "
                             f"{', '.join(COMPARE_CHOICES)})")


@dataclass
class Contender:
    name: str  # "kimi" or "mlx-lm"
    model: object
    make_cache: Callable[[], list]
    dtype: str
    weight_bytes: dict = field(default_factory=dict)
    kv_per_token: float = 0.0
    top_k_experts: tuple[int, int] = (1, 1)  # (top_k, routed experts per layer)


@dataclass
class Measured:
    tps: list[float] = field(default_factory=list)
    ttft: list[float] = field(default_factory=list)
    cache_stats: object = None  # CacheStats over the timed parts, with an expert cache


def _prefill(model, cache: list, ids: list[int], chunk: int) -> mx.array:
    logits = None
    for start in range(0, len(ids), chunk):
        logits = model(mx.array(ids[start : start + chunk])[None], cache=cache)[:, -1, :]
        mx.eval(logits, [a for c in cache for a in _arrays(c.state)])
    return logits


def _run_pp(model, cache: list, ids: list[int], chunk: int) -> tuple[float, float]:
    t0 = time.perf_counter()
    logits = _prefill(model, cache, ids, chunk)
    t1 = time.perf_counter()
    mx.argmax(logits, axis=-1).item()
    return len(ids) / (t1 - t0), time.perf_counter() - t0


def _run_tg(model, cache: list, firsts: list[int], n: int) -> tuple[float, float]:
    """n greedy decode steps of len(firsts) rows, pipelined like mlx-lm's generate_step (step
    i+1 is queued before token i is read), with no stop token: (tokens/s over all rows, latency
    of the first step)."""

    def step(y: mx.array) -> mx.array:
        return mx.argmax(model(y, cache=cache)[:, -1, :], axis=-1)[:, None]

    y = mx.array(firsts)[:, None]
    mx.eval(y)
    t0 = time.perf_counter()
    y = step(y)
    mx.async_eval(y)
    ttft = 0.0
    for i in range(n):
        nxt = None
        if i + 1 < n:
            nxt = step(y)
            mx.async_eval(nxt)
        y.tolist()
        if i == 0:
            ttft = time.perf_counter() - t0
        y = nxt
    return len(firsts) * n / (time.perf_counter() - t0), ttft


def _batch_cache(single: list, rows: int) -> list:
    """`rows` copies of one sequence's cache as one batch (every row at the same depth)."""
    return [type(c).batched([c] * rows) for c in single]


def _trim_to(cache: list, n: int) -> bool:
    from mlx_lm.models.cache import can_trim_prompt_cache, trim_prompt_cache

    offset = cache[0].offset if cache else 0
    if offset == n:
        return True
    if not can_trim_prompt_cache(cache):
        return False
    trim_prompt_cache(cache, offset - n)
    return True


def measure(c: Contender, test: Test, rng_seed: int, vocab: int, repeats: int, chunk: int,
            log: Callable[[str], None]) -> Measured:
    """One warm-up run, then `repeats` timed runs of `test`; the depth is prefilled once (not
    timed) and the cache trimmed back to it between runs."""
    rng = np.random.default_rng([rng_seed, test.depth])
    depth_ids = rng.integers(0, vocab, size=test.depth).tolist()
    rng = np.random.default_rng([rng_seed, test.depth, test.tokens])
    prompt = rng.integers(0, vocab, size=test.tokens if test.kind == "pp" else
                          test.batch).tolist()
    model = c.model
    expert_cache = getattr(model, "expert_cache", None)
    out = Measured()
    cache = None
    for r in range(repeats + 1):
        if cache is None or not _trim_to(cache, test.depth):
            cache = c.make_cache()
            if depth_ids:
                _prefill(model, cache, depth_ids, chunk)
        before = _cache_totals(expert_cache) if expert_cache is not None else None
        if test.kind == "pp":
            tps, ttft = _run_pp(model, cache, prompt, chunk)
        elif test.batch > 1:
            tps, ttft = _run_tg(model, _batch_cache(cache, test.batch), prompt, test.tokens)
        else:
            tps, ttft = _run_tg(model, cache, prompt[:1], test.tokens)
        if r == 0:
            continue  # warm-up
        if expert_cache is not None:
            out.cache_stats = _add_stats(out.cache_stats, _cache_delta(before, expert_cache))
        if c.kv_per_token == 0.0:
            c.kv_per_token = cache_bytes_per_token(cache)
        out.tps.append(tps)
        out.ttft.append(ttft)
        log(f"kimi bench: {c.name} {test.name} run {r}/{repeats}: {tps:.2f} tok/s")
    del cache
    return out


# Expert-cache stats of the timed parts only (the warm-up and depth prefill are left out).


def _cache_totals(cache) -> tuple[dict, int, float]:
    s = cache.stats
    return ({k: replace(v) for k, v in s.layers.items()}, s.tokens, s.read_busy_seconds)


def _cache_delta(before: tuple[dict, int, float], cache):
    from .experts.cache import CacheStats, LayerStats

    layers0, tokens0, busy0 = before
    s = cache.stats
    layers = {}
    for k, v in s.layers.items():
        b = layers0.get(k, LayerStats())
        layers[k] = LayerStats(**{f: getattr(v, f) - getattr(b, f)
                                  for f in LayerStats.__dataclass_fields__})
    return CacheStats(layers=layers, tokens=s.tokens - tokens0,
                      read_busy_seconds=s.read_busy_seconds - busy0,
                      resident_bytes=s.resident_bytes, slots=dict(s.slots))


def _add_stats(acc, delta):
    if acc is None:
        return delta
    for k, v in delta.layers.items():
        acc.layers.setdefault(k, type(v)()).add(v)
    acc.tokens += delta.tokens
    acc.read_busy_seconds += delta.read_busy_seconds
    return acc


# ---------------------------------------------------------------------------------------------
# Loading the contenders


def load_kimi(path: Path, opts: BenchOptions) -> Contender:
    from .loader import load

    model, _ = load(path, expert_cache=opts.expert_cache, prefetch=opts.prefetch)
    dtype = _param_dtype(model)
    return Contender("kimi", model, model.make_cache, dtype)


def load_mlx_lm(path: Path) -> Contender:
    from mlx_lm.models.cache import make_prompt_cache
    from mlx_lm.utils import load_model

    model, _ = load_model(path)
    return Contender("mlx-lm", model, lambda: make_prompt_cache(model), _param_dtype(model))


def check_mlx_lm_fits(path: Path) -> None:
    """mlx-lm keeps the whole model resident: refuse before it swaps the machine to a halt."""
    from .experts.pack import is_pack_dir

    if is_pack_dir(path):
        raise UsageError(f"--compare mlx-lm: {path} is an expert pack (kimi convert), which "
                         "mlx-lm cannot load; compare on the release checkpoint it was made from")
    size = sum(f.stat().st_size for f in path.glob("*.safetensors"))
    need = int(size * 1.11)  # MLX's affine layout adds a bias per int4 group (27.5 vs 24.8 MB)
    have = machine_memory()
    if need > 0.9 * have:
        raise KimiError(f"--compare mlx-lm: mlx-lm needs the whole model resident (~{need / 1e9:.0f}"
                        f" GB in MLX's layout) and this machine has {have / 1e9:.0f} GB; compare "
                        "on a checkpoint that fits")


def _param_dtype(model) -> str:
    counts: dict[str, int] = {}
    for _, a in tree_flatten(model.parameters()):
        if mx.issubdtype(a.dtype, mx.floating):
            key = str(a.dtype).removeprefix("mlx.core.")
            counts[key] = counts.get(key, 0) + a.size
    return max(counts, key=counts.get) if counts else "?"


def _release(c: Contender) -> None:
    cache = getattr(c.model, "expert_cache", None)
    if cache is not None:
        cache.close()
    c.model = None
    gc.collect()
    mx.clear_cache()


# ---------------------------------------------------------------------------------------------
# The run


def run_bench(path: Path, name: str, opts: BenchOptions,
              log: Callable[[str], None] = lambda s: None,
              on_result: Callable[[dict], None] | None = None,
              bandwidth: dict | None = None) -> dict:
    """Measure every test on our model (and mlx-lm with `compare`); the report as a dict."""
    from .checkpoint.reader import check_config, read_json
    from .experts.pack import is_pack_dir

    opts.validate()
    tests = plan_tests(opts.prompts, opts.gens, opts.depths, opts.batches)
    args = check_config(read_json(path / "config.json"), path / "config.json")
    if opts.compare == "mlx-lm":
        check_mlx_lm_fits(path)
    vocab = max(1, args.vocab_size - N_SPECIAL_TOKENS)  # random ordinary tokens: never EOS

    if bandwidth is None:
        log("kimi bench: measuring memory bandwidth ...")
    bw = bandwidth or measure_bandwidth()
    report = {
        "machine": machine_info(bw),
        "model": {"name": name, "path": str(path), "pack": is_pack_dir(path),
                  "layers": args.num_hidden_layers, "hidden_size": args.hidden_size,
                  "experts": args.n_routed_experts, "experts_per_token": args.num_experts_per_tok},
        "settings": {"repeats": opts.repeats, "prefill_chunk": opts.chunk, "seed": opts.seed,
                     "expert_cache": opts.expert_cache, "compare": opts.compare,
                     "batches": opts.batches,
                     "prompt_tokens": "random ordinary tokens (no special ids: EOS never "
                                      "sampled as input); greedy decode, no stop token"},
        "contenders": {},
        "results": [],
    }
    loaders = [("kimi", lambda: load_kimi(path, opts))]
    if opts.compare == "mlx-lm":
        loaders.append(("mlx-lm", lambda: load_mlx_lm(path)))
    for label, loader in loaders:
        log(f"kimi bench: loading {path} ({label}) ...")
        t0 = time.perf_counter()
        c = loader()
        load_s = time.perf_counter() - t0
        c.weight_bytes = weight_bytes_per_token(c.model, args.num_experts_per_tok,
                                                args.n_routed_experts)
        c.top_k_experts = (args.num_experts_per_tok, args.n_routed_experts)
        for test in tests:
            if test.batch > 1 and c.name != "kimi":
                continue  # batches run on our latent cache only
            mx.clear_cache()
            mx.reset_peak_memory()
            m = measure(c, test, opts.seed, vocab, opts.repeats, opts.chunk, log)
            row = _result(c, test, m, bw["gbps"], mx.get_peak_memory() / 1e9)
            report["results"].append(row)
            if on_result is not None:
                on_result(row)
        report["contenders"][c.name] = {
            "dtype": c.dtype, "load_seconds": round(load_s, 3),
            "weight_bytes_per_token": c.weight_bytes,
            "kv_bytes_per_token": c.kv_per_token,
            "decode_floor_tps_at_d0": decode_floor_tps(c.weight_bytes["total"], c.kv_per_token,
                                                       1, bw["gbps"]),
        }
        if hasattr(c.model, "distributed_stats"):  # pipelined over several ranks
            report["distributed"] = c.model.distributed_stats()
        _release(c)
    if opts.compare:
        _add_ratios(report)
    _add_batch_ratios(report)
    return report


def _add_batch_ratios(report: dict) -> None:
    """Each batched tg row against the same test at batch 1: aggregate speed-up."""
    single = {(r["engine"], r["n_gen"], r["n_depth"]): r for r in report["results"]
              if r["n_gen"] and r["n_batch"] == 1}
    for r in report["results"]:
        if r["n_batch"] == 1:
            continue
        base = single.get((r["engine"], r["n_gen"], r["n_depth"])) if r["n_gen"] else None
        if base is not None and base["tps_mean"] > 0:
            r["vs_b1"] = r["tps_mean"] / base["tps_mean"]


def distinct_experts(batch: int, top_k: int, n_experts: int) -> float:
    """Expected distinct experts a layer reads for `batch` tokens, were routing uniform."""
    return n_experts * (1 - (1 - top_k / n_experts) ** batch)


def _result(c: Contender, test: Test, m: Measured, bw_gbps: float, peak_gb: float) -> dict:
    mean = statistics.fmean(m.tps)
    row = {
        "engine": c.name,
        "test": test.name,
        "n_prompt": test.tokens if test.kind == "pp" else 0,
        "n_gen": test.tokens if test.kind == "tg" else 0,
        "n_depth": test.depth,
        "n_batch": test.batch,
        "tps_mean": mean,
        "tps_per_sequence": mean / test.batch,
        "tps_std": statistics.stdev(m.tps) if len(m.tps) > 1 else 0.0,
        "samples_tps": m.tps,
        "repeats": len(m.tps),
        "ttft_ms": 1e3 * statistics.fmean(m.ttft),
        "peak_memory_gb": peak_gb,
        "dtype": c.dtype,
        "bytes_per_token": None,
        "floor_tps": None,
        "achieved_over_floor": None,
    }
    if test.kind == "tg":  # decode is memory-bound; prefill is compute-bound (no memory floor)
        touched = c.weight_bytes["total"] + c.kv_per_token * test.mean_depth
        floor = decode_floor_tps(c.weight_bytes["total"], c.kv_per_token, test.mean_depth,
                                 bw_gbps)
        if test.batch > 1:  # one step reads the weights once for all rows: per token, a share
            w = c.weight_bytes
            k, E = c.top_k_experts
            experts = w["routed_experts"] / k * distinct_experts(test.batch, k, E)
            step = (w["dense"] + experts + test.batch * (w["embedding_row"]
                    + c.kv_per_token * test.mean_depth))
            touched = step / test.batch
            floor = test.batch * bw_gbps * 1e9 / step
        row.update(bytes_per_token=touched, floor_tps=floor, achieved_over_floor=mean / floor)
    if m.cache_stats is not None:
        row["expert_cache"] = m.cache_stats.to_dict(per_layer=False)
    return row


def _add_ratios(report: dict) -> None:
    theirs = {r["test"]: r for r in report["results"] if r["engine"] != "kimi"}
    report["compare"] = []
    for r in report["results"]:
        other = theirs.get(r["test"])
        if r["engine"] == "kimi" and other is not None and other["tps_mean"] > 0:
            r["vs_mlx_lm"] = r["tps_mean"] / other["tps_mean"]
            report["compare"].append({"test": r["test"], "kimi_tps": r["tps_mean"],
                                      "mlx_lm_tps": other["tps_mean"], "ratio": r["vs_mlx_lm"]})


# ---------------------------------------------------------------------------------------------
# Output


def _fmt_tps(r: dict) -> str:
    return f"{r['tps_mean']:.2f} ± {r['tps_std']:.2f}"


def _opt(v: float | None, spec: str, suffix: str = "") -> str:
    return "—" if v is None else f"{v:{spec}}{suffix}"


def _columns(report: dict) -> list[tuple[str, Callable[[dict], str]]]:
    cols: list[tuple[str, Callable[[dict], str]]] = [
        ("engine", lambda r: r["engine"]),
        ("test", lambda r: r["test"]),
        ("t/s", _fmt_tps),
        ("ttft ms", lambda r: f"{r['ttft_ms']:.1f}"),
        ("peak GB", lambda r: f"{r['peak_memory_gb']:.3f}"),
        ("floor t/s", lambda r: _opt(r["floor_tps"], ".1f")),
        ("achieved/floor", lambda r: _opt(r["achieved_over_floor"], ".1%")),
    ]
    if report["settings"]["compare"]:
        cols.append(("vs mlx-lm", lambda r: _opt(r.get("vs_mlx_lm"), ".2f", "x")))
    if any(r.get("n_batch", 1) > 1 for r in report["results"]):
        cols.insert(3, ("t/s per seq", lambda r: f"{r['tps_per_sequence']:.2f}"))
        cols.append(("vs b1", lambda r: _opt(r.get("vs_b1") if r["n_batch"] > 1 else None,
                                             ".2f", "x")))
    if any("expert_cache" in r for r in report["results"]):
        cols.append(("hit rate", lambda r: _opt(r.get("expert_cache", {}).get("hit_rate"),
                                                 ".1%")))
        cols.append(("GB read/tok", lambda r: _opt(
            r.get("expert_cache", {}).get("gb_read_per_token"), ".3f")))
    return cols


def summary_lines(report: dict) -> list[str]:
    m, md, s = report["machine"], report["model"], report["settings"]
    bw = m["bandwidth"]
    where = md["name"] if md["name"] == md["path"] else f"{md['name']} ({md['path']})"
    lines = [
        f"model: {where}{' [expert pack]' if md['pack'] else ''}: "
        f"{md['layers']} layers, {md['experts']} experts top-{md['experts_per_token']}",
        f"machine: {m['chip']}{' / ' + m['gpu'] if m.get('gpu') else ''}, {m['cores']} cores, "
        f"{m['memory_gb']:.1f} GB, backend {m['backend']}, MLX {m['mlx']}"
        + (f", mlx-lm {m['mlx_lm']}" if m.get("mlx_lm") else ""),
        f"memory bandwidth: {bw['gbps']:.1f} GB/s " + (
            "(given)" if bw["used"] == "given" else
            f"(best {bw['used']} copy of {bw['buffer_mb']} MB, bytes read + written)"),
    ]
    for name, c in report["contenders"].items():
        w = c["weight_bytes_per_token"]
        lines.append(
            f"decode floor ({name}, {c['dtype']}): {w['total'] / 1e6:.2f} MB of weights per "
            f"token ({w['dense'] / 1e6:.2f} dense + {w['routed_experts'] / 1e6:.2f} top-k "
            f"experts) + {c['kv_bytes_per_token'] / 1e3:.1f} KB per token of context -> "
            f"at most {c['decode_floor_tps_at_d0']:.1f} tok/s at depth 0")
    d = report.get("distributed")
    if d:
        blocks = ", ".join(f"rank {r['rank']}: layers {r['start']}-{r['end']} "
                           f"({r['compute_ms_per_token']:.2f} ms/token)" for r in d["ranks"])
        lines.append(f"pipeline over {d['world_size']} ranks ({d['backend']}): {blocks}; "
                     f"communication {d['comm_ms_per_token']:.2f} ms and "
                     f"{d['comm_bytes_per_token'] / 1e3:.1f} KB per decode token")
    lines.append(f"{s['repeats']} repeats after a warm-up; mean ± stddev; "
                 "floor = bandwidth / bytes read per decode token at the test's mean depth"
                 + ("; tgNxB: B sequences decoding together, t/s over all of them, the floor "
                    "with the experts of uniform routing" if max(s.get("batches") or [1]) > 1
                    else ""))
    return lines


def render_table(report: dict, out: IO) -> None:
    from rich.table import Table

    from .ui.term import can_go_live, make_console

    console = make_console(out)
    if not can_go_live(out):
        console.width = 250  # a file or pipe: one row per line, never wrapped
    cols = _columns(report)
    table = Table(show_edge=False, header_style="bold")
    for i, (name, _) in enumerate(cols):
        table.add_column(name, justify="left" if i < 2 else "right")
    for r in report["results"]:
        table.add_row(*(fn(r) for _, fn in cols))
    for line in summary_lines(report)[:-1]:
        console.print(line, highlight=False, markup=False, soft_wrap=True)
    console.print()
    console.print(table)
    console.print(summary_lines(report)[-1], highlight=False, markup=False, soft_wrap=True)


def render_md(report: dict, out: IO) -> None:
    cols = _columns(report)
    out.write("| " + " | ".join(n for n, _ in cols) + " |\n")
    out.write("|" + "|".join(":---" if i < 2 else "---:" for i in range(len(cols))) + "|\n")
    for r in report["results"]:
        out.write("| " + " | ".join(fn(r) for _, fn in cols) + " |\n")
    out.write("\n")
    for line in summary_lines(report):
        out.write(line + "\n\n")


CSV_FIELDS = ("engine", "test", "n_prompt", "n_gen", "n_depth", "n_batch", "repeats", "tps_mean",
              "tps_std", "tps_per_sequence", "vs_b1",
              "ttft_ms", "peak_memory_gb", "dtype", "bytes_per_token", "floor_tps",
              "achieved_over_floor", "vs_mlx_lm", "expert_cache_hit_rate",
              "expert_cache_gb_read_per_token", "chip", "backend", "mlx",
              "memory_bandwidth_gbps")


def render_csv(report: dict, out: IO) -> None:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=CSV_FIELDS, lineterminator="\n")
    w.writeheader()
    m = report["machine"]
    for r in report["results"]:
        ec = r.get("expert_cache") or {}
        row = {k: r.get(k) for k in CSV_FIELDS}
        row.update(expert_cache_hit_rate=ec.get("hit_rate"),
                   expert_cache_gb_read_per_token=ec.get("gb_read_per_token"),
                   chip=m["chip"], backend=m["backend"], mlx=m["mlx"],
                   memory_bandwidth_gbps=m["memory_bandwidth_gbps"])
        w.writerow({k: "" if v is None else v for k, v in row.items()})
    out.write(buf.getvalue())


def render_json(report: dict, out: IO) -> None:
    out.write(json.dumps(report, indent=2) + "\n")


def jsonl_line(obj: dict, kind: str) -> str:
    return json.dumps({"type": kind, **obj}) + "\n"
