"""`kimi download`: the release from the Hugging Face Hub into the HF cache (or a folder): only the
files the model needs, all or some layers' shards, free space checked first, sizes and hashes after.

Which files and how they are checked live here; the Hub transport (listing, resumable HTTP and
Xet downloads, the cache layout) lives in hub.py.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

from . import config
from .checkpoint import verified
from .distributed.split import LayerRange, parse_rank, rank_layers
from .errors import CheckpointError, KimiError, UsageError
from .hub import (
    RemoteFile,
    Target,
    cached_dir,
    guarded_fetch,
    hf_cache,
    hub_error,
    is_offline,
    remote_files,
)

INDEX_FILE = "model.safetensors.index.json"
# Everything the loader, tokenizer and template read, besides the shards. The release's .py files
# (remote code for transformers), README and images are not needed.
METADATA_FILES = ("config.json", "generation_config.json", "tokenizer_config.json",
                  "tiktoken.model", "chat_template.jinja", INDEX_FILE)
REQUIRED_FILES = ("config.json", "tokenizer_config.json", "tiktoken.model", INDEX_FILE)
WORKERS = 4  # files downloaded at once


# ---------------------------------------------------------------------------------------------
# Which shards a machine needs


def parse_layers(text: str, n_layers: int) -> LayerRange:
    """`--layers A-B` (0-based, inclusive) or a single layer `A`."""
    m = re.fullmatch(r"\s*(\d+)\s*(?:-\s*(\d+)\s*)?", text)
    if not m:
        raise UsageError(f"--layers: expected A-B (e.g. 0-30), got {text!r}")
    start = int(m.group(1))
    end = int(m.group(2)) if m.group(2) is not None else start
    if start > end:
        raise UsageError(f"--layers {text}: {start} > {end}; give the first layer first")
    if end >= n_layers:
        raise UsageError(f"--layers {text}: the model has layers 0-{n_layers - 1}")
    return LayerRange(start, end, n_layers)


def select_shards(weight_map: dict[str, str], layers: LayerRange | None) -> list[str]:
    """The shard files holding the tensors `layers` needs (all shards for None)."""
    return sorted({f for name, f in weight_map.items() if layers is None or layers.holds(name)})


# ---------------------------------------------------------------------------------------------
# Progress on stderr


class Progress:
    """Bytes, rate and ETA: a live line on a terminal, else one line per finished file."""

    def __init__(self, stream: IO | None = None, quiet: bool = False):
        self.stream = stream or sys.stderr
        self.quiet = quiet
        self.tty = _isatty(self.stream)
        self.total = 0
        self.done = 0
        self.start_done = 0
        self.files = 0
        self.files_done = 0
        self.t0 = time.monotonic()
        self.shown = 0.0
        self.live = False
        self.lock = threading.Lock()

    def begin(self, total: int, already: int, files: int) -> None:
        self.total, self.done, self.start_done, self.files = total, already, already, files
        self.t0 = time.monotonic()

    def advance(self, n: int) -> None:
        with self.lock:
            self.done += n
            now = time.monotonic()
            if self.tty and not self.quiet and now - self.shown >= 0.2:
                self.shown = now
                self._write("\r\x1b[K" + self._line())
                self.live = True

    def file_done(self, name: str, note: str) -> None:
        with self.lock:
            self.files_done += 1
            if self.quiet:
                return
            if self.tty:
                self._write("\r\x1b[K")
            self._write(f"kimi: {self.files_done}/{self.files} {name}: {note} "
                        f"({self._line()})\n")
            if self.tty:
                self._write(self._line())

    def note(self, msg: str) -> None:
        if self.quiet:
            return
        with self.lock:
            self.finish_line()
            self._write(msg + "\n")

    def finish_line(self) -> None:
        if self.live:
            self._write("\r\x1b[K")
            self.live = False

    def _line(self) -> str:
        elapsed = time.monotonic() - self.t0
        rate = (self.done - self.start_done) / elapsed if elapsed > 0 else 0.0
        eta = (self.total - self.done) / rate if rate > 0 else 0.0
        pct = 100 * self.done / self.total if self.total else 100.0
        return (f"download: {_size(self.done)} of {_size(self.total)} ({pct:.0f}%), "
                f"{rate / 1e6:.1f} MB/s, ETA {_duration(eta)}")

    def _write(self, s: str) -> None:
        try:
            self.stream.write(s)
            self.stream.flush()
        except (OSError, ValueError):
            pass


def _isatty(stream: IO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


def _duration(seconds: float) -> str:
    s = int(seconds)
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


# ---------------------------------------------------------------------------------------------
# What a download did, and checking a file against the Hub's sizes and hashes


@dataclass
class DownloadResult:
    path: Path
    repo: str
    commit: str
    files: list[str]
    layers: LayerRange | None
    downloaded: list[str] = field(default_factory=list)
    bytes_downloaded: int = 0
    total_bytes: int = 0
    verified_hash: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)
    seconds: float = 0.0
    offline: bool = False


def _verify_file(path: Path, rf: RemoteFile, size: int | None) -> str:
    """Size always; sha256 (LFS) or the git blob id (small files) when the Hub gave them."""
    have = path.stat().st_size
    if size is not None and have != size:
        _remove(path)
        raise KimiError(f"{rf.name}: {have} bytes, the Hub says {size}; the partial file was "
                        "removed, rerun to fetch it again")
    if rf.sha256:
        if verified.is_verified(path, rf.sha256):
            return f"{_size(have)}, sha256 ok (verified before)"
        digest = _sha256(path)
        if digest != rf.sha256:
            _remove(path)
            raise KimiError(f"{rf.name}: sha256 {digest[:12]}… does not match the Hub's "
                            f"{rf.sha256[:12]}…; removed, rerun to fetch it again")
        verified.record(path, digest)
        return f"{_size(have)}, sha256 ok"
    if rf.blob_id and size is not None and size < (64 << 20):
        h = hashlib.sha1(f"blob {have}\0".encode())  # noqa: S324 - git's object id, not security
        h.update(path.read_bytes())
        if h.hexdigest() != rf.blob_id:
            _remove(path)
            raise KimiError(f"{rf.name}: content does not match the Hub's git blob id; removed, "
                            "rerun to fetch it again")
        return f"{_size(have)}, git blob id ok"
    return f"{_size(have)}, size ok"


def _remove(path: Path) -> None:
    """Delete a bad file: the blob behind a snapshot link too, or the next run would relink it."""
    if path.is_symlink():
        path.resolve().unlink(missing_ok=True)
    path.unlink(missing_ok=True)


def _size(n: float) -> str:
    for unit, div in (("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if n >= div:
            return f"{n / div:.2f} {unit}"
    return f"{int(n)} B"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while b := f.read(8 << 20):
            h.update(b)
    return h.hexdigest()


# ---------------------------------------------------------------------------------------------
# The download


def _select(repo: str, files: dict[str, RemoteFile], index: dict, n_layers: int,
            layers: LayerRange | None) -> list[str]:
    missing = [f for f in REQUIRED_FILES if f not in files]
    if missing:
        raise KimiError(f"{repo}: no {', '.join(missing)} in the repo; not a Kimi-K2 release")
    weight_map = index.get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
        raise CheckpointError(f"{repo}: {INDEX_FILE} has no weight_map")
    shards = select_shards(weight_map, layers)
    absent = [s for s in shards if s not in files]
    if absent:
        raise KimiError(f"{repo}: the index names shards the repo does not have: "
                        f"{', '.join(absent[:3])}")
    return [f for f in METADATA_FILES if f in files] + shards


def _layer_range(layers: str | None, rank: str | None, n_layers: int,
                 split: str | None = None) -> LayerRange | None:
    if layers and rank:
        raise UsageError("use either --layers or --rank")
    if split and not rank:
        raise UsageError("--split needs --rank I/N")
    if layers:
        return parse_layers(layers, n_layers)
    if rank:
        return rank_layers(*parse_rank(rank), n_layers, split)
    return None


def free_space(path: Path) -> int:
    p = path.absolute()
    while not p.exists() and p.parent != p:
        p = p.parent
    return shutil.disk_usage(p).free


def download(repo: str = config.DEFAULT_REPO, revision: str | None = None,
             local_dir: Path | None = None, layers: str | None = None, rank: str | None = None,
             verify_all: bool = False, progress: Progress | None = None,
             split: str | None = None) -> DownloadResult:
    """Download what the model needs from `repo` (at `revision`) and verify it; `rank` (I/N)
    with `split` (`--split 30,31`, default even) fetches what that rank of a pipeline loads."""
    _layer_range(layers, rank, 1 << 30)  # syntax errors before any network access
    if split is not None and not rank:
        raise UsageError("--split needs --rank I/N")
    progress = progress or Progress(quiet=True)
    if is_offline():
        return _offline(repo, revision, local_dir, layers, rank, split)
    t0 = time.monotonic()
    commit, files = remote_files(repo, revision)
    target = Target(repo, commit, revision or "main", local_dir)
    target.write_ref()
    cancel = threading.Event()
    # The index and config first: they say which shards hold which layers.
    first: dict[str, str] = {}
    for name in ("config.json", INDEX_FILE):
        if name not in files:
            raise KimiError(f"{repo}: no {name} in the repo; not a Kimi-K2 release")
        if not target.complete(name, files[name].size):
            first[name] = guarded_fetch(target, files[name], progress, cancel, repo,
                                        _verify_file)
    cfg = _read_json(target.file("config.json"))
    index = _read_json(target.file(INDEX_FILE))
    n_layers = int(cfg.get("num_hidden_layers") or 0)
    selection = _layer_range(layers, rank, n_layers, split)
    names = _select(repo, files, index, n_layers, selection)
    result = DownloadResult(target.path, repo, commit, names, selection)
    result.total_bytes = sum(files[n].size or 0 for n in names)

    todo = [n for n in names if not target.complete(n, files[n].size)]
    partial = {n: min(target.partial_bytes(files[n]), files[n].size or 0) for n in todo}
    need = sum(max(0, (files[n].size or 0) - partial[n]) for n in todo)
    first_bytes = sum(files[n].size or 0 for n in first)
    free = free_space(target.disk_dir)
    if need > free:
        raise KimiError(
            f"not enough free disk space in {_nearest(target.disk_dir)}: {len(todo)} files need "
            f"{need / 1e9:.2f} GB more, {free / 1e9:.2f} GB are free"
            + ("" if selection else "; --layers or --rank fetch only part of the model"))
    progress.begin(result.total_bytes, result.total_bytes - need - first_bytes, len(names))
    progress.advance(first_bytes)
    for n in names:
        if n in first:
            progress.file_done(n, first[n])
        elif n not in todo:
            progress.file_done(n, "already here")
    errors = _run_workers(target, [files[n] for n in todo], progress, cancel, repo, result)
    result.failed.update(errors)
    result.downloaded = list(first) + [n for n in todo if n not in errors]
    result.bytes_downloaded = sum(files[n].size or 0 for n in result.downloaded)
    result.verified_hash = [n for n in result.downloaded if files[n].sha256 or files[n].blob_id]
    for n in names:
        if n in todo or n in result.failed:
            continue
        try:
            if verify_all:
                _verify_file(target.file(n), files[n], files[n].size)
                result.verified_hash.append(n)
            elif not target.complete(n, files[n].size):
                raise KimiError(f"{n}: size does not match the Hub's {files[n].size} bytes")
        except KimiError as e:
            result.failed[n] = str(e)
    progress.finish_line()
    result.seconds = time.monotonic() - t0
    return result


def _nearest(path: Path) -> Path:
    p = path.absolute()
    while not p.exists() and p.parent != p:
        p = p.parent
    return p


def _run_workers(target: Target, todo: list[RemoteFile], progress: Progress,
                 cancel: threading.Event, repo: str, result: DownloadResult) -> dict[str, str]:
    """Download `todo` with WORKERS daemon threads (Ctrl-C stops at once; partials are kept)."""
    queue = list(reversed(todo))
    lock = threading.Lock()
    errors: dict[str, str] = {}

    def work() -> None:
        while not cancel.is_set():
            with lock:
                if not queue:
                    return
                rf = queue.pop()
            try:
                note = guarded_fetch(target, rf, progress, cancel, repo, _verify_file)
                progress.file_done(rf.name, note)
            except KeyboardInterrupt:
                return
            except Exception as e:  # noqa: BLE001 - one file's failure must not stop the rest
                msg = str(e) if isinstance(e, KimiError) else f"{type(e).__name__}: {e}"
                with lock:
                    errors[rf.name] = msg
                progress.note(f"kimi: {rf.name}: {msg}")

    threads = [threading.Thread(target=work, daemon=True, name=f"kimi-download-{i}")
               for i in range(min(WORKERS, len(todo)))]
    for t in threads:
        t.start()
    try:
        for t in threads:
            while t.is_alive():
                t.join(0.2)
    except KeyboardInterrupt:
        cancel.set()
        progress.finish_line()
        raise
    return errors


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{path}: cannot read ({e})") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: expected a JSON object")
    return data


# ---------------------------------------------------------------------------------------------
# Offline: say whether the cache already holds everything


def _offline(repo: str, revision: str | None, local_dir: Path | None, layers: str | None,
             rank: str | None, split: str | None = None) -> DownloadResult:
    root = local_dir.expanduser().resolve() if local_dir else cached_dir(repo, revision)
    if root is None or not (root / "config.json").is_file():
        where = local_dir or f"the Hugging Face cache ({hf_cache()})"
        raise KimiError(f"{repo}: HF_HUB_OFFLINE is set and {where} does not hold it; unset "
                        "HF_HUB_OFFLINE to download it")
    if not (root / INDEX_FILE).is_file():
        raise KimiError(f"{repo}: HF_HUB_OFFLINE is set and {root} has no {INDEX_FILE}; unset "
                        "HF_HUB_OFFLINE to download it")
    cfg, index = _read_json(root / "config.json"), _read_json(root / INDEX_FILE)
    n_layers = int(cfg.get("num_hidden_layers") or 0)
    selection = _layer_range(layers, rank, n_layers, split)
    shards = select_shards(index.get("weight_map") or {}, selection)
    names = [f for f in METADATA_FILES if (root / f).is_file()] + shards
    missing = [n for n in REQUIRED_FILES + tuple(shards) if not (root / n).is_file()]
    result = DownloadResult(root, repo, root.name if not local_dir else "", names, selection,
                            offline=True)
    for n in missing:
        result.failed[n] = "missing"
    for n in shards:
        if n in result.failed:
            continue
        from .checkpoint.reader import read_safetensors_header

        try:
            read_safetensors_header(root / n)
        except CheckpointError as e:
            result.failed[n] = str(e)
    if result.failed:
        sample = ", ".join(sorted(result.failed)[:3])
        more = f" and {len(result.failed) - 3} more" if len(result.failed) > 3 else ""
        raise KimiError(f"{repo}: HF_HUB_OFFLINE is set and {len(result.failed)} of "
                        f"{len(names)} files are missing or incomplete in {root} ({sample}{more});"
                        " unset HF_HUB_OFFLINE to download them")
    result.total_bytes = sum((root / n).stat().st_size for n in names)
    return result


def fetch_metadata(repo: str, revision: str | None = None) -> Path:
    """config.json and the index of `repo` (from the cache, else the Hub): the snapshot dir."""
    found = cached_dir(repo, revision)
    if found is not None and (found / INDEX_FILE).is_file():
        return found
    if is_offline():
        raise KimiError(f"{repo}: not in the Hugging Face cache ({hf_cache()}) and "
                        "HF_HUB_OFFLINE is set; unset it, or `kimi download` the model")
    from huggingface_hub import hf_hub_download

    # One quick question first: an unreachable Hub fails at once, as `kimi download` does,
    # instead of hf_hub_download's retries and their log lines.
    commit, _ = remote_files(repo, revision)
    path = None
    for name in ("config.json", INDEX_FILE):
        try:
            path = Path(hf_hub_download(repo, name, revision=commit))
        except Exception as e:  # noqa: BLE001
            if isinstance(e, KeyboardInterrupt):
                raise
            raise hub_error(e, repo, revision) from None
    return path.parent
