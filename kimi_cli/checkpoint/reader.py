"""Reading a release-format checkpoint: config, index, safetensors headers, validated tensors.

Everything a user can get wrong (missing directory, truncated shard, missing tensor, wrong shape,
unsupported format) becomes one CheckpointError naming the file and the problem.
"""

from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import CheckpointError
from ..model.args import ModelArgs
from .layout import TensorSpec, checkpoint_specs

SUPPORTED_MODEL_TYPES = ("kimi_k2", "deepseek_v3")
DTYPE_SIZES = {"BF16": 2, "F16": 2, "F32": 4, "I32": 4, "I64": 8, "U32": 4, "U8": 1, "I8": 1,
               "F64": 8, "I16": 2, "BOOL": 1, "F8_E4M3": 1}


@dataclass(frozen=True)
class TensorInfo:
    name: str
    file: Path
    dtype: str
    shape: tuple[int, ...]
    offset: int  # absolute byte offset of the data in the file
    nbytes: int


@dataclass
class Checkpoint:
    path: Path
    config: dict
    args: ModelArgs
    tensors: dict[str, TensorInfo] = field(default_factory=dict)

    @property
    def files(self) -> list[Path]:
        return sorted({t.file for t in self.tensors.values()})

    def total_bytes(self) -> int:
        return sum(t.nbytes for t in self.tensors.values())


def read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{path}: file is missing") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from None


