"""`kimi download`: the release from the Hugging Face Hub into the HF cache (or a folder): only the
files the model needs, all or some layers' shards, free space checked first, sizes and hashes after.

Plain HTTP downloads keep their partial file across runs and resume with a Range request (also
in-process after a dropped connection); Xet-stored files go through huggingface_hub and hf_xet.
"""

from __future__ import annotations

import errno
import hashlib
import importlib
import importlib.util
import inspect
import json
import os
import re
import shutil
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO
from urllib.parse import urlparse

from . import config
from .checkpoint import verified
from .errors import CheckpointError, KimiError, UsageError

INDEX_FILE = "model.safetensors.index.json"
# Everything the loader, tokenizer and template read, besides the shards. The release's .py files
# (remote code for transformers), README and images are not needed.
METADATA_FILES = ("config.json", "generation_config.json", "tokenizer_config.json",
                  "tiktoken.model", "chat_template.jinja", INDEX_FILE)
REQUIRED_FILES = ("config.json", "tokenizer_config.json", "tiktoken.model", INDEX_FILE)
PARTIAL_SUFFIX = ".kimi-partial"
WORKERS = 4  # files downloaded at once
RETRIES = 5  # consecutive failed attempts on one file (reset whenever bytes arrive)
RETRY_WAIT = 0.5  # seconds before the first retry; doubles, at most 8 s
READ_TIMEOUT = 60.0
LAYER_RE = re.compile(r"^model\.layers\.(\d+)\.")


# ---------------------------------------------------------------------------------------------
# Which shards a machine needs


@dataclass(frozen=True)
class LayerRange:
    """Layers `start`..`end` (inclusive) of a model with `n_layers` layers."""

    start: int
    end: int
    n_layers: int

    def __str__(self) -> str:
        return f"layers {self.start}-{self.end} of {self.n_layers}"

    def holds(self, tensor: str) -> bool:
        """Whether a machine running these layers needs `tensor`.

        The rule: a layer's tensors go with that layer; the embedding with layer 0 (the first
        rank embeds the tokens); the final norm and lm_head with the last layer (the last rank
        produces the logits); tensors of layers past the last (an MTP head) with the last layer.
        """
        m = LAYER_RE.match(tensor)
        if m:
            i = int(m.group(1))
            return self.start <= min(i, self.n_layers - 1) <= self.end
        if tensor.startswith("model.embed_tokens."):
            return self.start == 0
        return self.end == self.n_layers - 1  # model.norm, lm_head and anything unforeseen


def parse_layers(text: str, n_layers: int) -> LayerRange:
    """`--layers A-B` (0-based, inclusive) or a single layer `A`."""
    m = re.fullmatch(r"\s*(\d+)\s*(?:-\s*(\d+)\s*)?", text)
    if not m:
        raise UsageError(f"--layers: expected A-B (e.g. 0-30), got {text!r}")
    start = int(m.group(1))
    end = int(m.group(2)) if m.group(2) is not None else start
    if start > end or end >= n_layers:
        raise UsageError(f"--layers {text}: the model has layers 0-{n_layers - 1}")
    return LayerRange(start, end, n_layers)


def parse_rank(text: str) -> tuple[int, int]:
    """`--rank I/N`: machine I (0-based) of N."""
    m = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", text)
    if not m:
        raise UsageError(f"--rank: expected I/N (e.g. 0/2), got {text!r}")
    rank, world = int(m.group(1)), int(m.group(2))
    if world < 1 or rank >= world:
        raise UsageError(f"--rank {text}: I must be in 0..N-1")
    return rank, world


def rank_layers(rank: int, world: int, n_layers: int) -> LayerRange:
    """Rank I of N runs a contiguous block of layers in order (rank 0 the first); the blocks
    differ by at most one layer and the low ranks take the extra ones."""
    if world > n_layers:
        raise UsageError(f"--rank: {world} machines for {n_layers} layers; use at most "
                         f"{n_layers}")
    base, extra = divmod(n_layers, world)
    start = rank * base + min(rank, extra)
    return LayerRange(start, start + base + (1 if rank < extra else 0) - 1, n_layers)


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


