"""Saved conversations: one readable JSONL file per session, and its KV cache beside it.

`$XDG_STATE_HOME/kimi-mlx/sessions/<id>.jsonl`: a header line (`"type": "session"`: model,
created, name, system prompt, settings), then one message per line (role, content,
reasoning_content, tool_calls, time...). `<id>.kv.safetensors` holds each layer's latent KV up to
the cached length, the token ids it covers and the model's fingerprint, so resuming a long
conversation does not process it again; a cache from another model is refused.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import secrets
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

from . import config
from .errors import KimiError

FORMAT_VERSION = 1
KV_FORMAT = "kimi-mlx-kv"
# Keys the chat template reads; everything else in a message line is for people and tools.
TEMPLATE_KEYS = ("role", "content", "reasoning_content", "tool_calls", "tool_call_id", "name")


def sessions_dir() -> Path:
    return config.state_dir() / "sessions"


# Sessions, KV caches and history hold tool outputs (a printed token, a file read): only the user
# may read them. Files 0600, directories 0700.
PRIVATE_FILE = 0o600
PRIVATE_DIR = 0o700


def private_dir(path: Path) -> Path:
    """Make `path` and its missing parents 0700; tighten existing ones only inside kimi's own
    state directory (a user's ~/.local/state is theirs to set)."""
    path = Path(path)
    missing = []
    p = path
    while not p.exists() and p != p.parent:
        missing.append(p)
        p = p.parent
    for d in reversed(missing):
        with contextlib.suppress(FileExistsError):
            d.mkdir(mode=PRIVATE_DIR)
        os.chmod(d, PRIVATE_DIR)  # mkdir's mode passes through the umask
    own = config.state_dir()
    for d in (path, *path.parents):
        if d not in missing and (d == own or own in d.parents) and d.is_dir():
            if d.stat().st_mode & 0o077:
                os.chmod(d, PRIVATE_DIR)
    return path


def open_private(path: Path, mode: str = "w"):
    """`open(path, mode)` for a text file only the user may read (existing ones tightened)."""
    flags = os.O_WRONLY | os.O_CREAT | (os.O_APPEND if mode.startswith("a") else os.O_TRUNC)
    fd = os.open(path, flags, PRIVATE_FILE)
    try:
        os.fchmod(fd, PRIVATE_FILE)
    except OSError:
        os.close(fd)
        raise
    return os.fdopen(fd, mode, encoding="utf-8")


def new_id() -> str:
    """Sortable by time, unique enough for one person: 20250101-093000-a1b2."""
    return time.strftime("%Y%m%d-%H%M%S") + "-" + secrets.token_hex(2)


def now_iso() -> str:
    return datetime.now().astimezone().isoformat(timespec="seconds")


@dataclass
class Session:
    """A conversation and its file. The file appears with the first message."""

    path: Path
    header: dict
    messages: list[dict] = field(default_factory=list)

    @classmethod
    def create(cls, model: str, settings: dict | None = None, system: str | None = None,
               directory: Path | None = None) -> Session:
        sid = new_id()
        directory = directory or sessions_dir()
        header = {"type": "session", "version": FORMAT_VERSION, "id": sid, "created": now_iso(),
                  "model": model, "name": None, "system": system, "settings": settings or {}}
        return cls(directory / f"{sid}.jsonl", header)

    @classmethod
    def load(cls, path: Path) -> Session:
        path = Path(path)
        try:
            lines = path.read_text(encoding="utf-8").splitlines()
        except FileNotFoundError:
            raise KimiError(f"{path}: no such session file") from None
        except (OSError, UnicodeDecodeError) as e:
            raise KimiError(f"{path}: cannot read it ({e})") from None
        records = []
        for n, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                if n == len(lines):  # a last line cut short by a crash: drop it
                    break
                raise KimiError(f"{path}:{n}: not a JSON line") from None
            if not isinstance(rec, dict):
                raise KimiError(f"{path}:{n}: expected a JSON object")
            records.append(rec)
        if not records or records[0].get("type") != "session":
            raise KimiError(f"{path}: not a kimi session file (no header line)")
        header = records[0]
        if header.get("version", 0) > FORMAT_VERSION:
            raise KimiError(f"{path}: written by a newer kimi (format {header.get('version')})")
        messages = [r for r in records[1:] if "role" in r]
        return cls(path, header, messages)

    @property
    def id(self) -> str:
        return self.header["id"]

    @property
    def kv_path(self) -> Path:
        return self.path.with_name(f"{self.id}.kv.safetensors")

    @property
    def system(self) -> str | None:
        return self.header.get("system")

    @property
    def title(self) -> str:
        """Its first message, on one line."""
        first = next((m for m in self.messages if m.get("role") == "user"), None)
        return _one_line(first.get("content") or "") if first else "(empty)"

    def prompt_messages(self) -> list[dict]:
        """The conversation as the chat template takes it (system prompt first, if set)."""
        out = [{"role": "system", "content": self.system}] if self.system else []
        for m in self.messages:
            out.append({k: m[k] for k in TEMPLATE_KEYS if k in m and m[k] is not None})
        return out

    def append(self, message: dict) -> None:
        message.setdefault("time", now_iso())
        self.messages.append(message)
        if not self.path.exists():
            self.save()
            return
        with open_private(self.path, "a") as f:
            f.write(_line(message))

    def save(self) -> None:
        """Write the whole file again (header changes, /retry): atomically."""
        private_dir(self.path.parent)
        tmp = self.path.with_name(self.path.name + ".tmp")
        with open_private(tmp) as f:
            f.write(_line(self.header) + "".join(_line(m) for m in self.messages))
        os.replace(tmp, self.path)

    def update_header(self, **changes) -> None:
        self.header.update(changes)
        if self.path.exists():
            self.save()

    def pop(self) -> dict:
        msg = self.messages.pop()
        if self.path.exists():
            self.save()
        return msg


def _line(obj: dict) -> str:
    return json.dumps(obj, ensure_ascii=False) + "\n"


def _one_line(text: str, n: int = 60) -> str:
    text = " ".join(text.split())
    return text if len(text) <= n else text[: n - 1] + "…"


@dataclass
class SessionInfo:
    id: str
    path: Path
    name: str | None
    title: str
    model: str
    created: str
    updated: float  # mtime
    messages: int
    kv_bytes: int


def list_sessions(directory: Path | None = None) -> list[SessionInfo]:
    """Saved sessions, most recently used first (unreadable files are skipped)."""
    directory = directory or sessions_dir()
    out = []
    for path in directory.glob("*.jsonl") if directory.is_dir() else []:
        try:
            s = Session.load(path)
        except KimiError:
            continue
        kv = s.kv_path
        out.append(SessionInfo(s.id, path, s.header.get("name"), s.title,
                               str(s.header.get("model", "")), str(s.header.get("created", "")),
                               path.stat().st_mtime, len(s.messages),
                               kv.stat().st_size if kv.exists() else 0))
    out.sort(key=lambda i: (i.updated, i.id), reverse=True)
    return out


def find_session(ref: str, directory: Path | None = None) -> Path:
    """A session by id, unique id prefix, or name."""
    infos = list_sessions(directory)
    for match in ([i for i in infos if i.id == ref], [i for i in infos if i.name == ref],
                  [i for i in infos if i.id.startswith(ref)]):
        if len(match) == 1:
            return match[0].path
        if len(match) > 1:
            raise KimiError(f"session {ref!r} is ambiguous: "
                            + ", ".join(i.id for i in match[:5]))
    raise KimiError(f"no session {ref!r} (list them with /sessions in kimi chat)")


def latest_session(directory: Path | None = None) -> Path | None:
    infos = list_sessions(directory)
    return infos[0].path if infos else None


# ---------------------------------------------------------------------------------------------
# KV cache


class KVMismatch(KimiError):
    """A saved KV cache that cannot be used with this model (the chat processes the prompt)."""


@dataclass
class KVInfo:
    tokens: int
    bytes: int
    seconds: float


def model_fingerprint(model) -> str:
    """Identifies the weights (not the files): the architecture, the compute dtype and a few
    values of every resident parameter. A pack and the release it came from agree."""
    h = hashlib.sha256()
    source = getattr(model, "source", None)
    if not hasattr(model, "parameters"):  # the scripted test double: positions only
        h.update(f"scripted:{getattr(model, 'vocab_size', 0)}".encode())
        return "scripted-" + h.hexdigest()[:16]
    import mlx.core as mx
    import numpy as np
    from mlx.utils import tree_flatten

    args = getattr(model, "args", None)
    h.update(repr(sorted(vars(args).items()) if args is not None else source).encode())
    params = [(k, v) for k, v in tree_flatten(model.parameters())
              if ".mlp.experts." not in k]  # streamed expert slots change with the cache
    samples = [v.reshape(-1)[:64] for _, v in params]
    mx.eval(samples)
    for (k, v), s in zip(params, samples):
        h.update(k.encode())
        h.update(str(v.dtype).encode())
        h.update(np.array(s.astype(mx.float32) if s.dtype == mx.bfloat16 else s).tobytes())
    return h.hexdigest()[:32]


def save_kv(path: Path, engine, fingerprint: str) -> KVInfo | None:
    """Write the engine's KV cache (up to what it holds) and its token ids; None if empty."""
    import mlx.core as mx

    ids = list(engine.cached_ids)
    if not ids:
        return None
    t0 = time.perf_counter()
    arrays = {"token_ids": mx.array(ids, dtype=mx.int32)}
    kind = "positions"
    for i, c in enumerate(engine.cache):
        state = c.state
        if state:
            kind = "latent"
            arrays[f"layer.{i}"] = state[0][..., : len(ids), :]
    meta = {"format": KV_FORMAT, "version": str(FORMAT_VERSION), "model": fingerprint,
            "kind": kind, "layers": str(len(engine.cache)), "tokens": str(len(ids))}
    private_dir(path.parent)
    tmp = path.with_name(path.stem + ".tmp.safetensors")
    os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, PRIVATE_FILE))
    os.chmod(tmp, PRIVATE_FILE)  # before it holds anything; mlx keeps the mode when it rewrites
    mx.save_safetensors(str(tmp), arrays, metadata=meta)
    os.chmod(tmp, PRIVATE_FILE)
    os.replace(tmp, path)
    return KVInfo(len(ids), path.stat().st_size, time.perf_counter() - t0)


