"""The Hugging Face Hub transport of `kimi download`: the repo's file list, one-line errors, the
cache (or folder) layout, and one file's download: plain HTTP resumed with Range requests, or Xet.

Plain HTTP downloads keep their partial file across runs and resume with a Range request (also
in-process after a dropped connection); Xet-stored files go through huggingface_hub and hf_xet.
"""

from __future__ import annotations

import errno
import hashlib
import importlib
import importlib.util
import inspect
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol
from urllib.parse import urlparse

from .errors import KimiError

PARTIAL_SUFFIX = ".kimi-partial"
RETRIES = 5  # consecutive failed attempts on one file (reset whenever bytes arrive)
RETRY_WAIT = 0.5  # seconds before the first retry; doubles, at most 8 s
READ_TIMEOUT = 60.0
# Checks a finished file against the Hub's size and hashes; returns a note for the progress line.
Verify = Callable[[Path, "RemoteFile", "int | None"], str]


class ProgressSink(Protocol):
    """Where a fetch reports bytes (download.Progress): negative when a restart drops them."""

    def advance(self, n: int) -> None: ...


# ---------------------------------------------------------------------------------------------
# The Hub's view of the repo


@dataclass(frozen=True)
class RemoteFile:
    name: str
    size: int | None
    sha256: str | None  # LFS files: the Hub's sha256 of the content
    blob_id: str | None  # the git blob id (sha1 of "blob <size>\0" + content) of small files


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
        return KimiError(f"{repo}: a file is missing on the Hub ({first_line(exc)})")
    if isinstance(exc, HfHubHTTPError):
        code = getattr(getattr(exc, "response", None), "status_code", None)
        hint = "; check HF_TOKEN" if code in (401, 403) else ""
        return KimiError(f"{repo}: the Hub answered HTTP {code}: {first_line(exc)}{hint}")
    return KimiError(f"cannot reach the Hub at {endpoint()} ({type(exc).__name__}: "
                     f"{first_line(exc)}); check the network, or set HF_HUB_OFFLINE=1 to use "
                     "the files already in the cache")


def first_line(exc: BaseException) -> str:
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


def cached_dir(repo: str, revision: str | None = None) -> Path | None:
    """The cache snapshot of `repo` that holds its config.json, without network access."""
    from huggingface_hub import try_to_load_from_cache

    try:
        p = try_to_load_from_cache(repo, "config.json", revision=revision)
    except Exception:  # noqa: BLE001 - a malformed id is simply "not cached"
        return None
    return Path(p).parent if isinstance(p, str) else None


def hf_cache() -> str:
    from huggingface_hub import constants

    return str(constants.HF_HUB_CACHE)


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


def fetch_file(target: Target, rf: RemoteFile, progress: ProgressSink, cancel: threading.Event,
               verify: Verify) -> str:
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
        return verify(path, rf, size)
    etag = meta.etag
    landed = target.blob(etag, rf.name)
    if not landed.exists():
        partial = target.partial(rf)
        partial.parent.mkdir(parents=True, exist_ok=True)
        headers = build_hf_headers()
        if urlparse(meta.location).netloc != urlparse(url).netloc:
            headers.pop("authorization", None)  # a signed CDN URL: no token to third parties
        _http_download(meta.location, partial, size, headers, progress, cancel)
        note = verify(partial, rf, size)
        os.replace(partial, landed)
    else:
        note = verify(landed, rf, size)
    target.place(rf.name, etag, landed)
    return note


def _http_download(url: str, dest: Path, size: int | None, headers: dict,
                   progress: ProgressSink, cancel: threading.Event) -> None:
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
                                f"({type(e).__name__}: {first_line(e)})") from None
            if cancel.wait(min(8.0, RETRY_WAIT * 2 ** max(0, failures - 1))):
                raise KeyboardInterrupt from None


def guarded_fetch(target: Target, rf: RemoteFile, progress: ProgressSink, cancel: threading.Event,
                  repo: str, verify: Verify) -> str:
    from huggingface_hub.errors import FileMetadataError, HfHubHTTPError, OfflineModeIsEnabled

    network = (HfHubHTTPError, OfflineModeIsEnabled, FileMetadataError) + tuple(
        e for e in _transport_errors() if e is not OSError)
    try:
        return fetch_file(target, rf, progress, cancel, verify)
    except network as e:
        raise hub_error(e, repo, target.revision) from None


class _HubBar:
    """A tqdm stand-in for huggingface_hub's Xet downloads: bytes written go to our Progress."""

    progress: ProgressSink | None = None

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