class _HubBar:
    """A tqdm stand-in for huggingface_hub's Xet downloads: bytes written go to our Progress."""

    progress: Progress | None = None

    def __init__(self, *args, **kwargs):
        self.total = kwargs.get("total")
        self.n = kwargs.get("initial") or 0
        self.desc = kwargs.get("desc", "")

    def update(self, n: float = 1) -> None:
        self.n += n
        if self.progress is not None and n > 0:
            self.progress.advance(int(n))

    def update_transfer(self, n: float = 1) -> None:  # network bytes: counted as written
        pass

    def __getattr__(self, name: str):  # set_postfix_str, refresh, ...: not shown
        return lambda *a, **k: None

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        pass

    def close(self) -> None:
        pass


# ---------------------------------------------------------------------------------------------
# The Hub's view of the repo


@dataclass(frozen=True)
class RemoteFile:
    name: str
    size: int | None
    sha256: str | None  # LFS files: the Hub's sha256 of the content
    blob_id: str | None  # the git blob id (sha1 of "blob <size>\0" + content) of small files


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


def _hub():
    import huggingface_hub

    return huggingface_hub


def _xet_usable() -> bool:
    """hf_xet installed and not disabled (HF_HUB_DISABLE_XET), as huggingface_hub decides."""
    from huggingface_hub import constants

    if getattr(constants, "HF_HUB_DISABLE_XET", False):
        return False
    return importlib.util.find_spec("hf_xet") is not None


def _transport_errors() -> tuple[type[BaseException], ...]:
    """Network failures worth a retry: the HTTP client's transport errors and OSError."""
    errs: list[type[BaseException]] = [OSError]
    for name in ("httpx2", "httpx", "requests"):
        try:
            mod = importlib.import_module(name)
        except ImportError:
            continue
        for attr in ("TransportError", "RequestException", "StreamError"):
            if hasattr(mod, attr):
                errs.append(getattr(mod, attr))
    return tuple(errs)


def is_offline() -> bool:
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


def endpoint() -> str:
    from huggingface_hub import constants

    return constants.ENDPOINT


def hub_error(exc: BaseException, repo: str, revision: str | None) -> KimiError:
    """One clear line for what the Hub (or the way to it) answered."""
    from huggingface_hub import errors
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        OfflineModeIsEnabled,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    RemoteEntryNotFoundError = getattr(errors, "RemoteEntryNotFoundError",  # noqa: N806
                                       errors.EntryNotFoundError)

    if isinstance(exc, OfflineModeIsEnabled):
        return KimiError(f"{repo}: HF_HUB_OFFLINE is set and the files are not all in the "
                         "Hugging Face cache; unset it to download")
    if isinstance(exc, GatedRepoError):
        return KimiError(f"{repo}: gated on the Hub: accept its terms on the model page and set "
                         "HF_TOKEN")
    if isinstance(exc, RevisionNotFoundError):
        return KimiError(f"{repo}: no revision {revision!r} on the Hub")
    if isinstance(exc, RepositoryNotFoundError):
        return KimiError(f"{repo}: not found on the Hub ({endpoint()}); if it is private, "
                         "set HF_TOKEN")
    if isinstance(exc, RemoteEntryNotFoundError):
        return KimiError(f"{repo}: a file is missing on the Hub ({_first_line(exc)})")
    if isinstance(exc, HfHubHTTPError):
        code = getattr(getattr(exc, "response", None), "status_code", None)
        hint = "; check HF_TOKEN" if code in (401, 403) else ""
        return KimiError(f"{repo}: the Hub answered HTTP {code}: {_first_line(exc)}{hint}")
    return KimiError(f"cannot reach the Hub at {endpoint()} ({type(exc).__name__}: "
                     f"{_first_line(exc)}); check the network, or set HF_HUB_OFFLINE=1 to use "
                     "the files already in the cache")


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def remote_files(repo: str, revision: str | None) -> tuple[str, dict[str, RemoteFile]]:
    """The commit a revision points to and every file's size and hashes, from the Hub."""
    hub = _hub()
    try:
        info = hub.HfApi().model_info(repo, revision=revision, files_metadata=True)
    except Exception as e:  # noqa: BLE001 - every failure becomes one line (hub_error)
        if isinstance(e, KeyboardInterrupt):
            raise
        raise hub_error(e, repo, revision) from None
    files = {}
    for s in info.siblings or []:
        files[s.rfilename] = RemoteFile(s.rfilename, s.size, s.lfs.sha256 if s.lfs else None,
                                        s.blob_id)
    if not info.sha:
        raise KimiError(f"{repo}: the Hub did not say which commit {revision or 'main'} is")
    return info.sha, files


