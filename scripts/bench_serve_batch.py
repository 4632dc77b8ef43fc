"""Aggregate decode speed of `kimi serve` for 1, 2 and 4 concurrent clients: batched vs one at a time.

Starts `kimi serve` on a synthetic checkpoint twice (`--parallel 4`, then `--parallel 1`); per
client count, every client sends its own greedy completions back to back; aggregate tok/s is all
completion tokens over the wall time. Then an agent-style second turn's cached_tokens per mode.

    python scripts/bench_serve_batch.py [--preset tiny|small] [-n 64] [-r 3] [--clients 1,2,4]
"""

from __future__ import annotations

import argparse
import http.client
import json
import re
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from kimi_cli.checkpoint.synthetic import write_checkpoint

PROMPTS = ["Write a function that parses a config file.", "Explain the cache.",
           "List the files in the build directory and say which are stale.", "Hello"]


def start_server(ckpt: Path, parallel: int) -> tuple[subprocess.Popen, str]:
    proc = subprocess.Popen([sys.executable, "-m", "kimi_cli.cli", "serve", "--model", str(ckpt),
                             "--port", "0", "--parallel", str(parallel)],
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    url: list[str] = []
    ready = threading.Event()

    def drain() -> None:
        for line in proc.stderr:
            m = re.search(r"serving \S+ at (http://\S+)/v1 ", line)
            if m:
                url.append(m.group(1))
                ready.set()
        ready.set()

    threading.Thread(target=drain, daemon=True).start()
    if not ready.wait(300) or not url:
        proc.kill()
        sys.exit("kimi serve did not start")
    return proc, url[0]


def post(url: str, path: str, body: dict) -> dict:
    host, port = url.removeprefix("http://").rsplit(":", 1)
    conn = http.client.HTTPConnection(host, int(port), timeout=600)
    conn.request("POST", path, body=json.dumps(body), headers={"Content-Type": "application/json"})
    resp = conn.getresponse()
    data = json.loads(resp.read())
    conn.close()
    if resp.status != 200:
        sys.exit(f"request failed: HTTP {resp.status}: {data}")
    return data


def run_clients(url: str, clients: int, requests: int, max_tokens: int) -> tuple[int, float]:
    """(completion tokens, wall seconds) for `clients` threads of `requests` requests each."""
    tokens = [0] * clients
    gate = threading.Barrier(clients)

    def client(i: int) -> None:
        gate.wait()
        for r in range(requests):
            prompt = f"{PROMPTS[(i + r) % len(PROMPTS)]} (client {i}, request {r})"
            out = post(url, "/v1/completions", {"prompt": prompt, "max_tokens": max_tokens,
                                                "temperature": 0})
            tokens[i] += out["usage"]["completion_tokens"]

    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return sum(tokens), time.perf_counter() - t0


def second_turn_cached(url: str) -> tuple[int, int]:
    """An agent's two turns: (the second turn's prompt tokens, how many of them were cached)."""
    messages = [{"role": "system", "content": "You are a coding agent. " * 20},
                {"role": "user", "content": "List the files."}]
    first = post(url, "/v1/chat/completions", {"messages": messages, "max_tokens": 16,
                                               "temperature": 0})
    reply = first["choices"][0]["message"]
    messages += [{"role": "assistant", "content": reply["content"] or "",
                  "reasoning_content": reply.get("reasoning_content") or ""},
                 {"role": "user", "content": "Now read the first one."}]
    second = post(url, "/v1/chat/completions", {"messages": messages, "max_tokens": 1,
                                                "temperature": 0})
    u = second["usage"]
    return u["prompt_tokens"], u["prompt_tokens_details"]["cached_tokens"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default="small", choices=("tiny", "small"))
    ap.add_argument("-n", "--max-tokens", type=int, default=64)
    ap.add_argument("-r", "--requests", type=int, default=3, help="requests per client")
    ap.add_argument("--clients", default="1,2,4")
    args = ap.parse_args()
    counts = [int(c) for c in args.clients.split(",")]

    results: dict[int, dict[int, float]] = {}
    cached: dict[int, tuple[int, int]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = write_checkpoint(Path(tmp) / args.preset, args.preset, seed=1)
        for parallel in (max(counts), 1):
            proc, url = start_server(ckpt, parallel)
            try:
                run_clients(url, 1, 1, 8)  # warm-up: first-call compilation, page cache
                results[parallel] = {}
                for c in counts:
                    tokens, seconds = run_clients(url, c, args.requests, args.max_tokens)
                    results[parallel][c] = tokens / seconds
                    print(f"--parallel {parallel}, {c} client(s): {tokens} tokens in "
                          f"{seconds:.2f} s", file=sys.stderr)
                cached[parallel] = second_turn_cached(url)
            finally:
                proc.send_signal(2)
                proc.wait(30)
    batched = max(counts)
    print(f"\n{args.preset} checkpoint, {args.max_tokens} tokens per request, "
          f"{args.requests} requests per client, greedy\n")
    print(f"| clients | --parallel {batched} tok/s | --parallel 1 tok/s | speed-up |")
    print("|---:|---:|---:|---:|")
    for c in counts:
        b, s = results[batched][c], results[1][c]
        print(f"| {c} | {b:.1f} | {s:.1f} | {b / s:.2f}x |")
    for parallel, (prompt, hit) in cached.items():
        print(f"\nagent's second turn, --parallel {parallel}: {hit} of {prompt} prompt tokens "
              "cached")


if __name__ == "__main__":
    main()
