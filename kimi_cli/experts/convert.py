"""`kimi convert`: repack a release checkpoint into an expert pack, one source shard at a time.

Bounded memory (a few fixed copy buffers), resumable after a crash or Ctrl-C (a progress file
updated after each fsynced shard), and complete only when `pack.json` appears, written last.
"""

from __future__ import annotations

import functools
import json
import os
import queue
import resource
import shutil
import sys
import threading
import time
import zlib
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .. import config as app_config
from ..checkpoint.layout import EXPERT_PROJS, expert_shapes
from ..checkpoint.reader import Checkpoint, TensorInfo, open_checkpoint, resolve_model_path
from ..errors import CheckpointError, KimiError
from .pack import (
    ALIGNMENT,
    EXPERTS_DIR,
    METADATA_FILES,
    PACK_FILE,
    PACK_FORMAT,
    PACK_VERSION,
    PROGRESS_FILE,
    RESIDENT_FILE,
    BlockLayout,
    Progress,
    block_layout,
    file_sha256,
    is_pack_dir,
    layer_file_name,
    moe_layers,
    snapshot_revision,
)

# Largest single read/write; with N_BUFFERS of them in flight this bounds the copy's memory.
PIECE_BYTES = 32 << 20
N_BUFFERS = 3
# Pieces above this are checksummed in parallel chunks (zlib releases the GIL) and combined.
CRC_CHUNK = 2 << 20

ShardCallback = Callable[[str, int, int, bool], None]  # (name, index 1-based, count, skipped)


@dataclass
class ConvertResult:
    path: Path
    bytes_written: int  # copied by this run (finished shards of an earlier run not included)
    bytes_total: int  # the whole pack's tensor bytes
    seconds: float
    peak_rss: int  # bytes
    shards_converted: list[str] = field(default_factory=list)
    shards_skipped: list[str] = field(default_factory=list)  # finished by an earlier run

    @property
    def throughput(self) -> float:
        """Bytes per second of this run."""
        return self.bytes_written / self.seconds if self.seconds > 0 else 0.0


@dataclass(frozen=True)
class _Copy:
    """One source tensor and where its bytes go: the resident file (layer -1) or a layer file."""

    src_offset: int
    nbytes: int
    layer: int
    dest_offset: int


@dataclass
class _Plan:
    ckpt: Checkpoint
    layout: BlockLayout
    layers: list[int]
    resident: list[TensorInfo]  # in file order
    resident_header: bytes  # 8-byte length + JSON, padded to 8
    resident_offsets: dict[str, int]  # absolute offset in the resident file
    shards: dict[str, list[tuple[str, _Copy]]]  # shard name -> (tensor name, copy) by offset
    shape_checks: dict[str, list[TensorInfo]]  # shard name -> weight_shape tensors

    @property
    def resident_nbytes(self) -> int:
        return len(self.resident_header) + sum(t.nbytes for t in self.resident)

    @property
    def layer_nbytes(self) -> int:
        return self.ckpt.args.n_routed_experts * self.layout.stride

    @property
    def needed_bytes(self) -> int:
        return self.resident_nbytes + len(self.layers) * self.layer_nbytes

    def shard_bytes(self, name: str) -> int:
        return sum(c.nbytes for _, c in self.shards[name])