# ---------------------------------------------------------------------------------------------
# Where files go: the HF cache (blobs + snapshot links) or a plain folder


class Target:
    """The HF cache snapshot of `commit`, or `local_dir` (huggingface_hub's layout for both)."""

    def __init__(self, repo: str, commit: str, revision: str, local_dir: Path | None):
        from huggingface_hub import constants
        from huggingface_hub.file_download import repo_folder_name

        self.repo, self.commit, self.revision = repo, commit, revision
        self.local_dir = local_dir.expanduser().resolve() if local_dir else None
        self.cache = Path(constants.HF_HUB_CACHE).expanduser()
        self.storage = self.cache / repo_folder_name(repo_id=repo, repo_type="model")

    @property
    def path(self) -> Path:
        return self.local_dir if self.local_dir else self.storage / "snapshots" / self.commit

    @property
    def disk_dir(self) -> Path:
        return self.local_dir if self.local_dir else self.cache

    def file(self, name: str) -> Path:
        return self.path / name

    def complete(self, name: str, size: int | None) -> bool:
        p = self.file(name)
        try:
            return p.is_file() and (size is None or p.stat().st_size == size)
        except OSError:
            return False

    def blob(self, etag: str, name: str) -> Path:
        """Where a download lands before it is linked (cache) or moved into place (folder)."""
        if self.local_dir:
            return self._local_meta_dir() / (name + ".kimi-download")
        return self.storage / "blobs" / etag

    def partial(self, rf: RemoteFile) -> Path:
        """An interrupted download's bytes, named by the content it will have (kept across runs
        and commits; a finished one is renamed to its blob)."""
        if self.local_dir:
            return self._local_meta_dir() / (rf.name + PARTIAL_SUFFIX)
        key = rf.sha256 or rf.blob_id or hashlib.sha256(
            f"{self.commit}/{rf.name}".encode()).hexdigest()
        return self.storage / "blobs" / (key + PARTIAL_SUFFIX)

    def partial_bytes(self, rf: RemoteFile) -> int:
        p = self.partial(rf)
        return p.stat().st_size if p.exists() else 0

    def _local_meta_dir(self) -> Path:
        return self.local_dir / ".cache" / "huggingface" / "download"

    def place(self, name: str, etag: str, landed: Path) -> Path:
        """Make the finished download visible under its name (and record the commit)."""
        if self.local_dir:
            from huggingface_hub._local_folder import write_download_metadata

            dest = self.local_dir / name
            dest.parent.mkdir(parents=True, exist_ok=True)
            os.replace(landed, dest)
            write_download_metadata(local_dir=self.local_dir, filename=name,
                                    commit_hash=self.commit, etag=etag)
            return dest
        link = self.storage / "snapshots" / self.commit / name
        link.parent.mkdir(parents=True, exist_ok=True)
        if not link.exists():
            tmp = link.with_name(link.name + ".kimi-link")
            tmp.unlink(missing_ok=True)
            try:
                tmp.symlink_to(os.path.relpath(landed, link.parent))
                os.replace(tmp, link)
            except OSError:  # no symlinks (some filesystems): keep the blob in the snapshot
                os.replace(landed, link)
        return link

    def write_ref(self) -> None:
        """refs/<revision> -> commit, so the repo id resolves offline (as hf_hub_download does)."""
        if self.local_dir or self.revision == self.commit:
            return
        ref = self.storage / "refs" / self.revision
        ref.parent.mkdir(parents=True, exist_ok=True)
        try:
            if ref.read_text() == self.commit:
                return
        except OSError:
            pass
        tmp = ref.with_name(ref.name + ".kimi-tmp")
        tmp.write_text(self.commit)
        os.replace(tmp, ref)


# ---------------------------------------------------------------------------------------------
# One file