def read_safetensors_header(path: Path) -> dict[str, TensorInfo]:
    """Parse a safetensors header and check that every tensor's bytes are inside the file."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise CheckpointError(f"{path}: truncated (no safetensors header)")
            (n,) = struct.unpack("<Q", head)
            if n > min(size - 8, 100 << 20):
                raise CheckpointError(f"{path}: corrupt safetensors header (length {n})")
            header = json.loads(f.read(n))
    except FileNotFoundError:
        raise CheckpointError(f"{path}: shard file is missing") from None
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise CheckpointError(f"{path}: corrupt safetensors header") from None
    out = {}
    base = 8 + n
    for name, meta in header.items():
        if name == "__metadata__":
            continue
        try:
            start, end = meta["data_offsets"]
            dtype, shape = meta["dtype"], tuple(meta["shape"])
        except (KeyError, TypeError, ValueError):
            raise CheckpointError(f"{path}: corrupt header entry for {name}") from None
        expected = DTYPE_SIZES.get(dtype, 0) * _prod(shape)
        if end - start != expected and dtype in DTYPE_SIZES:
            raise CheckpointError(f"{path}: tensor {name} has {end - start} bytes, "
                                  f"expected {expected} for {dtype}{list(shape)}")
        if base + end > size:
            raise CheckpointError(
                f"{path}: truncated ({size} bytes, tensor {name} ends at {base + end}); "
                "re-download this shard"
            )
        out[name] = TensorInfo(name, path, dtype, shape, base + start, end - start)
    return out


def _prod(shape) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def check_config(config: dict, path: Path) -> ModelArgs:
    mt = config.get("model_type")
    if mt not in SUPPORTED_MODEL_TYPES:
        raise CheckpointError(f"{path}: unsupported model_type {mt!r} "
                              f"(expected one of {', '.join(SUPPORTED_MODEL_TYPES)})")
    q = config.get("quantization_config")
    if not q:
        raise CheckpointError(f"{path}: no quantization_config; expected the release's "
                              "compressed-tensors int4 experts")
    if q.get("quant_method") != "compressed-tensors" or q.get("format") != "pack-quantized":
        raise CheckpointError(
            f"{path}: unsupported quantization {q.get('quant_method')!r}/{q.get('format')!r} "
            "(expected compressed-tensors pack-quantized)")
    for name, group in (q.get("config_groups") or {}).items():
        w = group.get("weights") or {}
        ok = (w.get("num_bits") == 4 and w.get("symmetric") is True
              and w.get("strategy") == "group" and w.get("type", "int") == "int"
              and w.get("group_size") in (32, 64, 128))
        if not ok:
            raise CheckpointError(f"{path}: unsupported quantization group {name} ({w}); "
                                  "expected symmetric int4 with group_size 32")
    try:
        args = ModelArgs.from_dict(config)
    except TypeError as e:
        raise CheckpointError(f"{path}: bad config ({e})") from None
    for key in ("hidden_size", "num_hidden_layers", "num_attention_heads", "vocab_size",
                "kv_lora_rank", "q_lora_rank", "n_routed_experts", "num_experts_per_tok"):
        v = getattr(args, key)
        if not isinstance(v, int) or v <= 0:
            raise CheckpointError(f"{path}: config field {key} must be a positive integer")
    if args.hidden_size % args.group_size or args.moe_intermediate_size % args.group_size:
        raise CheckpointError(f"{path}: hidden and expert sizes must be multiples of the "
                              f"quantization group size {args.group_size}")
    return args


def open_checkpoint(path: str | Path, with_experts: bool = True, layers=None) -> Checkpoint:
    """Validate a release-format directory and index its tensors (reads headers only).
    `layers` (a `distributed.split.LayerRange`): only the tensors, so the shards, it holds."""
    path = Path(path).expanduser()
    if not path.exists():
        raise CheckpointError(f"{path}: no such directory")
    if not path.is_dir():
        raise CheckpointError(f"{path}: not a directory")
    config = read_json(path / "config.json")
    args = check_config(config, path / "config.json")

    index_path = path / "model.safetensors.index.json"
    if index_path.exists():
        index = read_json(index_path)
        weight_map = index.get("weight_map")
        if not isinstance(weight_map, dict):
            raise CheckpointError(f"{index_path}: no weight_map")
    else:
        files = sorted(path.glob("*.safetensors"))
        if not files:
            raise CheckpointError(f"{path}: no model.safetensors.index.json and no .safetensors")
        weight_map = {}
        for f in files:
            for name in read_safetensors_header(f):
                weight_map[name] = f.name

    specs = [s for s in checkpoint_specs(args, with_experts)
             if layers is None or layers.holds(s.name)]
    needed = set(weight_map.values()) if layers is None else {
        weight_map[s.name] for s in specs if s.name in weight_map}
    headers: dict[str, dict[str, TensorInfo]] = {}
    for fname in sorted(needed):
        headers[fname] = read_safetensors_header(path / fname)

    ckpt = Checkpoint(path=path, config=config, args=args)
    for spec in specs:
        ckpt.tensors[spec.name] = _find(spec, weight_map, headers, path, index_path)
    return ckpt


def _find(spec: TensorSpec, weight_map: dict, headers: dict, path: Path,
          index_path: Path) -> TensorInfo:
    fname = weight_map.get(spec.name)
    if fname is None:
        raise CheckpointError(f"{index_path}: tensor {spec.name} is missing from the index")
    info = headers[fname].get(spec.name)
    if info is None:
        raise CheckpointError(f"{path / fname}: tensor {spec.name} is missing from this shard")
    if info.shape != spec.shape:
        raise CheckpointError(f"{info.file}: tensor {spec.name} has shape {list(info.shape)}, "
                              f"expected {list(spec.shape)} from config.json")
    if info.dtype not in spec.dtypes:
        raise CheckpointError(f"{info.file}: tensor {spec.name} has dtype {info.dtype}, "
                              f"expected {' or '.join(spec.dtypes)}")
    return info


def is_release_dir(path: Path) -> bool:
    return (path / "config.json").exists() and (
        (path / "model.safetensors.index.json").exists() or any(path.glob("*.safetensors"))
    )


def hf_cache_snapshot(repo_id: str) -> Path | None:
    """The local snapshot of a Hub repo in the Hugging Face cache, without any network access."""
    try:
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import LocalEntryNotFoundError
    except ImportError:  # pragma: no cover
        return None
    try:
        return Path(snapshot_download(repo_id, local_files_only=True))
    except (LocalEntryNotFoundError, ValueError, OSError):
        return None
    except Exception:  # hub raises various errors for bad ids; a bad id is simply "not cached"
        return None


def resolve_model_path(spec: str | os.PathLike) -> Path:
    """A local directory, or a Hub repo id already in the Hugging Face cache."""
    path = Path(spec).expanduser()
    if path.exists():
        return path
    text = str(spec)
    if text.count("/") == 1 and not text.startswith((".", "/", "~")):
        snap = hf_cache_snapshot(text)
        if snap is not None:
            return snap
        raise CheckpointError(
            f"{text}: not found locally or in the Hugging Face cache; "
            f"download it with `kimi download {text}` or pass a directory")
    raise CheckpointError(f"{path}: no such directory")