def _plan(ckpt: Checkpoint) -> _Plan:
    args = ckpt.args
    layout = block_layout(args)
    regions = {r.name: r for r in layout.regions}
    resident = [t for t in ckpt.tensors.values() if ".mlp.experts." not in t.name]
    header: dict = {"__metadata__": {"format": "pt"}}
    pos = 0
    for t in resident:
        header[t.name] = {"dtype": t.dtype, "shape": list(t.shape),
                          "data_offsets": [pos, pos + t.nbytes]}
        pos += t.nbytes
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # safetensors pads the header so the data starts 8-aligned
    head = len(text).to_bytes(8, "little") + text
    offsets = {t.name: len(head) + header[t.name]["data_offsets"][0] for t in resident}

    stride = layout.stride
    sources = {f"{p}.weight_packed": f"{p}.weight" for p in EXPERT_PROJS}
    sources.update({f"{p}.weight_scale": f"{p}.scales" for p in EXPERT_PROJS})
    shards: dict[str, list[tuple[str, _Copy]]] = {f.name: [] for f in ckpt.files}
    shape_checks: dict[str, list[TensorInfo]] = {f.name: [] for f in ckpt.files}
    for t in ckpt.tensors.values():
        if t.name in offsets:
            copy = _Copy(t.offset, t.nbytes, -1, offsets[t.name])
        else:  # model.layers.L.mlp.experts.E.proj.tensor
            parts = t.name.split(".")
            layer, expert, tensor = int(parts[2]), int(parts[5]), ".".join(parts[6:])
            if tensor.endswith("weight_shape"):
                shape_checks[t.file.name].append(t)
                continue
            region = regions[sources[tensor]]
            copy = _Copy(t.offset, t.nbytes, layer, expert * stride + region.offset)
        shards[t.file.name].append((t.name, copy))
    for copies in shards.values():
        copies.sort(key=lambda nc: nc[1].src_offset)
    return _Plan(ckpt, layout, moe_layers(args), resident, head, offsets, shards, shape_checks)


# ---------------------------------------------------------------------------------------------
# crc32 of a concatenation from the crcs of its parts (zlib's crc32_combine, which Python lacks):
# crc(A + B) = Z(len B)·crc(A) xor crc(B), Z(n) the GF(2) operator of n zero bytes.


def _gf2_times(mat: tuple[int, ...], vec: int) -> int:
    out, i = 0, 0
    while vec:
        if vec & 1:
            out ^= mat[i]
        vec >>= 1
        i += 1
    return out


@functools.lru_cache(maxsize=1)
def _zero_powers() -> tuple[tuple[int, ...], ...]:
    """Z(2^k bytes) for k = 0..63."""
    one_bit = (0xEDB88320,) + tuple(1 << i for i in range(31))
    op = one_bit
    for _ in range(3):  # 1 bit -> 8 bits
        op = tuple(_gf2_times(op, op[i]) for i in range(32))
    powers = [op]
    for _ in range(63):
        op = tuple(_gf2_times(op, op[i]) for i in range(32))
        powers.append(op)
    return tuple(powers)


@functools.lru_cache(maxsize=256)
def _zero_operator(n: int) -> tuple[int, ...]:
    powers = _zero_powers()

    def apply(vec: int) -> int:
        k, m = 0, n
        while m:
            if m & 1:
                vec = _gf2_times(powers[k], vec)
            m >>= 1
            k += 1
        return vec

    return tuple(apply(1 << i) for i in range(32))


def crc32_combine(crc1: int, crc2: int, len2: int) -> int:
    """crc32 of A + B given crc32(A), crc32(B) and len(B)."""
    if len2 <= 0:
        return crc1
    return _gf2_times(_zero_operator(len2), crc1) ^ crc2


@functools.lru_cache(maxsize=64)
def _zeros_crc(n: int) -> int:
    return zlib.crc32(bytes(n))


# ---------------------------------------------------------------------------------------------
# Low-level I/O


def _pread_full(fd: int, view: memoryview, offset: int, path: Path) -> None:
    got = 0
    while got < len(view):
        n = os.preadv(fd, [view[got:]], offset + got) if hasattr(os, "preadv") else None
        if n is None:  # pragma: no cover - platforms without preadv
            data = os.pread(fd, len(view) - got, offset + got)
            n = len(data)
            view[got:got + n] = data
        if n == 0:
            raise CheckpointError(f"{path}: truncated (ends before byte {offset + len(view)}); "
                                  "re-download this shard")
        got += n


def _pwrite_full(fd: int, view: memoryview, offset: int) -> None:
    done = 0
    while done < len(view):
        done += os.pwrite(fd, view[done:], offset + done)


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # pragma: no cover - e.g. platforms that cannot open directories
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover
        pass
    finally:
        os.close(fd)


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def _drop_cache(fd: int) -> None:
    """Keep a 600 GB copy from evicting everything else from the page cache (Linux)."""
    if hasattr(os, "posix_fadvise"):
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        except OSError:  # pragma: no cover
            pass