def _fetch(target: Target, rf: RemoteFile, progress: Progress, cancel: threading.Event) -> str:
    """Download one file into `target`, verified; returns a note for the progress line."""
    from huggingface_hub import hf_hub_download, hf_hub_url
    from huggingface_hub.file_download import get_hf_file_metadata
    from huggingface_hub.utils import build_hf_headers

    url = hf_hub_url(target.repo, rf.name, revision=target.commit)
    meta = get_hf_file_metadata(url)
    size = meta.size if meta.size is not None else rf.size
    if getattr(meta, "xet_file_data", None) is not None and _xet_usable():
        kwargs: dict = {"revision": target.commit}
        if target.local_dir:
            kwargs["local_dir"] = target.local_dir
        if "tqdm_class" in inspect.signature(hf_hub_download).parameters:
            _HubBar.progress = progress
            kwargs["tqdm_class"] = _HubBar
        path = Path(hf_hub_download(target.repo, rf.name, **kwargs))
        return _verify_file(path, rf, size)
    etag = meta.etag
    landed = target.blob(etag, rf.name)
    if not landed.exists():
        partial = target.partial(rf)
        partial.parent.mkdir(parents=True, exist_ok=True)
        headers = build_hf_headers()
        if urlparse(meta.location).netloc != urlparse(url).netloc:
            headers.pop("authorization", None)  # a signed CDN URL: no token to third parties
        _http_download(meta.location, partial, size, headers, progress, cancel)
        note = _verify_file(partial, rf, size)
        os.replace(partial, landed)
    else:
        note = _verify_file(landed, rf, size)
    target.place(rf.name, etag, landed)
    return note


def _http_download(url: str, dest: Path, size: int | None, headers: dict,
                   progress: Progress, cancel: threading.Event) -> None:
    """GET `url` into `dest`, resuming from its current length with Range requests."""
    from huggingface_hub.errors import HfHubHTTPError
    from huggingface_hub.utils import hf_raise_for_status, http_stream_backoff

    errors = _transport_errors()
    failures = 0
    while True:
        have = dest.stat().st_size if dest.exists() else 0
        if size is not None and have > size:
            dest.unlink()
            have = 0
        if size is not None and have == size:
            return
        h = dict(headers)
        h["Accept-Encoding"] = "identity"
        if have:
            h["Range"] = f"bytes={have}-"
        got = 0
        try:
            with http_stream_backoff("GET", url, headers=h, timeout=READ_TIMEOUT,
                                     retry_on_exceptions=(),
                                     retry_on_status_codes=(408, 429, 500, 502, 503, 504)) as r:
                if r.status_code == 416 and size is None:
                    return
                hf_raise_for_status(r)
                mode = "ab" if have and r.status_code == 206 else "wb"
                if mode == "wb" and have:
                    progress.advance(-have)  # the server ignored Range: start over
                # Unbuffered: what arrived is on disk even if the process is killed.
                with open(dest, mode, buffering=0) as f:
                    for chunk in r.iter_bytes():
                        if cancel.is_set():
                            raise KeyboardInterrupt
                        if chunk:
                            f.write(chunk)
                            got += len(chunk)
                            progress.advance(len(chunk))
            if size is None or dest.stat().st_size == size:
                return
            raise OSError(f"connection closed at {dest.stat().st_size} of {size} bytes")
        except errors as e:
            if isinstance(e, HfHubHTTPError):  # an answer, not a network failure
                raise
            if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
                raise KimiError(f"{dest}: disk full ({e.strerror}); free some space and rerun "
                                "to resume") from None
            failures = 0 if got else failures + 1
            if failures >= RETRIES:
                raise KimiError(f"{dest.name}: download failed after {RETRIES} tries "
                                f"({type(e).__name__}: {_first_line(e)})") from None
            if cancel.wait(min(8.0, RETRY_WAIT * 2 ** max(0, failures - 1))):
                raise KeyboardInterrupt from None


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


def _layer_range(layers: str | None, rank: str | None, n_layers: int) -> LayerRange | None:
    if layers and rank:
        raise UsageError("use either --layers or --rank")
    if layers:
        return parse_layers(layers, n_layers)
    if rank:
        return rank_layers(*parse_rank(rank), n_layers)
    return None


