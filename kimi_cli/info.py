"""`kimi info`: what a model is, which of its files are here, whether an expert pack exists, and
whether it fits this machine (resident weights, KV cache, expert cache, expected decode speed).

Works from config.json and the index alone, so it answers before the 594 GB download.
"""

from __future__ import annotations

import json
import math
import os
import random
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from . import config
from .checkpoint.layout import checkpoint_specs
from .checkpoint.reader import DTYPE_SIZES, check_config, read_json
from .errors import CheckpointError, KimiError
from .model.args import ModelArgs

DEFAULT_CONTEXT = config.FIT_CONTEXT
HIT_RATES = (0.90, 0.99)  # the range the decode estimate spans when experts stream
# Apple's internal SSDs read 5-7 GB/s sequentially; 4-8 MB random reads in parallel get close.
ASSUMED_SSD_GBPS = 5.0
SSD_SAMPLE_BYTES = 1 << 30  # read at most this much of a pack to measure the SSD
SSD_MIN_PACK_BYTES = 4 << 30  # smaller packs sit in the page cache: a measurement would lie


@dataclass
class Located:
    kind: str  # "release" or "pack"
    path: Path
    repo: str | None = None  # the Hub repo id, when given one

    @property
    def commit(self) -> str | None:
        return self.path.name if self.path.parent.name == "snapshots" else None


def locate(spec: str | os.PathLike, fetch: bool = True) -> Located:
    """A local release or pack directory, or a Hub repo id: its cache snapshot (config.json and
    the index are fetched from the Hub when not cached and `fetch`)."""
    from .download import fetch_metadata
    from .experts.pack import is_pack_dir

    path = Path(spec).expanduser()
    if path.exists():
        if not path.is_dir():
            raise CheckpointError(f"{path}: not a directory")
        if is_pack_dir(path):
            return Located("pack", path)
        if not (path / "config.json").is_file():
            raise CheckpointError(f"{path}: no config.json (not a release or an expert pack)")
        return Located("release", path)
    text = str(spec)
    if text.count("/") == 1 and not text.startswith((".", "/", "~")):
        if not fetch:
            from .download import cached_dir

            snap = cached_dir(text)
            if snap is None:
                raise KimiError(f"{text}: not in the Hugging Face cache")
            return Located("release", snap, text)
        return Located("release", fetch_metadata(text), text)
    raise CheckpointError(f"{path}: no such directory")


# ---------------------------------------------------------------------------------------------
# Architecture


def architecture(config: dict, args: ModelArgs) -> dict:
    moe = [i for i in range(args.num_hidden_layers) if args.is_moe_layer(i)]
    h, m = args.hidden_size, args.moe_intermediate_size
    expert_params = 3 * h * m
    dense_params = sum(math.prod(s.shape) for s in checkpoint_specs(args, with_experts=False))
    k = args.num_experts_per_tok
    return {
        "model_type": args.model_type,
        "architectures": config.get("architectures"),
        "layers": args.num_hidden_layers,
        "dense_layers": args.num_hidden_layers - len(moe),
        "moe_layers": len(moe),
        "hidden_size": h,
        "attention": {"heads": args.num_attention_heads, "q_lora_rank": args.q_lora_rank,
                      "kv_lora_rank": args.kv_lora_rank, "qk_nope_head_dim":
                      args.qk_nope_head_dim, "qk_rope_head_dim": args.qk_rope_head_dim,
                      "v_head_dim": args.v_head_dim},
        "routed_experts": args.n_routed_experts,
        "experts_per_token": k,
        "shared_experts": args.n_shared_experts or 0,
        "moe_intermediate_size": m,
        "quantization": {"bits": 4, "group_size": args.group_size,
                         "method": (config.get("quantization_config") or {}).get("quant_method")},
        "vocab_size": args.vocab_size,
        "context_length": args.max_position_embeddings,
        "parameters": dense_params + len(moe) * args.n_routed_experts * expert_params,
        "active_parameters": dense_params + len(moe) * k * expert_params,
        "expert_bytes_released": _release_expert_bytes(args),
    }


