"""The HTTP server: routing, API keys, JSON bodies, SSE framing and one log line per request.

Standard library `ThreadingHTTPServer` (as mlx-lm's server): a thread per connection submits
jobs to the scheduler; the calling (main) thread runs the model until Ctrl-C.
"""

from __future__ import annotations

import hmac
import json
import select
import socket
import sys
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

from .. import config
from ..errors import KimiError
from . import anthropic_api, openai_api
from .plan import Plan, Served
from .scheduler import Job, Scheduler
from .stream import Finish, Usage, choice_events, reply_events, total_usage
from .wire import ApiError, anthropic_error, openai_error


class Server(ThreadingHTTPServer):
    daemon_threads = True  # a connection left open never keeps the process alive
    allow_reuse_address = True

    def __init__(self, address, served: Served, scheduler: Scheduler, api_key: str | None,
                 log: Callable[[str], None]):
        super().__init__(address, Handler)
        self.served = served
        self.scheduler = scheduler
        self.api_key = api_key
        self.log = log


def _is_anthropic(path: str) -> bool:
    return path.startswith("/v1/messages")


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: Server

    # -- plumbing ---------------------------------------------------------------------------
    def log_message(self, format, *args) -> None:  # noqa: A002 - the base class's name
        pass  # one line per request is written by _log instead

    def _log(self, status: int, note: str) -> None:
        took = time.perf_counter() - self._t0
        self.server.log(f"kimi serve: {self.command} {self._path} {status} {took:.2f} s | {note}")

    def _send_json(self, status: int, body: dict, headers: dict | None = None) -> None:
        data = json.dumps(body, ensure_ascii=False).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(data)

    def _send_error(self, err: ApiError) -> None:
        shape = anthropic_error if _is_anthropic(self._path) else openai_error
        headers = {"Retry-After": "1"} if err.status == 503 else None
        if err.status == 401:
            headers = {"WWW-Authenticate": "Bearer"}
        self._send_json(err.status, shape(err), headers)
        self._log(err.status, err.message)

    def _client_gone(self) -> bool:
        """True once the client closed its end (a pipelined request is not a close)."""
        sock = self.connection
        try:
            ready, _, _ = select.select([sock], [], [], 0)
            return bool(ready) and sock.recv(1, socket.MSG_PEEK) == b""
        except (OSError, ValueError):
            return True

    def _body(self) -> dict:
        length = self.headers.get("Content-Length")
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            raise ApiError(411, "send the body with a Content-Length (chunked bodies are not "
                                "supported)")
        try:
            n = int(length or 0)
        except ValueError:
            raise ApiError(400, f"bad Content-Length {length!r}") from None
        if n > config.SERVE_MAX_BODY:
            self.close_connection = True
            raise ApiError(413, f"request body of {n} bytes is over the "
                                f"{config.SERVE_MAX_BODY} byte limit", kind="too_large")
        raw = self.rfile.read(n) if n > 0 else b""
        try:
            body = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ApiError(400, f"the request body is not valid JSON ({e})") from None
        if not isinstance(body, dict):
            raise ApiError(400, "the request body must be a JSON object")
        return body

    def _authorized(self) -> bool:
        key = self.server.api_key
        if key is None:
            return True
        auth = self.headers.get("Authorization", "")
        given = auth[7:].strip() if auth[:7].lower() == "bearer " else None
        given = given or self.headers.get("x-api-key")  # what Anthropic clients send
        return given is not None and hmac.compare_digest(given.encode(), key.encode())

    # -- routing ----------------------------------------------------------------------------
    def do_GET(self) -> None:
        self._handle("GET")

    def do_POST(self) -> None:
        self._handle("POST")

    def do_OPTIONS(self) -> None:
        self._handle("OPTIONS")

    def _handle(self, method: str) -> None:
        self._t0 = time.perf_counter()
        self._path = urlsplit(self.path).path.rstrip("/") or "/"
        served = self.server.served
        get_routes = {"/health": self._health, "/v1/models": lambda: openai_api.models(served),
                      f"/v1/models/{served.name}": lambda: openai_api.model_card(served)}
        post_routes = {"/v1/chat/completions": openai_api.chat_plan,
                       "/v1/completions": openai_api.completion_plan,
                       "/v1/messages": anthropic_api.messages_plan,
                       "/v1/messages/count_tokens": anthropic_api.count_tokens}
        try:
            if not self._authorized():
                raise ApiError(401, "invalid or missing API key (send it as "
                                    "`Authorization: Bearer KEY` or `x-api-key: KEY`)",
                               kind="authentication", code="invalid_api_key")
            if method == "GET" and self._path in get_routes:
                self._send_json(200, get_routes[self._path]())
                self._log(200, "ok")
            elif method == "POST" and self._path in post_routes:
                self._generate(post_routes[self._path], self._body())
            elif self._path.startswith("/v1/models/") and method == "GET":
                raise ApiError(404, f"model {self._path[11:]!r} not found: this server serves "
                                    f"{served.name!r}", kind="not_found", code="model_not_found")
            elif self._path in get_routes or self._path in post_routes:
                raise ApiError(405, f"{method} is not allowed on {self._path}")
            else:
                raise ApiError(404, f"no such endpoint: {method} {self._path}",
                               kind="not_found")
        except ApiError as e:
            self._send_error(e)
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True
            self._log(499, "the client closed the connection")
        except Exception as e:  # never a traceback to the client; one line in the log
            self._send_error(ApiError(500, _describe(e), kind="internal"))

    def _health(self) -> dict:
        sched = self.server.scheduler
        return {"status": "ok", "model": self.server.served.name, "busy": sched.busy,
                "running": len(sched.running),
                "waiting": sched.waiting}

    # -- generation -------------------------------------------------------------------------
    def _generate(self, make_plan, body: dict) -> None:
        served = self.server.served
        result = make_plan(body, served)
        if not isinstance(result, Plan):  # count_tokens: no generation
            self._send_json(200, result)
            self._log(200, f"{result['input_tokens']} input tokens")
            return
        plan = result
        job = self.server.scheduler.submit(Job(plan.prompt_ids, plan.settings, plan.n))

        def reply(choice: int, evs):
            return reply_events(evs, served.tokenizer, plan.stops, raw=plan.raw,
                                on_stop=lambda: job.stop_choice(choice))

        events = choice_events(job.stream(self._client_gone), plan.n, reply)
        finish: list[Finish] = []

        def watched(evs):
            for i, ev in evs:
                if isinstance(ev, Finish):
                    finish.append(ev)
                yield i, ev

        try:
            if plan.stream:
                self._stream(plan, watched(events))
            else:
                self._respond(plan, watched(events))
        except (BrokenPipeError, ConnectionResetError):
            job.cancel()
            self.close_connection = True
            self._log(499, "the client went away; generation stopped")
            return
        except ApiError:
            raise
        except Exception as e:  # the model failed (e.g. a scripted model out of outputs)
            err = ApiError(500, _describe(e), kind="internal")
            if not plan.stream:
                raise err from None
            self._stream_error(err)  # the headers are out: the error is the last event
            self._log(500, err.message)
            return
        finally:
            job.cancel()  # a no-op once the job is done
        if len(finish) < plan.n:
            self._log(499, "the client went away; generation stopped")
            return
        reasons = ",".join(f.reason for f in finish)
        self._log(200, _usage_note(total_usage([f.usage for f in finish]), reasons,
                                   plan.stream, job.peak_batch))

    def _respond(self, plan: Plan, events) -> None:
        served = self.server.served
        if self._path == "/v1/messages":  # one choice: no index
            body = anthropic_api.message_response((ev for _, ev in events), served, plan)
        elif plan.raw:
            body = openai_api.completion_response(events, served)
        else:
            body = openai_api.chat_response(events, served)
        if body is not None:
            self._send_json(200, body)

    def _stream(self, plan: Plan, events) -> None:
        served = self.server.served
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Connection", "close")  # the body ends when the connection does
        self.end_headers()
        self.close_connection = True
        write = self.wfile.write
        if self._path == "/v1/messages":
            for name, data in anthropic_api.message_events((ev for _, ev in events), served,
                                                           plan):
                write(f"event: {name}\ndata: {json.dumps(data, ensure_ascii=False)}\n\n"
                      .encode())
                self.wfile.flush()
            return
        chunks = (openai_api.completion_chunks if plan.raw else openai_api.chat_chunks)
        for chunk in chunks(events, served, plan):
            write(f"data: {json.dumps(chunk, ensure_ascii=False)}\n\n".encode())
            self.wfile.flush()
        write(b"data: [DONE]\n\n")
        self.wfile.flush()

    def _stream_error(self, err: ApiError) -> None:
        try:
            if self._path == "/v1/messages":
                data = f"event: error\ndata: {json.dumps(anthropic_error(err))}\n\n"
            else:
                data = f"data: {json.dumps(openai_error(err))}\n\n"
            self.wfile.write(data.encode())
            self.wfile.flush()
        except OSError:
            pass


