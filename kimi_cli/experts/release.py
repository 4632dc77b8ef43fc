"""Routed experts read straight from the release's safetensors shards: no second copy on disk.

Each (layer, expert)'s byte ranges come once from the headers; a miss is a few `preadv`s into
the slot's buffers (two in the release's tensor order, one more if the expert straddles shards).
"""

from __future__ import annotations

import fcntl
import os
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..checkpoint.layout import EXPERT_PROJS
from ..checkpoint.reader import Checkpoint
from ..errors import CheckpointError
from .pack import preadv_full

# Read through gaps up to this size (other tensors between an expert's own, e.g. weight_shape
# when it is not int64) rather than issue one more syscall; larger gaps start a new read.
GAP_BYTES = 64 << 10
_FADVISE = hasattr(os, "posix_fadvise")
_FIX = "the download is damaged: re-download it with `kimi download` (or `--verify`)"


@dataclass(frozen=True)
class Run:
    """One `preadv`: `nbytes` contiguous bytes of `file` from `offset`, split into parts
    (slot region name, or None for a gap that is read into scratch and dropped)."""

    file: Path
    offset: int
    parts: tuple[tuple[str | None, int], ...]

    @property
    def nbytes(self) -> int:
        return sum(n for _, n in self.parts)


def expert_tensors(layer: int, expert: int) -> dict[str, str]:
    """Slot region name -> release tensor name, for one expert's packed words and scales."""
    pre = f"model.layers.{layer}.mlp.experts.{expert}."
    out = {}
    for p in EXPERT_PROJS:
        out[f"{p}.weight"] = pre + p + ".weight_packed"
        out[f"{p}.scales"] = pre + p + ".weight_scale"
    return out


def expert_runs(ckpt: Checkpoint, layer: int, expert: int) -> tuple[Run, ...]:
    """The fewest reads covering one expert's tensors, in whatever order the shards hold them."""
    located = sorted(((ckpt.tensors[t].file, ckpt.tensors[t].offset, ckpt.tensors[t].nbytes, r)
                      for r, t in expert_tensors(layer, expert).items()))
    runs: list[Run] = []
    for file, offset, nbytes, region in located:
        if runs:
            last = runs[-1]
            end = last.offset + last.nbytes
            if last.file == file and 0 <= offset - end <= GAP_BYTES:
                gap = ((None, offset - end),) if offset > end else ()
                runs[-1] = Run(file, last.offset, last.parts + gap + ((region, nbytes),))
                continue
        runs.append(Run(file, offset, ((region, nbytes),)))
    return tuple(runs)


class ReleaseSource:
    """Expert reads from a release directory (also a symlinked Hugging Face cache snapshot).
    Thread-safe: one read-only descriptor per shard, `preadv` at absolute offsets."""

    def __init__(self, ckpt: Checkpoint, layers: list[int], page_cache: bool = True):
        self.path = ckpt.path
        self.args = ckpt.args
        # False: reads bypass the OS page cache, which would otherwise hold a second copy of
        # every expert the cache already keeps (F_NOCACHE on macOS, DONTNEED after reads on Linux).
        self.page_cache = page_cache
        E = ckpt.args.n_routed_experts
        self.runs = {(L, e): expert_runs(ckpt, L, e) for L in layers for e in range(E)}
        first = next(iter(self.runs.values()), ())
        self.expert_bytes = sum(r.nbytes - sum(n for k, n in r.parts if k is None)
                                for r in first)
        # Shape and host dtype of each region, for the ones a caller leaves to the reader.
        self.region_types: dict[str, tuple[tuple[int, ...], type]] = {}
        if layers:
            for region, name in expert_tensors(layers[0], 0).items():
                kind = np.uint32 if region.endswith(".weight") else np.uint16
                self.region_types[region] = (ckpt.tensors[name].shape, kind)
        self._fds: dict[Path, int] = {}
        self._lock = threading.Lock()

    def reads_per_expert(self) -> float:
        return sum(len(r) for r in self.runs.values()) / max(1, len(self.runs))

    def read_into(self, layer: int, expert: int, dest: dict[str, np.ndarray]) -> int:
        """Read one expert straight into `dest` (region name -> C-contiguous array of the
        tensor's size, e.g. a slot's packed words); missing regions are added as new arrays
        (packed words as uint32, bf16 scales as their raw 16-bit words). Returns the bytes
        read, gaps included."""
        total = 0
        for run in self.runs[(layer, expert)]:
            views = []
            for region, nbytes in run.parts:
                if region is None:
                    views.append(memoryview(bytearray(nbytes)))
                    continue
                arr = dest.get(region)
                if arr is None:
                    shape, kind = self.region_types[region]
                    arr = dest[region] = np.empty(shape, kind)
                if not arr.flags.c_contiguous or arr.nbytes != nbytes:
                    raise ValueError(f"read_into: {region} needs a C-contiguous {nbytes}-byte "
                                     f"array, got {arr.nbytes} bytes")
                views.append(memoryview(arr).cast("B"))
            fd = self._fd(run.file)
            preadv_full(fd, views, run.offset, run.file, _FIX)
            if not self.page_cache and _FADVISE:
                os.posix_fadvise(fd, run.offset, run.nbytes, os.POSIX_FADV_DONTNEED)
            total += run.nbytes
        return total

    def close(self) -> None:
        with self._lock:
            fds, self._fds = self._fds, {}
        for fd in fds.values():
            os.close(fd)

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass

    def _fd(self, file: Path) -> int:
        fd = self._fds.get(file)
        if fd is not None:
            return fd
        with self._lock:
            fd = self._fds.get(file)
            if fd is None:
                try:
                    fd = os.open(file, os.O_RDONLY)
                except OSError as e:
                    raise CheckpointError(f"{file}: cannot open ({e.strerror})") from None
                if not self.page_cache and hasattr(fcntl, "F_NOCACHE"):
                    fcntl.fcntl(fd, fcntl.F_NOCACHE, 1)
                self._fds[file] = fd
        return fd
