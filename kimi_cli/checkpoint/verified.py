"""Verified markers: a record that a downloaded file's sha256 matched the Hub's, per blob.

Kept in the state dir (never inside the Hugging Face cache); a marker holds only while the file
keeps the size and modification time it had when hashed, so a later change voids it.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from .. import config


def _marker_dir() -> Path:
    return config.state_dir() / "verified"


def _identity(path: Path) -> dict:
    """What must not change for a marker to hold; a rename (partial file -> blob) keeps it."""
    st = path.resolve().stat()  # a snapshot link points at its blob: the marker is the blob's
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "dev": st.st_dev, "ino": st.st_ino}


def _marker(sha256: str) -> Path:
    return _marker_dir() / f"{sha256}.json"


def record(path: str | os.PathLike, sha256: str) -> None:
    """Note that `path` (its blob, when a symlink) hashed to `sha256`; best effort."""
    try:
        entry = {**_identity(Path(path)), "sha256": sha256, "verified_at": time.time()}
        d = _marker_dir()
        d.mkdir(parents=True, exist_ok=True)
        tmp = d / f".{sha256}.{os.getpid()}.tmp"
        tmp.write_text(json.dumps(entry))
        os.replace(tmp, _marker(sha256))
    except OSError:
        pass  # a read-only state dir only costs a rehash next time


def is_verified(path: str | os.PathLike, sha256: str | None = None) -> bool:
    """Whether `path` was verified and has not changed since. Without `sha256`, the blob's name
    (Hugging Face cache blobs are named by their sha256), else any marker of this very file."""
    p = Path(path)
    try:
        ident = _identity(p)
    except OSError:
        return False
    if sha256 is not None:
        candidates = [_marker(sha256)]
    else:
        candidates = [_marker(p.resolve().name)]
        if not candidates[0].is_file() and _marker_dir().is_dir():
            candidates = sorted(_marker_dir().glob("*.json"))
    for marker in candidates:
        try:
            entry = json.loads(marker.read_text())
        except (OSError, ValueError):
            continue
        if (isinstance(entry, dict) and marker.stem == entry.get("sha256")
                and all(entry.get(k) == v for k, v in ident.items())):
            return True
    return False