def _describe(e: Exception) -> str:
    return str(e) if isinstance(e, KimiError) else f"internal error: {type(e).__name__}: {e}"


def _usage_note(u: Usage, reason: str, stream: bool, batch: int) -> str:
    return (f"{'stream' if stream else 'whole'} | prompt {u.prompt_tokens} tokens "
            f"({u.cached_tokens} cached), ttft {u.ttft:.2f} s | {u.completion_tokens} generated, "
            f"{u.generation_tps:.1f} tok/s | {reason} | batch {batch}")


def serve(served: Served, engine, host: str, port: int, api_key: str | None = None,
          max_queue: int = config.SERVE_MAX_QUEUE, parallel: int = config.SERVE_PARALLEL,
          announce: Callable[[str], None] | None = None) -> None:
    """Serve until Ctrl-C (KeyboardInterrupt propagates to the caller, after a clean stop)."""

    def log(line: str) -> None:
        sys.stderr.write(line + "\n")
        sys.stderr.flush()

    scheduler = Scheduler(engine, max_queue, log, parallel)
    try:
        httpd = Server((host, port), served, scheduler, api_key, log)
    except OSError as e:
        raise KimiError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
    bound_host, bound_port = httpd.server_address[:2]
    shown = f"[{bound_host}]" if ":" in str(bound_host) else bound_host
    thread = threading.Thread(target=httpd.serve_forever, name="http", daemon=True)
    thread.start()
    (announce or log)(f"kimi: serving {served.name} at http://{shown}:{bound_port}/v1 "
                      "(OpenAI and Anthropic APIs); Ctrl-C stops")
    try:
        scheduler.run_forever()
    finally:
        httpd.shutdown()
        httpd.server_close()
