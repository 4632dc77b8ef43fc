"""Time to first token of `kimi serve` for an agent's follow-up request, prefix cached or not.

Starts `kimi serve` on a synthetic checkpoint and sends, per repeat: a conversation (its KV stays
cached), the follow-up that resends it plus one new turn (timed: cached), an unrelated
conversation (evicts the prefix), then the same follow-up again (timed: uncached). Each timed
request asks for one token, so the client's wall time from sending it to the end of its stream
is the time to first token over HTTP; the server's own prefill-to-first-token time is shown too.

    python scripts/bench_serve_cache.py [--preset tiny|small] [--turns 6] [-r 5]
"""

from __future__ import annotations

import argparse
import http.client
import json
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from kimi_cli.checkpoint.synthetic import write_checkpoint

WORDS = ("list read grep edit shell test build file line error patch diff commit branch "
         "module import return value config parse token cache model agent step").split()


def start_server(ckpt: Path) -> tuple[subprocess.Popen, str, list[str]]:
    proc = subprocess.Popen([sys.executable, "-m", "kimi_cli.cli", "serve", "--model", str(ckpt),
                             "--port", "0"], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    lines: list[str] = []
    ready = threading.Event()
    url: list[str] = []

    def drain() -> None:
        for line in proc.stderr:
            lines.append(line)
            m = re.search(r"serving \S+ at (http://\S+)/v1 ", line)
            if m:
                url.append(m.group(1))
                ready.set()
        ready.set()

    threading.Thread(target=drain, daemon=True).start()
    if not ready.wait(300) or not url:
        proc.kill()
        sys.exit("kimi serve did not start:\n" + "".join(lines))
    return proc, url[0], lines


def conversation(salt: int, turns: int) -> list[dict]:
    """An agent-like history: a system prompt, then user / assistant turns of ~60 words."""
    def words(i: int, n: int) -> str:
        return " ".join(WORDS[(salt * 7 + i * 3 + k) % len(WORDS)] for k in range(n))

    messages = [{"role": "system", "content": f"Session {salt}. You are a coding agent. "
                                              + words(0, 80)}]
    for t in range(turns):
        messages += [{"role": "user", "content": words(2 * t + 1, 60)},
                     {"role": "assistant", "content": words(2 * t + 2, 60)}]
    return messages + [{"role": "user", "content": f"Step {turns}: what next?"}]


def ask(url: str, messages: list[dict]) -> tuple[float, dict]:
    """(seconds from sending to the end of the one-token stream, the final usage)."""
    host, port = url.removeprefix("http://").rsplit(":", 1)
    body = json.dumps({"model": "kimi-k2-thinking", "messages": messages, "max_tokens": 1,
                       "temperature": 0, "stream": True,
                       "stream_options": {"include_usage": True}})
    conn = http.client.HTTPConnection(host, int(port), timeout=600)
    t0 = time.perf_counter()
    conn.request("POST", "/v1/chat/completions", body=body,
                 headers={"Content-Type": "application/json"})
    resp = conn.getresponse()
    usage = None
    for raw in resp:
        line = raw.decode().strip()
        if line.startswith("data: {"):
            usage = json.loads(line[6:]).get("usage") or usage
    took = time.perf_counter() - t0
    conn.close()
    if resp.status != 200 or usage is None:
        sys.exit(f"request failed: HTTP {resp.status}")
    return took, usage


def server_ttft(lines: list[str], usage: dict) -> float:
    """The ttft the server logged for the request with this usage (its line may come late)."""
    tag = (f"prompt {usage['prompt_tokens']} tokens "
           f"({usage['prompt_tokens_details']['cached_tokens']} cached)")
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        for line in reversed(lines):
            m = re.search(r"ttft ([\d.]+) s", line)
            if tag in line and m:
                return float(m.group(1))
        time.sleep(0.01)
    return float("nan")


def stdev(xs: list[float]) -> float:
    return statistics.stdev(xs) if len(xs) > 1 else 0.0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default="small", choices=("tiny", "small"))
    ap.add_argument("--turns", type=int, default=6, help="user/assistant turns of history")
    ap.add_argument("-r", "--repeats", type=int, default=5)
    args = ap.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        ckpt = write_checkpoint(Path(tmp) / args.preset, args.preset, seed=1)
        proc, url, lines = start_server(ckpt)
        rows: dict[str, list[tuple[float, float, int, int]]] = {"cached": [], "uncached": []}
        try:
            ask(url, conversation(10_000, 1))  # warm-up: compile, first allocations
            for r in range(args.repeats):
                history = conversation(r, args.turns)
                ask(url, history)
                follow = [*history, {"role": "assistant", "content": "Running the tests."},
                          {"role": "user", "content": "The tests pass. Summarise."}]
                for kind in ("cached", "uncached"):
                    if kind == "uncached":
                        ask(url, conversation(1_000 + r, args.turns))  # evicts the prefix
                    took, usage = ask(url, follow)
                    rows[kind].append((took, server_ttft(lines, usage), usage["prompt_tokens"],
                                       usage["prompt_tokens_details"]["cached_tokens"]))
        finally:
            proc.terminate()
            proc.wait(30)

    print(f"kimi serve, synthetic '{args.preset}' checkpoint, follow-up of "
          f"{rows['cached'][0][2]} prompt tokens, {args.repeats} repeats (mean ± stddev)")
    print(f"{'':10} {'cached tokens':>14} {'TTFT over HTTP':>18} {'server ttft':>16}")
    for kind, got in rows.items():
        client = [g[0] * 1000 for g in got]
        server = [g[1] * 1000 for g in got]
        cached = statistics.mean(g[3] for g in got)
        print(f"{kind:10} {cached:>14.0f} {statistics.mean(client):>10.1f} ± "
              f"{stdev(client):.1f} ms {statistics.mean(server):>10.1f} ± {stdev(server):.1f} ms")
    speedup = statistics.mean(g[0] for g in rows["uncached"]) / statistics.mean(
        g[0] for g in rows["cached"])
    print(f"cached prefix: {speedup:.1f}x faster to the first token")


if __name__ == "__main__":
    main()
