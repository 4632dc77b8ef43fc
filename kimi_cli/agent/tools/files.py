"""Reading and replacing workspace files safely: only regular files are opened (never a FIFO
or device, which would block or never end), and writes replace the file instead of writing into it.
"""

from __future__ import annotations

import contextlib
import os
import stat
import tempfile
from pathlib import Path

from .base import ToolError


def read_bytes(path: Path, shown: str, limit: int) -> bytes:
    """A regular file's bytes; opened without blocking and checked again once open."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_NOCTTY", 0))
    except FileNotFoundError:
        raise ToolError(f"{shown}: no such file") from None
    with os.fdopen(fd, "rb") as f:
        st = os.fstat(f.fileno())
        if stat.S_ISDIR(st.st_mode):
            raise ToolError(f"{shown} is a directory; use list_files")
        if not stat.S_ISREG(st.st_mode):
            raise ToolError(f"{shown} is not a regular file")
        if st.st_size > limit:
            raise ToolError(f"{shown} is larger than {limit >> 20} MB; use grep or shell")
        return f.read()


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def replace(path: Path, text: str) -> int:
    """Write `text` to a temporary file beside `path` and rename it over `path`, keeping its
    mode: a hard link to `path` (maybe to a file outside the workspace) is never written
    through. Returns how many links the old file had."""
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        old = os.stat(path)
    except FileNotFoundError:
        old = None
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".kimi-tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="") as f:
            f.write(text)
        os.chmod(tmp, stat.S_IMODE(old.st_mode) if old else 0o666 & ~_umask())
        if old and os.geteuid() == 0:
            os.chown(tmp, old.st_uid, old.st_gid)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    return old.st_nlink if old else 0