def load_kv(path: Path, engine, fingerprint: str) -> KVInfo:
    """Put a saved KV cache into `engine` (its prefix reuse then skips those tokens).
    Raises KVMismatch for another model's cache or a damaged file; the engine is unchanged."""
    import mlx.core as mx

    t0 = time.perf_counter()
    try:
        arrays, meta = mx.load(str(path), return_metadata=True)
    except Exception as e:  # noqa: BLE001 - any unreadable file is the same to the user
        raise KVMismatch(f"{path}: unreadable KV cache ({e})") from None
    if meta.get("format") != KV_FORMAT:
        raise KVMismatch(f"{path}: not a kimi KV cache")
    if meta.get("model") != fingerprint:
        raise KVMismatch(f"{path}: the KV cache was made by a different model (or dtype)")
    if int(meta.get("layers", -1)) != len(engine.cache) or "token_ids" not in arrays:
        raise KVMismatch(f"{path}: the KV cache does not fit this model's layers")
    ids = arrays["token_ids"].tolist()
    n = len(ids)
    fresh = engine.model.make_cache()
    if meta.get("kind") == "latent":
        layers = [arrays.get(f"layer.{i}") for i in range(len(fresh))]
        if any(a is None or a.shape[2] != n for a in layers):
            raise KVMismatch(f"{path}: the KV cache is incomplete")
        mx.eval(layers)
        for c, a in zip(fresh, layers):
            c.state = [a]
    else:
        for c in fresh:
            c.offset = n
    engine.cache = fresh
    engine.cached_ids = ids
    return KVInfo(n, path.stat().st_size, time.perf_counter() - t0)


def remove_kv(path: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        path.unlink()