def _preallocate(fd: int, nbytes: int) -> None:
    if os.fstat(fd).st_size == nbytes:
        return
    os.ftruncate(fd, 0)  # a fresh file is all zeros: the padding between regions
    if hasattr(os, "posix_fallocate"):
        try:
            os.posix_fallocate(fd, 0, nbytes)
            return
        except OSError:  # e.g. filesystems without fallocate
            pass
    os.ftruncate(fd, nbytes)


def peak_rss() -> int:
    """Peak resident set size of this process in bytes."""
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss if sys.platform == "darwin" else rss * 1024


class _Copier:
    """Copies a shard's tensors: a reader thread preads ahead into a few fixed buffers while the
    main thread pwrites and a small pool checksums, so reading, writing and crc32 overlap."""

    def __init__(self) -> None:
        self.buffers = [bytearray(PIECE_BYTES) for _ in range(N_BUFFERS)]
        self.pool = ThreadPoolExecutor(max_workers=max(1, min(4, os.cpu_count() or 1)),
                                       thread_name_prefix="kimi-crc")

    def close(self) -> None:
        self.pool.shutdown(wait=True)

    def copy(self, src: Path, src_fd: int, copies: list[_Copy], dest_fds: dict[int, int],
             on_bytes: Callable[[int], None]) -> list[int]:
        """Copy every tensor; return each one's crc32."""
        pieces = [(i, off, min(PIECE_BYTES, c.nbytes - off))
                  for i, c in enumerate(copies) for off in range(0, c.nbytes, PIECE_BYTES)]
        free: queue.Queue = queue.Queue()
        for b in self.buffers:
            free.put(b)
        filled: queue.Queue = queue.Queue()
        stop = threading.Event()

        def read_ahead() -> None:
            try:
                for i, off, n in pieces:
                    buf = free.get()
                    if stop.is_set():
                        return
                    view = memoryview(buf)[:n]
                    _pread_full(src_fd, view, copies[i].src_offset + off, src)
                    filled.put((i, view, buf, off))
                filled.put(None)
            except BaseException as e:  # handed to the main thread, which raises it
                filled.put(e)

        reader = threading.Thread(target=read_ahead, name="kimi-read", daemon=True)
        reader.start()
        crcs = [0] * len(copies)
        try:
            while (item := filled.get()) is not None:
                if isinstance(item, BaseException):
                    raise item
                i, view, buf, off = item
                c = copies[i]
                n = len(view)
                chunks = [view[a:a + CRC_CHUNK] for a in range(0, n, CRC_CHUNK)]
                futures = ([self.pool.submit(zlib.crc32, ch) for ch in chunks]
                           if n >= (1 << 20) else None)
                _pwrite_full(dest_fds[c.layer], view, c.dest_offset + off)
                if futures is None:
                    crc = zlib.crc32(view)
                else:
                    crc = 0
                    for ch, fut in zip(chunks, futures):
                        crc = crc32_combine(crc, fut.result(), len(ch))
                crcs[i] = crc32_combine(crcs[i], crc, n)
                del view, chunks
                free.put(buf)
                on_bytes(n)
        finally:
            stop.set()
            free.put(bytearray(0))  # wakes the reader if it waits for a buffer
            reader.join()
        return crcs


# ---------------------------------------------------------------------------------------------
# Conversion


def _source_key(plan: _Plan) -> dict:
    ckpt = plan.ckpt
    shards = {}
    for f in ckpt.files:
        st = f.stat()
        shards[f.name] = [st.st_size, st.st_mtime_ns]
    return {"path": str(ckpt.path.resolve()),
            "config_sha256": file_sha256(ckpt.path / "config.json"),
            "shards": shards,
            "stride": plan.layout.stride, "block_bytes": plan.layout.block_bytes,
            "resident_nbytes": plan.resident_nbytes}


