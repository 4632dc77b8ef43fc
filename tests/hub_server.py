"""A local stand-in for the Hugging Face Hub: serves one repo from a directory over real HTTP.

Only the endpoints huggingface_hub calls for `kimi download`: the model info with file metadata
(`/api/models/{repo}[/revision/{rev}]?blobs=True`) and `HEAD`/`GET /{repo}/resolve/{rev}/{file}`
with the Hub's headers (X-Repo-Commit, ETag / X-Linked-Etag, X-Linked-Size) and Range requests.
Faults on demand: a connection dropped part-way through a file, a stall, a size that lies.
"""

from __future__ import annotations

import hashlib
import json
import re
import socket
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlparse

LFS_SUFFIXES = (".safetensors", ".model")  # what the release stores with Git LFS


@dataclass
class Request:
    method: str
    path: str
    range: str | None
    authorization: str | None


@dataclass
class HubRepo:
    repo: str
    root: Path
    commit: str = hashlib.sha1(b"kimi-test-commit").hexdigest()
    sizes: dict[str, int] = field(default_factory=dict)  # lies told by the model info
    drop_once: dict[str, int] = field(default_factory=dict)  # file -> bytes sent, then closed
    stall: dict[str, int] = field(default_factory=dict)  # file -> bytes sent, then wait
    wrong_sha256: set[str] = field(default_factory=set)  # the model info lists a wrong hash
    release: threading.Event = field(default_factory=threading.Event)
    requests: list[Request] = field(default_factory=list)

    def files(self) -> list[str]:
        return sorted(str(p.relative_to(self.root)) for p in self.root.rglob("*") if p.is_file())

    def meta(self, name: str) -> dict:
        data = (self.root / name).read_bytes()
        blob_id = hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()
        entry = {"rfilename": name, "size": self.sizes.get(name, len(data)), "blobId": blob_id}
        if name.endswith(LFS_SUFFIXES):
            sha = hashlib.sha256(b"not this" if name in self.wrong_sha256 else data)
            entry["lfs"] = {"size": entry["size"], "sha256": sha.hexdigest(), "pointerSize": 134}
        return entry

    def etag(self, name: str) -> str:
        data = (self.root / name).read_bytes()
        m = self.meta(name)
        return hashlib.sha256(data).hexdigest() if "lfs" in m else m["blobId"]


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    hub: HubRepo

    def log_message(self, *args) -> None:  # quiet
        pass

    def _record(self) -> None:
        self.hub.requests.append(Request(self.command, unquote(urlparse(self.path).path),
                                         self.headers.get("Range"),
                                         self.headers.get("Authorization")))

    def _send(self, code: int, body: bytes = b"", headers: dict | None = None) -> None:
        self.send_response(code)
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _error(self, code: int, error_code: str, message: str) -> None:
        body = json.dumps({"error": message}).encode()
        self._send(code, body, {"Content-Type": "application/json", "X-Error-Code": error_code,
                                "X-Error-Message": message})

    def do_HEAD(self) -> None:  # noqa: N802
        self._record()
        self._route()

    def do_GET(self) -> None:  # noqa: N802
        self._record()
        self._route()

    def _route(self) -> None:
        path = unquote(urlparse(self.path).path)
        m = re.fullmatch(r"/api/models/([^/]+/[^/]+)(?:/revision/([^/]+))?", path)
        if m:
            return self._info(m.group(1), m.group(2) or "main")
        m = re.fullmatch(r"/([^/]+/[^/]+)/resolve/([^/]+)/(.+)", path)
        if m:
            return self._resolve(m.group(1), m.group(2), m.group(3))
        self._error(404, "EntryNotFound", f"no route {path}")

    def _known(self, repo: str, rev: str) -> bool:
        if repo != self.hub.repo:
            self._error(404, "RepoNotFound", f"Repository {repo} not found")
            return False
        if rev not in ("main", self.hub.commit):
            self._error(404, "RevisionNotFound", f"Invalid rev id: {rev}")
            return False
        return True

    def _info(self, repo: str, rev: str) -> None:
        if not self._known(repo, rev):
            return
        hub = self.hub
        body = json.dumps({"id": repo, "modelId": repo, "sha": hub.commit, "private": False,
                           "siblings": [hub.meta(f) for f in hub.files()]}).encode()
        self._send(200, body, {"Content-Type": "application/json"})

    def _resolve(self, repo: str, rev: str, name: str) -> None:
        if not self._known(repo, rev):
            return
        hub = self.hub
        file = hub.root / name
        if not file.is_file():
            self._error(404, "EntryNotFound", f"{name} does not exist")
            return
        data = file.read_bytes()
        etag = hub.etag(name)
        headers = {"X-Repo-Commit": hub.commit, "ETag": f'"{etag}"', "Accept-Ranges": "bytes",
                   "Content-Type": "application/octet-stream"}
        if name.endswith(LFS_SUFFIXES):
            headers.update({"X-Linked-Etag": f'"{etag}"', "X-Linked-Size": str(len(data))})
        if self.command == "HEAD":
            self.send_response(200)
            for k, v in headers.items():
                self.send_header(k, v)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            return
        start = 0
        rng = self.headers.get("Range")
        code = 200
        if rng:
            m = re.fullmatch(r"bytes=(\d+)-", rng.strip())
            start = int(m.group(1)) if m else 0
            if start >= len(data):
                self._send(416, b"", {"Content-Range": f"bytes */{len(data)}"})
                return
            code = 206
            headers["Content-Range"] = f"bytes {start}-{len(data) - 1}/{len(data)}"
        body = data[start:]
        self.send_response(code)
        for k, v in headers.items():
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        cut = hub.drop_once.pop(name, None)
        stall = hub.stall.pop(name, None)
        if cut is not None or stall is not None:
            n = max(0, (cut if cut is not None else stall) - start)
            self.wfile.write(body[:n])
            self.wfile.flush()
            if stall is not None:
                hub.release.wait(60)
            self.close_connection = True
            try:
                self.connection.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            return
        self.wfile.write(body)


class HubServer:
    """`with HubServer(repo) as url:` serves `repo` on 127.0.0.1 at a free port."""

    def __init__(self, hub: HubRepo):
        self.hub = hub
        handler = type("Handler", (_Handler,), {"hub": hub})
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.httpd.daemon_threads = True
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        host, port = self.httpd.server_address[:2]
        return f"http://{host}:{port}"

    def __enter__(self) -> str:
        self.thread.start()
        return self.url

    def __exit__(self, *exc) -> None:
        self.hub.release.set()
        self.httpd.shutdown()
        self.httpd.server_close()
