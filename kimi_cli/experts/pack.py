"""The expert pack made by `kimi convert`: its format constants, block layout and a checked reader.

One file per MoE layer holds fixed-stride blocks, one per expert (gate, up, down packed words then
their scales), so a cache miss is one read; `pack.json`, written last, marks the pack complete.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import threading
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..checkpoint.layout import EXPERT_PROJS, expert_shapes
from ..checkpoint.reader import check_config
from ..errors import CheckpointError
from ..model.args import ModelArgs

PACK_FORMAT = "kimi-expert-pack"
PACK_VERSION = 1
PACK_FILE = "pack.json"
PROGRESS_FILE = ".convert-progress.json"
RESIDENT_FILE = "resident.safetensors"
EXPERTS_DIR = "experts"
# Block stride alignment (a multiple of every page size in use) and region alignment inside it.
ALIGNMENT = 16384
REGION_ALIGNMENT = 4096
CORRUPT_HINT = "; the pack is corrupt: reconvert it with `kimi convert --force`"
# Release files copied into the pack as they are, when the source has them.
METADATA_FILES = ("config.json", "generation_config.json", "tiktoken.model",
                  "tokenizer_config.json", "chat_template.jinja")
REGION_NAMES = tuple(f"{p}.weight" for p in EXPERT_PROJS) + tuple(
    f"{p}.scales" for p in EXPERT_PROJS)
_FADVISE = hasattr(os, "posix_fadvise")
_NP_DTYPES = {"uint32": np.uint32, "bfloat16": np.uint16}  # bf16 handled as raw 16-bit words

Progress = Callable[[int, int, float], None]


@dataclass(frozen=True)
class Region:
    """One tensor of an expert inside its block: raw bytes at `offset` from the block start."""

    name: str
    offset: int
    nbytes: int
    dtype: str  # "uint32" (packed int4 words) or "bfloat16" (scales)
    shape: tuple[int, int]

    def to_dict(self) -> dict:
        return {"name": self.name, "offset": self.offset, "nbytes": self.nbytes,
                "dtype": self.dtype, "shape": list(self.shape)}


@dataclass(frozen=True)
class BlockLayout:
    regions: tuple[Region, ...]
    block_bytes: int  # unpadded end of the last region: what the checksum covers
    stride: int  # block_bytes rounded up to ALIGNMENT


def align_up(n: int, a: int) -> int:
    return (n + a - 1) // a * a


def block_layout(args: ModelArgs) -> BlockLayout:
    """Where each expert tensor sits inside a block; depends only on the config's dimensions."""
    shapes = expert_shapes(args)
    gs = args.group_size
    regions, end = [], 0
    for name in REGION_NAMES:
        proj, kind = name.split(".")
        rows, cols = shapes[proj]
        if kind == "weight":
            shape, dtype, nbytes = (rows, cols // 8), "uint32", rows * cols // 2
        else:
            shape, dtype, nbytes = (rows, cols // gs), "bfloat16", 2 * rows * (cols // gs)
        offset = align_up(end, REGION_ALIGNMENT)
        regions.append(Region(name, offset, nbytes, dtype, shape))
        end = offset + nbytes
    return BlockLayout(tuple(regions), end, align_up(end, ALIGNMENT))


def layer_file_name(layer: int) -> str:
    return f"{EXPERTS_DIR}/layer-{layer:03d}.bin"


def moe_layers(args: ModelArgs) -> list[int]:
    return [i for i in range(args.num_hidden_layers) if args.is_moe_layer(i)]


def snapshot_revision(path: Path) -> str | None:
    """The commit hash of a Hugging Face cache snapshot directory (`.../snapshots/<hash>`)."""
    return path.name if path.parent.name == "snapshots" else None


def file_sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def is_pack_dir(path: str | os.PathLike) -> bool:
    """A complete pack (its pack.json exists); `open_pack` then checks the rest."""
    return (Path(path) / PACK_FILE).is_file()


@dataclass(frozen=True)
class LayerEntry:
    file: Path
    n_experts: int
    checksums: tuple[int, ...]


class Pack:
    """An opened, size-checked pack. Reads are thread-safe (`pread` on one fd per layer file)."""

    def __init__(self, path: Path, meta: dict, config: dict, args: ModelArgs,
                 layout: BlockLayout, layers: dict[int, LayerEntry], resident_file: Path,
                 page_cache: bool = True):
        self.path = path
        # False: reads bypass the OS page cache, which would otherwise hold a second copy of
        # every expert the cache already keeps (F_NOCACHE on macOS, DONTNEED after reads on Linux).
        self.page_cache = page_cache
        self.meta = meta
        self.config = config
        self.args = args
        self.layout = layout
        self.layers = layers
        self.resident_file = resident_file
        self._regions = {r.name: r for r in layout.regions}
        self._fds: dict[int, int] = {}
        self._lock = threading.Lock()

    @property
    def stride(self) -> int:
        return self.layout.stride

    @property
    def expert_bytes(self) -> int:
        return self.layout.block_bytes

    @property
    def regions(self) -> tuple[Region, ...]:
        return self.layout.regions

    def region(self, name: str) -> Region:
        try:
            return self._regions[name]
        except KeyError:
            raise KeyError(f"no region {name!r}; regions are {', '.join(self._regions)}") from None

    def layer_file(self, layer: int) -> Path:
        return self._entry(layer).file

    def close(self) -> None:
        with self._lock:
            fds, self._fds = self._fds, {}
        for fd in fds.values():
            os.close(fd)

    def __enter__(self) -> Pack:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass

    def read_block(self, layer: int, expert: int, out: memoryview | bytearray | None = None,
                   verify: bool = True) -> memoryview:
        """The first `expert_bytes` of an expert's block, checked against its crc32."""
        n = self.layout.block_bytes
        buf = memoryview(bytearray(n) if out is None else out).cast("B")
        if len(buf) < n:
            raise ValueError(f"read_block: buffer of {len(buf)} bytes, need {n}")
        buf = buf[:n]
        fd, entry = self._fd(layer), self._entry(layer)
        self._check_expert(entry, layer, expert)
        preadv_full(fd, [buf], expert * self.layout.stride, entry.file)
        self._after_read(fd, expert)
        if verify:
            self._check_crc(entry, layer, expert, zlib.crc32(buf))
        return buf

    def read_into(self, layer: int, expert: int, dest: dict[str, np.ndarray],
                  verify: bool = True) -> int:
        """Read one expert in a single `preadv` straight into `dest`'s arrays (region name ->
        C-contiguous array of the region's size, e.g. a cache slot). Regions missing from `dest`
        are added as new arrays (uint32 words, bf16 scales as uint16 bits). Returns bytes read."""
        fd, entry = self._fd(layer), self._entry(layer)
        self._check_expert(entry, layer, expert)
        views, pos = [], 0
        for r in self.layout.regions:
            if r.offset > pos:
                views.append(memoryview(bytearray(r.offset - pos)))
            arr = dest.get(r.name)
            if arr is None:
                arr = dest[r.name] = np.empty(r.shape, _NP_DTYPES[r.dtype])
            if not arr.flags.c_contiguous or arr.nbytes != r.nbytes:
                raise ValueError(f"read_into: {r.name} needs a C-contiguous {r.nbytes}-byte "
                                 f"array, got {arr.nbytes} bytes")
            views.append(memoryview(arr).cast("B"))
            pos = r.offset + r.nbytes
        preadv_full(fd, views, expert * self.layout.stride, entry.file)
        self._after_read(fd, expert)
        if verify:
            crc = 0
            for v in views:
                crc = zlib.crc32(v, crc)
            self._check_crc(entry, layer, expert, crc)
        return self.layout.block_bytes

    def verify(self, progress: Progress | None = None) -> None:
        """Check every block's checksum and the resident file's; one error listing the bad ones."""
        t0 = time.monotonic()
        total = sum(e.n_experts for e in self.layers.values()) * self.layout.block_bytes
        total += self.meta["resident"]["nbytes"]
        done, bad = 0, []
        buf = memoryview(bytearray(self.layout.block_bytes))
        for layer, entry in sorted(self.layers.items()):
            for e in range(entry.n_experts):
                try:
                    self.read_block(layer, e, buf)
                except CheckpointError as err:
                    bad.append(str(err).removesuffix(CORRUPT_HINT))  # said once, at the end
                done += self.layout.block_bytes
                if progress:
                    progress(done, total, time.monotonic() - t0)
        expected = self.meta["resident"].get("crc32")
        if expected is not None:
            crc = 0
            with open(self.resident_file, "rb") as f:
                while chunk := f.read(64 << 20):
                    crc = zlib.crc32(chunk, crc)
                    done += len(chunk)
                    if progress:
                        progress(done, total, time.monotonic() - t0)
            if crc != expected:
                bad.append(f"{self.resident_file}: fails its checksum (crc32 {crc:08x}, "
                           f"expected {expected:08x})")
        if bad:
            more = f" (and {len(bad) - 5} more)" if len(bad) > 5 else ""
            raise CheckpointError("; ".join(bad[:5]) + more + CORRUPT_HINT)

    # -- internals -----------------------------------------------------------------------------

    def _entry(self, layer: int) -> LayerEntry:
        try:
            return self.layers[layer]
        except KeyError:
            raise KeyError(f"layer {layer} has no routed experts in this pack") from None

    @staticmethod
    def _check_expert(entry: LayerEntry, layer: int, expert: int) -> None:
        if not 0 <= expert < entry.n_experts:
            raise IndexError(f"layer {layer}: expert {expert} out of range 0..{entry.n_experts - 1}")

    def _check_crc(self, entry: LayerEntry, layer: int, expert: int, crc: int) -> None:
        want = entry.checksums[expert]
        if crc != want:
            raise CheckpointError(
                f"{entry.file}: layer {layer} expert {expert} fails its checksum "
                f"(crc32 {crc:08x}, expected {want:08x})" + CORRUPT_HINT)

    def _after_read(self, fd: int, expert: int) -> None:
        if not self.page_cache and _FADVISE:
            os.posix_fadvise(fd, expert * self.layout.stride, self.layout.stride,
                             os.POSIX_FADV_DONTNEED)

    def _fd(self, layer: int) -> int:
        fd = self._fds.get(layer)
        if fd is not None:
            return fd
        with self._lock:
            fd = self._fds.get(layer)
            if fd is None:
                entry = self._entry(layer)
                try:
                    fd = os.open(entry.file, os.O_RDONLY)
                except OSError as e:
                    raise CheckpointError(f"{entry.file}: cannot open ({e.strerror})") from None
                if not self.page_cache and hasattr(fcntl, "F_NOCACHE"):
                    fcntl.fcntl(fd, fcntl.F_NOCACHE, 1)
                self._fds[layer] = fd
        return fd


def preadv_full(fd: int, views: list[memoryview], offset: int, path: Path,
                fix: str = "reconvert with `kimi convert --force`") -> None:
    """Fill `views` from `offset` (several `preadv` calls if the kernel returns short counts);
    a file that ends early is reported as truncated, with `fix` saying what to do."""
    want = sum(len(v) for v in views)
    got = 0
    while views:
        if hasattr(os, "preadv"):
            n = os.preadv(fd, views, offset + got)
        else:  # pragma: no cover - platforms without preadv
            data = os.pread(fd, len(views[0]), offset + got)
            n = len(data)
            views[0][:n] = data
        if n == 0:
            raise CheckpointError(f"{path}: truncated (wanted {want} bytes at {offset}, file "
                                  f"ends after {got}); {fix}")
        got += n
        while views and n >= len(views[0]):
            n -= len(views[0])
            views = views[1:]
        if views and n:
            views = [views[0][n:], *views[1:]]


def open_pack(path: str | os.PathLike, *, page_cache: bool = True) -> Pack:
    """Open a complete pack directory, checking pack.json, config.json and every file's size.
    `page_cache=False` keeps expert reads out of the OS page cache (for the expert cache)."""
    path = Path(path).expanduser()
    if not path.is_dir():
        raise CheckpointError(f"{path}: no such directory")
    meta_path = path / PACK_FILE
    if not meta_path.is_file():
        if (path / PROGRESS_FILE).exists():
            raise CheckpointError(f"{path}: incomplete pack: rerun `kimi convert` to finish it")
        raise CheckpointError(f"{path}: not an expert pack (no {PACK_FILE}); "
                              "make one with `kimi convert`")
    try:
        meta = json.loads(meta_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{meta_path}: not valid JSON ({e})") from None
    if not isinstance(meta, dict) or meta.get("format") != PACK_FORMAT:
        raise CheckpointError(f"{meta_path}: not a {PACK_FORMAT} index")
    if meta.get("version") != PACK_VERSION:
        raise CheckpointError(f"{meta_path}: pack format version {meta.get('version')} is not "
                              f"supported (expected {PACK_VERSION}); reconvert with "
                              "`kimi convert --force`")
    config_path = path / "config.json"
    try:
        config_bytes = config_path.read_bytes()
        config = json.loads(config_bytes)
    except FileNotFoundError:
        raise CheckpointError(f"{config_path}: file is missing") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{config_path}: not valid JSON ({e})") from None
    args = check_config(config, config_path)
    try:
        want_sha = meta["source"]["config_sha256"]
        layout = block_layout(args)
        if ([r.to_dict() for r in layout.regions] != meta["expert_regions"]
                or meta["stride"] != layout.stride or meta["block_bytes"] != layout.block_bytes):
            raise CheckpointError(f"{meta_path}: block layout does not match config.json; "
                                  "reconvert with `kimi convert --force`")
        layers = {}
        for key, entry in meta["layers"].items():
            layers[int(key)] = LayerEntry(path / entry["file"], int(entry["n_experts"]),
                                          tuple(int(c) for c in entry["checksums"]))
        resident = path / meta["resident"]["file"]
        resident_nbytes = int(meta["resident"]["nbytes"])
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise CheckpointError(f"{meta_path}: malformed pack index ({e!r})") from None
    if hashlib.sha256(config_bytes).hexdigest() != want_sha:
        raise CheckpointError(f"{config_path}: does not match the config the pack was made "
                              "from; reconvert with `kimi convert --force`")
    if sorted(layers) != moe_layers(args):
        raise CheckpointError(f"{meta_path}: layers {sorted(layers)} do not match config.json's "
                              "MoE layers")
    for layer, entry in layers.items():
        if entry.n_experts != args.n_routed_experts or len(entry.checksums) != entry.n_experts:
            raise CheckpointError(f"{meta_path}: layer {layer} lists {entry.n_experts} experts "
                                  f"and {len(entry.checksums)} checksums, expected "
                                  f"{args.n_routed_experts}")
        _check_size(entry.file, entry.n_experts * layout.stride)
    _check_size(resident, resident_nbytes)
    return Pack(path, meta, config, args, layout, layers, resident, page_cache)


def _check_size(path: Path, expected: int) -> None:
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        raise CheckpointError(f"{path}: file is missing; reconvert with "
                              "`kimi convert --force`") from None
    if size != expected:
        what = "truncated" if size < expected else "too long"
        raise CheckpointError(f"{path}: {what} ({size} bytes, expected {expected}); "
                              "reconvert with `kimi convert --force`")