def _pack_files(dst: Path) -> list[Path]:
    """What a (partial) pack of ours holds, pack.json first so cleaning never leaves it last."""
    out = [dst / PACK_FILE, dst / (PACK_FILE + ".tmp"), dst / RESIDENT_FILE,
           dst / PROGRESS_FILE, dst / (PROGRESS_FILE + ".tmp")]
    if (dst / EXPERTS_DIR).is_dir():
        out += sorted((dst / EXPERTS_DIR).glob("layer-*.bin"))
    out += [dst / name for name in METADATA_FILES]
    return out


def _allocated(paths: list[Path]) -> int:
    total = 0
    for p in paths:
        try:
            st = p.stat()
        except FileNotFoundError:
            continue
        total += getattr(st, "st_blocks", 0) * 512 or st.st_size
    return total


def _sizes_match(dst: Path, plan: _Plan) -> bool:
    """A resumable pack's files were preallocated to their final sizes."""
    want = {dst / RESIDENT_FILE: plan.resident_nbytes}
    want.update({dst / layer_file_name(L): plan.layer_nbytes for L in plan.layers})
    try:
        return all(p.stat().st_size == n for p, n in want.items())
    except FileNotFoundError:
        return False


def _nearest_existing(path: Path) -> Path:
    path = path.absolute()
    while not path.exists() and path.parent != path:
        path = path.parent
    return path


def _read_json(path: Path) -> dict | None:
    try:
        data = json.loads(path.read_text())
        return data if isinstance(data, dict) else None
    except (OSError, ValueError):
        return None


def _dst_state(dst: Path, key: dict, force: bool) -> tuple[str, dict | None]:
    """'fresh', 'resume' (with the progress record) or 'replace'; refuses what it must not touch."""
    if not dst.exists():
        return "fresh", None
    if not dst.is_dir():
        raise KimiError(f"{dst}: exists and is not a directory")
    meta = _read_json(dst / PACK_FILE) if (dst / PACK_FILE).exists() else None
    if (dst / PACK_FILE).exists():
        same = (meta or {}).get("source", {}).get("config_sha256") == key["config_sha256"]
        if force:
            return "replace", None
        if same:
            raise KimiError(f"{dst}: already converted (pack.json is present); "
                            "use --force to convert again")
        raise KimiError(f"{dst}: holds an expert pack of another checkpoint; "
                        "use --force to replace it")
    progress = _read_json(dst / PROGRESS_FILE) if (dst / PROGRESS_FILE).exists() else None
    if (dst / PROGRESS_FILE).exists():
        if not force and progress and progress.get("source") == key:
            return "resume", progress
        return "replace", None
    if any(dst.iterdir()):
        raise KimiError(f"{dst}: directory is not empty and is not an expert pack; "
                        "choose another destination")
    return "fresh", None