def _release_expert_bytes(args: ModelArgs) -> int:
    """One routed expert as released: int4 words plus bf16 scales (shape tensors aside)."""
    h, m, g = args.hidden_size, args.moe_intermediate_size, args.group_size
    return 3 * (h * m // 2 + 2 * h * m // g)


# ---------------------------------------------------------------------------------------------
# Files


def release_files(loc: Located, args: ModelArgs) -> dict:
    """Metadata files and shards (from the index) present or missing, sizes on disk, and the
    bytes a missing shard will take (from the tensors the index puts in it)."""
    from .download import INDEX_FILE, METADATA_FILES, REQUIRED_FILES

    root = loc.path
    index_path = root / INDEX_FILE
    index = read_json(index_path) if index_path.is_file() else {}
    weight_map = index.get("weight_map") or {}
    shards = sorted(set(weight_map.values())) or sorted(p.name for p in
                                                         root.glob("*.safetensors"))
    size_of = _tensor_bytes(args)
    expected: dict[str, int] = {}
    for name, shard in weight_map.items():
        expected[shard] = expected.get(shard, 0) + size_of(name)
    meta_present = [f for f in METADATA_FILES if (root / f).is_file()]
    meta_missing = [f for f in REQUIRED_FILES if not (root / f).is_file()]
    present, missing, partial = [], [], []
    on_disk = 0
    for f in [*meta_present, *shards]:
        p = root / f
        if p.is_file():
            size = p.stat().st_size
            on_disk += size
            if f in expected and size < expected[f]:
                partial.append(f)
            else:
                present.append(f)
        elif f in shards:
            missing.append(f)
    missing_bytes = sum(expected.get(f, 0) for f in missing + partial)
    from .checkpoint.verified import is_verified

    return {
        "kind": "release",
        "shards": len(shards),
        "shards_present": sum(1 for f in shards if f in present),
        # sha256 checked by `kimi download` (or --verify) and unchanged since
        "shards_verified": sum(1 for f in shards if f in present and is_verified(root / f)),
        "present": present,
        "missing": meta_missing + missing,
        "incomplete": partial,
        "bytes_on_disk": on_disk,
        "bytes_missing": missing_bytes,  # tensor bytes; each shard adds a small header
        "release_bytes": (index.get("metadata") or {}).get("total_size"),
    }


def _tensor_bytes(args: ModelArgs):
    """name -> bytes the config implies (0 for names it does not know); every routed expert
    has the same tensors, so they are looked up by suffix instead of listing 200k names."""
    sizes = {s.name: math.prod(s.shape) * DTYPE_SIZES.get(s.dtypes[0], 1)
             for s in checkpoint_specs(args, with_experts=False)}
    moe = [i for i in range(args.num_hidden_layers) if args.is_moe_layer(i)]
    expert = {}
    if moe:
        from .checkpoint.layout import expert_specs

        for s in expert_specs(args, moe[0], 0):
            expert[s.name.split(".mlp.experts.0.", 1)[1]] = (
                math.prod(s.shape) * DTYPE_SIZES.get(s.dtypes[0], 1))

    def size_of(name: str) -> int:
        n = sizes.get(name)
        if n is not None:
            return n
        parts = name.split(".mlp.experts.", 1)
        if len(parts) == 2:
            return expert.get(parts[1].split(".", 1)[-1], 0)
        return 0

    return size_of


def pack_files(loc: Located) -> dict:
    """A pack's files against pack.json: the resident weights and one file per MoE layer."""
    meta = read_json(loc.path / "pack.json")
    want = {meta["resident"]["file"]: int(meta["resident"]["nbytes"])}
    for entry in meta["layers"].values():
        want[entry["file"]] = int(entry["n_experts"]) * int(meta["stride"])
    present, missing, partial = [], [], []
    on_disk = 0
    for f, size in sorted(want.items()):
        p = loc.path / f
        if not p.is_file():
            missing.append(f)
            continue
        have = p.stat().st_size
        on_disk += have
        (present if have == size else partial).append(f)
    return {"kind": "pack", "present": present, "missing": missing, "incomplete": partial,
            "bytes_on_disk": on_disk, "bytes_expected": sum(want.values()),
            "block_bytes": int(meta["block_bytes"]), "stride": int(meta["stride"]),
            "source": meta.get("source")}


def pack_status(loc: Located, spec: str) -> dict:
    from .experts.convert import default_pack_dir
    from .experts.pack import is_pack_dir

    if loc.kind == "pack":
        return {"path": str(loc.path), "exists": True}
    where = default_pack_dir(loc.repo or loc.path)
    exists = is_pack_dir(where)
    out = {"path": str(where), "exists": exists}
    if exists:
        out["bytes"] = sum(p.stat().st_size for p in where.rglob("*") if p.is_file())
    else:
        out["make_it"] = f"kimi convert {spec}"
    return out


# ---------------------------------------------------------------------------------------------
# Fit on this machine


def measure_ssd_gbps(pack_dir: Path, limit: int = SSD_SAMPLE_BYTES, threads: int = 4) -> float:
    """Random whole-block reads from a pack's layer files in parallel, as the expert cache
    does, with the page cache dropped first (Linux) or bypassed (macOS F_NOCACHE)."""
    meta = read_json(pack_dir / "pack.json")
    stride, block = int(meta["stride"]), int(meta["block_bytes"])
    jobs = [(pack_dir / e["file"], i * stride) for e in meta["layers"].values()
            for i in range(int(e["n_experts"]))]
    random.Random(0).shuffle(jobs)
    jobs = jobs[: max(1, limit // block)]
    fds: dict[Path, int] = {}
    for f, _ in jobs:
        if f not in fds:
            fd = os.open(f, os.O_RDONLY)
            if hasattr(os, "posix_fadvise"):
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            try:
                import fcntl

                if hasattr(fcntl, "F_NOCACHE"):
                    fcntl.fcntl(fd, fcntl.F_NOCACHE, 1)
            except OSError:
                pass
            fds[f] = fd
    lock = threading.Lock()
    done = [0]

    def work() -> None:
        buf = bytearray(block)
        while True:
            with lock:
                if not jobs:
                    return
                f, off = jobs.pop()
            n = os.preadv(fds[f], [buf], off)
            with lock:
                done[0] += n

    t0 = time.perf_counter()
    pool = [threading.Thread(target=work) for _ in range(threads)]
    for t in pool:
        t.start()
    for t in pool:
        t.join()
    seconds = time.perf_counter() - t0
    for fd in fds.values():
        os.close(fd)
    return done[0] / seconds / 1e9 if seconds > 0 else 0.0


def fit(args: ModelArgs, context: int = DEFAULT_CONTEXT, expert_cache: str | None = None,
        bandwidth_gbps: float | None = None, ssd_gbps: float | None = None,
        pack_dir: Path | None = None, hit_rates: tuple[float, float] = HIT_RATES) -> dict:
    """Memory plan and decode-speed ceilings for this machine, in the backend's compute dtype."""
    from .bench import backend, compute_dtype, cpu_model, machine_memory, measure_bandwidth
    from .experts.cache import default_budget, parse_cache_spec, plan_slots, slot_nbytes

    dtype = compute_dtype()
    dname = str(dtype).removeprefix("mlx.core.")
    memory = machine_memory()
    specs = checkpoint_specs(args, with_experts=False)
    resident = sum(math.prod(s.shape) * (4 if s.dtypes == ("F32",) else dtype.size)
                   for s in specs)
    embed = args.vocab_size * args.hidden_size * dtype.size
    kv_token = args.kv_bytes_per_token(dtype.size)
    kv = kv_token * context
    moe = [i for i in range(args.num_hidden_layers) if args.is_moe_layer(i)]
    E, k = args.n_routed_experts, args.num_experts_per_tok
    slot = slot_nbytes(args, dtype)
    all_experts = slot * E * len(moe)

    kind, value = parse_cache_spec(expert_cache)
    per_layer_slots = None  # a share of the experts fixes the slots, not the bytes
    how = "auto" if kind == "auto" else f"--expert-cache {expert_cache}"
    if kind == "auto":
        budget = default_budget(args, resident, kv)
    elif kind == "off":
        budget = all_experts
    elif kind == "memory":
        budget = int(memory * value)
    elif kind == "experts":
        per_layer_slots = int(E * value)
        budget = per_layer_slots * slot * len(moe)
    else:
        budget = int(value)
    out: dict = {
        "machine": {"chip": cpu_model(), "memory_gb": memory / 1e9, "backend": backend()},
        "dtype": dname,
        "resident_bytes": resident,
        "context": context,
        "kv_bytes_per_token": kv_token,
        "kv_bytes": kv,
        "experts_bytes": all_experts,
        "expert_slot_bytes": slot,
        "expert_cache_budget": budget,
        "expert_cache_how": how,
    }
    slots = None
    if resident + kv >= memory:
        out.update(fits=False, reason=f"the resident weights and KV cache alone "
                   f"({_b(resident + kv)}) exceed this machine's {_b(memory)}")
    else:
        try:
            slots = plan_slots(args, budget, dtype, per_layer_slots)
        except KimiError as e:
            out.update(fits=False, reason=str(e))
    if slots is not None:
        per_layer = min(slots.values()) if slots else E
        out.update(fits=True, streamed=bool(slots), experts_per_layer=per_layer,
                   expert_share=per_layer / E if E else 1.0,
                   expert_cache_bytes=per_layer * slot * len(moe) if slots else all_experts)

    if not out.get("fits"):
        return out
    if bandwidth_gbps is None:
        bw = measure_bandwidth()
        bandwidth_gbps, bw_note = bw["gbps"], f"measured, {bw['used']} copy"
    else:
        bw_note = "given"
    ssd_note = "given"
    if ssd_gbps is None:
        pack_bytes = _pack_expert_bytes(pack_dir) if pack_dir else 0
        if pack_bytes >= SSD_MIN_PACK_BYTES:
            ssd_gbps, ssd_note = measure_ssd_gbps(pack_dir), "measured on the pack"
        else:
            ssd_gbps, ssd_note = ASSUMED_SSD_GBPS, "assumed"
    dense_read = resident - embed + args.hidden_size * dtype.size  # one embedding row
    mem_bytes = dense_read + len(moe) * k * slot + kv_token * context
    block = _release_expert_bytes(args)
    est = {"bandwidth_gbps": bandwidth_gbps, "bandwidth": bw_note, "ssd_gbps": ssd_gbps,
           "ssd": ssd_note, "bytes_per_token": mem_bytes, "at_context": context}
    if out.get("fits") and out.get("streamed"):
        lo_h, hi_h = hit_rates
        rates = []
        for h in (lo_h, hi_h):
            read = len(moe) * k * (1 - h) * block
            rates.append(1 / (mem_bytes / (bandwidth_gbps * 1e9) + read / (ssd_gbps * 1e9)))
        est.update(hit_rates=[lo_h, hi_h], tps_low=rates[0], tps_high=rates[1],
                   ssd_bytes_per_token=[len(moe) * k * (1 - h) * block for h in hit_rates])
    elif out.get("fits"):
        est.update(hit_rates=[1.0, 1.0], tps_low=bandwidth_gbps * 1e9 / mem_bytes,
                   tps_high=bandwidth_gbps * 1e9 / mem_bytes, ssd_bytes_per_token=[0, 0])
    out["decode_estimate"] = est
    return out


def batch_fit(args: ModelArgs, fit_: dict, sequences: int) -> dict:
    """What a batch of `sequences` (heavy mode's trajectories) costs at the fit's context: their
    KV cache, and what the automatic expert cache budget keeps beside it."""
    from .bench import compute_dtype
    from .experts.cache import default_budget, plan_slots

    kv = sequences * fit_["kv_bytes"]
    out = {"sequences": sequences, "context": fit_["context"], "kv_bytes": kv,
           "kv_bytes_per_sequence": fit_["kv_bytes"]}
    memory = fit_["machine"]["memory_gb"] * 1e9
    if fit_["resident_bytes"] + kv >= memory:
        return {**out, "fits": False, "reason": f"with the resident weights it exceeds this "
                f"machine's {_b(memory)}"}
    budget = default_budget(args, fit_["resident_bytes"], kv)
    try:
        slots = plan_slots(args, budget, compute_dtype(), None)
    except KimiError as e:
        return {**out, "fits": False, "reason": str(e)}
    E = args.n_routed_experts
    per_layer = min(slots.values()) if slots else E
    return {**out, "fits": True, "auto_expert_cache_budget": budget,
            "auto_experts_per_layer": per_layer}


def _pack_expert_bytes(pack_dir: Path) -> int:
    try:
        meta = read_json(pack_dir / "pack.json")
        return sum(int(e["n_experts"]) for e in meta["layers"].values()) * int(meta["stride"])
    except (CheckpointError, KeyError, TypeError, ValueError):
        return 0


# ---------------------------------------------------------------------------------------------
# The report


def info(spec: str, context: int = DEFAULT_CONTEXT, expert_cache: str | None = None,
         bandwidth_gbps: float | None = None, ssd_gbps: float | None = None,
         trajectories: int = config.HEAVY_TRAJECTORIES) -> dict:
    if context < 1:
        from .errors import UsageError

        raise UsageError("--context must be at least 1")
    if trajectories < 1:
        from .errors import UsageError

        raise UsageError("--trajectories must be at least 1")
    loc = locate(spec)
    config_path = loc.path / "config.json"
    config = read_json(config_path)
    args = check_config(config, config_path)
    files = pack_files(loc) if loc.kind == "pack" else release_files(loc, args)
    pack = pack_status(loc, spec)
    pack_dir = Path(pack["path"]) if pack["exists"] else None
    return {
        "model": {"spec": spec, "kind": loc.kind, "path": str(loc.path), "repo": loc.repo,
                  "commit": loc.commit},
        "architecture": architecture(config, args),
        "files": files,
        "pack": pack,
        "fit": (f := fit(args, context, expert_cache, bandwidth_gbps, ssd_gbps, pack_dir)),
        "batch": batch_fit(args, f, trajectories),
    }


def _b(n: float) -> str:
    for unit, div in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if abs(n) >= div:
            return f"{n / div:.2f} {unit}"
    return f"{int(n)} B"


def _count(n: float) -> str:
    for unit, div in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= div:
            return f"{n / div:.2f} {unit}"
    return str(int(n))


def render_text(report: dict, out: IO) -> None:
    m, a, f, p, fit_ = (report["model"], report["architecture"], report["files"], report["pack"],
                        report["fit"])
    at = a["attention"]
    where = m["path"] if not m["repo"] else f"{m['repo']} (HF cache: {m['path']})"
    lines = [f"{where}" + (" [expert pack]" if m["kind"] == "pack" else "")]
    lines += [
        f"  architecture  {a['model_type']} ({', '.join(a['architectures'] or [])}): "
        f"{a['layers']} layers ({a['dense_layers']} dense, {a['moe_layers']} MoE), "
        f"hidden {a['hidden_size']}",
        f"  attention     MLA, {at['heads']} heads, q_lora {at['q_lora_rank']}, kv_lora "
        f"{at['kv_lora_rank']}, rope {at['qk_rope_head_dim']}",
        f"  experts       {a['routed_experts']} routed (top {a['experts_per_token']}) + "
        f"{a['shared_experts']} shared per MoE layer, {a['moe_intermediate_size']} wide, int4 "
        f"group {a['quantization']['group_size']}: {_b(a['expert_bytes_released'])} each",
        f"  parameters    {_count(a['parameters'])} total, {_count(a['active_parameters'])} "
        f"active per token; vocabulary {a['vocab_size']}, context {a['context_length']}",
    ]
    if f["kind"] == "release":
        total = (f", the index lists {_b(f['release_bytes'])} of tensors"
                 if f.get("release_bytes") else "")
        lines.append(
            f"files: {f['shards_present']} of {f['shards']} shards present "
            f"({_b(f['bytes_on_disk'])} on disk{total})"
            + (f"; {len(f['missing'])} missing ({_b(f['bytes_missing'])} to download)"
               if f["missing"] or f["incomplete"] else "; complete")
            + (("; all verified" if f["shards_verified"] == f["shards"] else
                f"; {f['shards_verified']} verified") if f.get("shards_verified") else ""))
    else:
        lines.append(f"files: pack of {_b(f['bytes_expected'])}, {_b(f['bytes_on_disk'])} on "
                     "disk" + (f"; {len(f['missing'])} missing" if f["missing"] else
                               "; complete"))
    if f["missing"]:
        more = f" and {len(f['missing']) - 3} more" if len(f["missing"]) > 3 else ""
        lines.append(f"  missing: {', '.join(f['missing'][:3])}{more}")
    if f["incomplete"]:
        lines.append(f"  incomplete: {', '.join(f['incomplete'][:3])}")
    if m["kind"] == "pack":
        lines.append(f"expert pack: this directory ({p['path']})")
    elif p["exists"]:
        lines.append(f"expert pack: {p['path']} ({_b(p['bytes'])})")
    else:
        lines.append(f"expert pack: none at {p['path']} (optional: misses stream from the "
                     f"release's shards; `{p['make_it']}` makes each miss one read)")
    mach, est = fit_["machine"], fit_.get("decode_estimate", {})
    lines.append(f"fit on this machine ({mach['chip']}, {mach['memory_gb']:.0f} GB, "
                 f"{mach['backend']}, {fit_['dtype']}):")
    lines.append(f"  resident      {_b(fit_['resident_bytes'])} (non-expert weights in "
                 f"{fit_['dtype']})")
    lines.append(f"  KV cache      {_b(fit_['kv_bytes'])} at {fit_['context']} tokens "
                 f"({_b(fit_['kv_bytes_per_token'])} per token)")
    b = report["batch"]
    lines.append(f"  batch of {b['sequences']:<4} {_b(b['kv_bytes'])} of KV cache at "
                 f"{b['context']} tokens each (--trajectories {b['sequences']}): "
                 + (f"the automatic expert cache keeps {b['auto_experts_per_layer']} of "
                    f"{a['routed_experts']} experts per layer beside it" if b["fits"]
                    else f"does not fit ({b['reason']})"))
    if not fit_.get("fits"):
        lines.append(f"  does not fit  {fit_['reason']}")
    elif fit_["streamed"]:
        lines.append(f"  expert cache  {_b(fit_['expert_cache_bytes'])} of "
                     f"{_b(fit_['experts_bytes'])} ({fit_['expert_cache_how']}): "
                     f"{fit_['experts_per_layer']} of {a['routed_experts']} experts per layer "
                     f"({fit_['expert_share']:.1%}); the rest stream from the "
                     + ("pack" if m["kind"] == "pack" else "release's shards"))
    else:
        lines.append(f"  experts       all resident: {_b(fit_['experts_bytes'])} within the "
                     f"budget of {_b(fit_['expert_cache_budget'])}")
    if "tps_low" in est:
        h0, h1 = est["hit_rates"]
        span = (f"{est['tps_low']:.1f}-{est['tps_high']:.1f} tok/s at expert-cache hit rates "
                f"{h0:.0%}-{h1:.0%}" if fit_.get("streamed") else
                f"at most {est['tps_high']:.1f} tok/s (every expert resident)")
        lines.append(f"  decode        {span}, at a context of {est['at_context']} tokens")
        lines.append(f"                ceilings: {_b(est['bytes_per_token'])} read from memory "
                     f"per token at {est['bandwidth_gbps']:.1f} GB/s ({est['bandwidth']})"
                     + (f", misses from the SSD at {est['ssd_gbps']:.1f} GB/s ({est['ssd']}),"
                        " not overlapped" if fit_.get("streamed") else "")
                     + "; compute ignored")
    for line in lines:
        out.write(line + "\n")


def render_json(report: dict, out: IO) -> None:
    out.write(json.dumps(report, indent=2) + "\n")