def free_space(path: Path) -> int:
    p = path.absolute()
    while not p.exists() and p.parent != p:
        p = p.parent
    return shutil.disk_usage(p).free


def download(repo: str = config.DEFAULT_REPO, revision: str | None = None,
             local_dir: Path | None = None, layers: str | None = None, rank: str | None = None,
             verify_all: bool = False, progress: Progress | None = None) -> DownloadResult:
    """Download what the model needs from `repo` (at `revision`) and verify it."""
    if layers and rank:
        raise UsageError("use either --layers or --rank")
    if layers is not None:
        parse_layers(layers, 1 << 30)  # syntax errors before any network access
    if rank is not None:
        parse_rank(rank)
    progress = progress or Progress(quiet=True)
    if is_offline():
        return _offline(repo, revision, local_dir, layers, rank)
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
            first[name] = _guarded_fetch(target, files[name], progress, cancel, repo)
    cfg = _read_json(target.file("config.json"))
    index = _read_json(target.file(INDEX_FILE))
    n_layers = int(cfg.get("num_hidden_layers") or 0)
    selection = _layer_range(layers, rank, n_layers)
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


def _guarded_fetch(target: Target, rf: RemoteFile, progress: Progress, cancel: threading.Event,
                   repo: str) -> str:
    from huggingface_hub.errors import FileMetadataError, HfHubHTTPError, OfflineModeIsEnabled

    network = (HfHubHTTPError, OfflineModeIsEnabled, FileMetadataError) + tuple(
        e for e in _transport_errors() if e is not OSError)
    try:
        return _fetch(target, rf, progress, cancel)
    except network as e:
        raise hub_error(e, repo, target.revision) from None


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
                note = _guarded_fetch(target, rf, progress, cancel, repo)
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


def cached_dir(repo: str, revision: str | None = None) -> Path | None:
    """The cache snapshot of `repo` that holds its config.json, without network access."""
    from huggingface_hub import try_to_load_from_cache

    try:
        p = try_to_load_from_cache(repo, "config.json", revision=revision)
    except Exception:  # noqa: BLE001 - a malformed id is simply "not cached"
        return None
    return Path(p).parent if isinstance(p, str) else None


def _offline(repo: str, revision: str | None, local_dir: Path | None, layers: str | None,
             rank: str | None) -> DownloadResult:
    root = local_dir.expanduser().resolve() if local_dir else cached_dir(repo, revision)
    if root is None or not (root / "config.json").is_file():
        where = local_dir or f"the Hugging Face cache ({_hf_cache()})"
        raise KimiError(f"{repo}: HF_HUB_OFFLINE is set and {where} does not hold it; unset "
                        "HF_HUB_OFFLINE to download it")
    if not (root / INDEX_FILE).is_file():
        raise KimiError(f"{repo}: HF_HUB_OFFLINE is set and {root} has no {INDEX_FILE}; unset "
                        "HF_HUB_OFFLINE to download it")
    cfg, index = _read_json(root / "config.json"), _read_json(root / INDEX_FILE)
    n_layers = int(cfg.get("num_hidden_layers") or 0)
    selection = _layer_range(layers, rank, n_layers)
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


def _hf_cache() -> str:
    from huggingface_hub import constants

    return str(constants.HF_HUB_CACHE)


def fetch_metadata(repo: str, revision: str | None = None) -> Path:
    """config.json and the index of `repo` (from the cache, else the Hub): the snapshot dir."""
    found = cached_dir(repo, revision)
    if found is not None and (found / INDEX_FILE).is_file():
        return found
    if is_offline():
        raise KimiError(f"{repo}: not in the Hugging Face cache ({_hf_cache()}) and "
                        "HF_HUB_OFFLINE is set; unset it, or `kimi download` the model")
    from huggingface_hub import hf_hub_download

    path = None
    for name in ("config.json", INDEX_FILE):
        try:
            path = Path(hf_hub_download(repo, name, revision=revision))
        except Exception as e:  # noqa: BLE001
            if isinstance(e, KeyboardInterrupt):
                raise
            raise hub_error(e, repo, revision) from None
    return path.parent