def convert(src: str | os.PathLike, dst: str | os.PathLike, progress: Progress | None = None,
            *, force: bool = False, on_shard: ShardCallback | None = None) -> ConvertResult:
    """Repack the release checkpoint `src` (a directory or cached Hub id) into the pack `dst`."""
    t0 = time.monotonic()
    root = resolve_model_path(src)
    if is_pack_dir(root):
        raise KimiError(f"{root}: is already an expert pack; convert the release checkpoint")
    ckpt = open_checkpoint(root)
    dst = Path(dst).expanduser()
    if dst.absolute() == root.absolute():
        raise KimiError(f"{dst}: the pack must go to another directory than the checkpoint")
    plan = _plan(ckpt)
    key = _source_key(plan)
    state, record = _dst_state(dst, key, force)
    if state == "resume" and not _sizes_match(dst, plan):
        state, record = "replace", None

    reusable = _allocated(_pack_files(dst)) if state != "fresh" else 0
    need = max(0, plan.needed_bytes - reusable)
    usage = shutil.disk_usage(_nearest_existing(dst))
    if usage.free < need:
        raise KimiError(f"{dst}: not enough free disk space: the pack needs {need / 1e9:.2f} GB "
                        f"more, {usage.free / 1e9:.2f} GB are free")

    finished: dict[str, list[int]] = dict(record["crcs"]) if record else {}
    if state == "replace":
        for p in _pack_files(dst):
            p.unlink(missing_ok=True)
    (dst / EXPERTS_DIR).mkdir(parents=True, exist_ok=True)

    def save_progress() -> None:
        _write_atomic(dst / PROGRESS_FILE, json.dumps({
            "format": PACK_FORMAT, "version": PACK_VERSION, "source": key,
            "finished": list(finished), "crcs": finished}).encode())

    # The progress file exists before any data file: a kill from here on leaves a pack that
    # `open_pack` reports as incomplete, and a rerun resumes it.
    save_progress()

    names = [f.name for f in ckpt.files]
    total = sum(plan.shard_bytes(n) for n in names)
    done = sum(plan.shard_bytes(n) for n in names if n in finished)
    written = 0
    result = ConvertResult(dst, 0, total, 0.0, 0)

    def report(n: int) -> None:
        nonlocal done, written
        done += n
        written += n
        if progress:
            progress(done, total, time.monotonic() - t0)

    if progress:
        progress(done, total, 0.0)
    fds: dict[int, int] = {}
    copier = _Copier()
    try:
        fds[-1] = os.open(dst / RESIDENT_FILE, os.O_RDWR | os.O_CREAT, 0o644)
        _preallocate(fds[-1], plan.resident_nbytes)
        _pwrite_full(fds[-1], memoryview(plan.resident_header), 0)
        for layer in plan.layers:
            fds[layer] = os.open(dst / layer_file_name(layer), os.O_RDWR | os.O_CREAT, 0o644)
            _preallocate(fds[layer], plan.layer_nbytes)

        for index, name in enumerate(names, start=1):
            if name in finished:
                result.shards_skipped.append(name)
                if on_shard:
                    on_shard(name, index, len(names), True)
                continue
            path = root / name
            copies = [c for _, c in plan.shards[name]]
            src_fd = os.open(path, os.O_RDONLY)
            try:
                _check_weight_shapes(src_fd, plan.shape_checks[name], plan)
                crcs = copier.copy(path, src_fd, copies, fds, report)
                _drop_cache(src_fd)
            finally:
                os.close(src_fd)
            for layer in {-1, *(c.layer for c in copies)}:
                os.fsync(fds[layer])
                _drop_cache(fds[layer])
            finished[name] = crcs
            save_progress()
            result.shards_converted.append(name)
            if on_shard:
                on_shard(name, index, len(names), False)
            if progress:
                progress(done, total, time.monotonic() - t0)

        meta = _pack_meta(plan, key, finished)
        for fname in METADATA_FILES:
            if (root / fname).is_file():
                shutil.copyfile(root / fname, dst / fname)
                with open(dst / fname, "rb+") as f:
                    os.fsync(f.fileno())
        _fsync_dir(dst / EXPERTS_DIR)
        _write_atomic(dst / PACK_FILE, (json.dumps(meta, indent=1) + "\n").encode())
        (dst / PROGRESS_FILE).unlink(missing_ok=True)
        _fsync_dir(dst)
    finally:
        copier.close()
        for fd in fds.values():
            os.close(fd)
    result.bytes_written = written
    result.seconds = time.monotonic() - t0
    result.peak_rss = peak_rss()
    return result


def _check_weight_shapes(fd: int, tensors: list[TensorInfo], plan: _Plan) -> None:
    """The release stores each expert's logical shape; the pack derives it from config.json."""
    shapes = expert_shapes(plan.ckpt.args)
    for t in tensors:
        dtype = np.int64 if t.dtype == "I64" else np.int32
        value = np.frombuffer(os.pread(fd, t.nbytes, t.offset), dtype=dtype).tolist()
        want = list(shapes[t.name.split(".")[-2]])
        if value != want:
            raise CheckpointError(f"{t.file}: {t.name} is {value}, expected {want} "
                                  "from config.json")


def _pack_meta(plan: _Plan, key: dict, finished: dict[str, list[int]]) -> dict:
    """pack.json: the layout, per-block checksums assembled from the per-tensor crcs."""
    layout = plan.layout
    E = plan.ckpt.args.n_routed_experts
    region_index = {r.name: i for i, r in enumerate(layout.regions)}
    sources = {f"{p}.weight_packed": f"{p}.weight" for p in EXPERT_PROJS}
    sources.update({f"{p}.weight_scale": f"{p}.scales" for p in EXPERT_PROJS})
    region_crc: dict[tuple[int, int, int], int] = {}
    tensor_crc: dict[str, int] = {}
    for shard, copies in plan.shards.items():
        for (name, _), crc in zip(copies, finished[shard]):
            tensor_crc[name] = crc
            parts = name.split(".")
            if len(parts) > 6 and parts[3] == "mlp" and parts[4] == "experts":
                r = region_index[sources[".".join(parts[6:])]]
                region_crc[(int(parts[2]), int(parts[5]), r)] = crc

    layers = {}
    for layer in plan.layers:
        checksums = []
        for e in range(E):
            crc, pos = 0, 0
            for i, r in enumerate(layout.regions):
                if r.offset > pos:
                    crc = crc32_combine(crc, _zeros_crc(r.offset - pos), r.offset - pos)
                crc = crc32_combine(crc, region_crc[(layer, e, i)], r.nbytes)
                pos = r.offset + r.nbytes
            checksums.append(crc)
        layers[str(layer)] = {"file": layer_file_name(layer), "n_experts": E,
                              "checksums": checksums}
    resident_crc = zlib.crc32(plan.resident_header)
    for t in plan.resident:
        resident_crc = crc32_combine(resident_crc, tensor_crc[t.name], t.nbytes)
    return {
        "format": PACK_FORMAT,
        "version": PACK_VERSION,
        "source": {"path": key["path"], "revision": snapshot_revision(plan.ckpt.path),
                   "config_sha256": key["config_sha256"]},
        "alignment": ALIGNMENT,
        "expert_regions": [r.to_dict() for r in layout.regions],
        "stride": layout.stride,
        "block_bytes": layout.block_bytes,
        "layers": layers,
        "resident": {"file": RESIDENT_FILE, "nbytes": plan.resident_nbytes,
                     "crc32": resident_crc},
    }


def default_pack_dir(spec: str | os.PathLike) -> Path:
    """`SRC-pack` next to a local checkpoint; for a Hub id (or a Hugging Face cache snapshot),
    `$XDG_CACHE_HOME/kimi-mlx/packs/<owner>--<name>` so the HF cache stays untouched."""
    path = Path(spec).expanduser()
    if path.exists():
        path = path.resolve()
        if path.parent.name == "snapshots" and path.parent.parent.name.startswith("models--"):
            repo = path.parent.parent.name[len("models--"):]
            return app_config.cache_dir() / "packs" / repo
        return path.with_name(path.name + "-pack")
    text = str(spec).strip("/")
    return app_config.cache_dir() / "packs" / text.replace("/", "--")


def measure_copy_throughput(path_dir: str | os.PathLike, nbytes: int,
                            piece: int = PIECE_BYTES, drop_cache: bool = True) -> float:
    """Bytes/s of a plain sequential read + write of `nbytes` on the disk holding `path_dir`:
    the yardstick for `convert`'s throughput. Temporary files are removed afterwards."""
    d = Path(path_dir)
    d.mkdir(parents=True, exist_ok=True)
    a, b = d / ".kimi-copy-bench.src", d / ".kimi-copy-bench.dst"
    block = memoryview(os.urandom(min(piece, nbytes) or 1))
    try:
        fd = os.open(a, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            left = nbytes
            while left:
                left -= os.write(fd, block[:min(left, len(block))])
            os.fsync(fd)
            if drop_cache:
                _drop_cache(fd)
        finally:
            os.close(fd)
        buf = memoryview(bytearray(piece))
        t0 = time.monotonic()
        rfd = os.open(a, os.O_RDONLY)
        wfd = os.open(b, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            while n := os.readv(rfd, [buf]):
                view = buf[:n]
                while view:
                    view = view[os.write(wfd, view):]
            os.fsync(wfd)
        finally:
            os.close(rfd)
            os.close(wfd)
        return nbytes / (time.monotonic() - t0)
    finally:
        a.unlink(missing_ok=True)
        b.unlink(missing_ok=True)
