"""`kimi serve` continuous batching and `n` choices: real subprocesses on free loopback ports.

Greedy tokens of concurrent requests equal each request's alone (and `kimi run -t 0`); late
requests join the running batch, a disconnected one leaves it; n choices share one prompt.
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import threading
import time
import urllib.parse
import urllib.request
from pathlib import Path

import openai
import pytest
from serve_helpers import ANSWER, KIMI, ServeProcess, serve_env

TIMEOUT = 60  # seconds, on every client call
MEDIUM = "<think>" + " ".join(f"step{i}" for i in range(60)) + "</think>Done."
LONG = "<think>" + " ".join(f"word{i}" for i in range(300))
PROMPTS = [("Hello there", 24), ("The quick brown fox jumps", 40), ("Once", 12),
           ("A much longer prompt that goes on for a while, with commas", 32)]


@pytest.fixture(scope="module")
def env(tmp_path_factory) -> dict[str, str]:
    return serve_env(tmp_path_factory.mktemp("serve-batch-home"))


@pytest.fixture(scope="module")
def ckpt(tiny_ckpt: Path, env):
    srv = ServeProcess(["--model", str(tiny_ckpt), "--parallel", "4"], env)
    yield srv
    srv.stop()


def client(srv: ServeProcess) -> openai.OpenAI:
    return openai.OpenAI(api_key="unused", base_url=srv.base, max_retries=0, timeout=TIMEOUT)


def complete(srv: ServeProcess, prompt: str, max_tokens: int, **extra):
    return client(srv).completions.create(model="kimi-k2-thinking", prompt=prompt,
                                          max_tokens=max_tokens, temperature=0, **extra)


def at_once(calls: list) -> list:
    """Run the calls on threads released together; their results in order."""
    results: list = [None] * len(calls)
    gate = threading.Barrier(len(calls))

    def run(i: int) -> None:
        gate.wait(TIMEOUT)
        results[i] = calls[i]()

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(calls))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(TIMEOUT)
    assert all(r is not None for r in results), "a concurrent request did not finish"
    return results


def batch_sizes(srv: ServeProcess, path: str = "/v1/completions") -> list[int]:
    return [int(m.group(1)) for line in srv.lines if f"POST {path} 200" in line
            and (m := re.search(r"\| batch (\d+)$", line.strip()))]


def test_concurrent_greedy_requests_give_exactly_what_each_gives_alone(ckpt, tiny_ckpt, env):
    alone = [complete(ckpt, p, n) for p, n in PROMPTS]
    before = len(batch_sizes(ckpt))
    together = at_once([lambda p=p, n=n: complete(ckpt, p, n) for p, n in PROMPTS])
    assert [r.choices[0].text for r in together] == [r.choices[0].text for r in alone]
    assert [r.usage.completion_tokens for r in together] == [n for _, n in PROMPTS]
    assert max(batch_sizes(ckpt)[before:]) >= 2  # they did share the batch
    run = subprocess.run([*KIMI, "run", "--model", str(tiny_ckpt), "--raw", "-t", "0", "-n",
                          str(PROMPTS[1][1]), "--format", "json", PROMPTS[1][0]], env=env,
                         capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL)
    assert together[1].choices[0].text == json.loads(run.stdout)["text"]


def test_n_greedy_choices_are_identical_and_indexed(ckpt):
    r = complete(ckpt, "Hello there", 10, n=3)
    assert [c.index for c in r.choices] == [0, 1, 2]
    assert len({c.text for c in r.choices}) == 1
    assert r.choices[0].text == complete(ckpt, "Hello there", 10).choices[0].text
    assert r.usage.completion_tokens == 30  # summed over the choices


def test_n_seeded_choices_are_reproducible_and_use_seed_plus_index(ckpt):
    def chat(n: int, seed: int):
        return client(ckpt).chat.completions.create(
            model="kimi-k2-thinking", messages=[{"role": "user", "content": "Hi"}],
            max_tokens=12, temperature=1.0, seed=seed, n=n)

    def texts(r) -> list[tuple[str, str]]:
        return [((c.message.content or ""), getattr(c.message, "reasoning_content", "") or "")
                for c in r.choices]

    first, again = chat(3, 7), chat(3, 7)
    assert texts(first) == texts(again)
    assert texts(first)[1] == texts(chat(1, 8))[0]  # choice i is seed + i
    assert len(set(texts(first))) > 1  # different seeds, different samples
    assert first.usage.completion_tokens == 36


def test_n_streamed_choices_carry_their_index_and_match_the_whole_reply(ckpt):
    stream = client(ckpt).completions.create(model="kimi-k2-thinking", prompt="Once",
                                             max_tokens=8, temperature=0, n=2, stream=True,
                                             stream_options={"include_usage": True})
    texts, finished, usage = {0: "", 1: ""}, set(), None
    for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
        for c in chunk.choices:
            texts[c.index] += c.text
            if c.finish_reason:
                finished.add(c.index)
    whole = complete(ckpt, "Once", 8).choices[0].text
    assert texts == {0: whole, 1: whole} and finished == {0, 1}
    assert usage.completion_tokens == 16


def test_a_request_arriving_mid_generation_joins_the_running_batch(start):
    srv = start([LONG, ANSWER], rate=50)
    sock, reader = open_stream(srv)
    with sock, reader:
        read_events(reader, 5)  # the long one is decoding
        r = client(srv).chat.completions.create(
            model="kimi-k2-thinking", messages=[{"role": "user", "content": "late"}])
        assert r.choices[0].message.content == "9.9 is bigger."
        # Answered while the first still decodes (one at a time, it would wait ~6 s for it).
        assert health(srv)["running"] == 1
        assert batch_sizes(srv, "/v1/chat/completions") == [2]


def test_a_client_that_leaves_drops_out_of_the_batch_and_the_others_finish(start):
    srv = start([LONG, MEDIUM], rate=50)
    sock, reader = open_stream(srv)
    results: list = []
    with sock, reader:
        read_events(reader, 3)
        other = threading.Thread(target=lambda: results.append(
            client(srv).chat.completions.create(
                model="kimi-k2-thinking", messages=[{"role": "user", "content": "other"}])))
        other.start()
        deadline = time.monotonic() + TIMEOUT
        while health(srv)["running"] < 2:  # both decode in the batch: now the first leaves
            assert time.monotonic() < deadline
            time.sleep(0.02)
    stopped = srv.wait_for_log(r"generation stopped after \d+ tokens")
    assert int(stopped.split("after ")[1].split()[0]) < 60  # of ~600
    other.join(TIMEOUT)
    assert [r.choices[0].message.content for r in results] == ["Done."]
    assert results[0].usage.completion_tokens > 60


def test_requests_beyond_the_batch_wait_and_beyond_the_queue_get_503(start):
    srv = start([LONG, LONG, ANSWER], "--parallel", "2", "--max-queue", "1", rate=50)
    holders = [open_stream(srv) for _ in range(2)]
    try:
        for _, reader in holders:
            read_events(reader, 2)
        waiter: list = []
        t = threading.Thread(target=lambda: waiter.append(client(srv).chat.completions.create(
            model="kimi-k2-thinking", messages=[{"role": "user", "content": "queued"}])))
        t.start()
        deadline = time.monotonic() + TIMEOUT
        while health(srv)["waiting"] < 1:
            assert time.monotonic() < deadline
            time.sleep(0.02)
        assert health(srv)["running"] == 2
        with pytest.raises(openai.InternalServerError) as e:
            client(srv).chat.completions.create(
                model="kimi-k2-thinking", messages=[{"role": "user", "content": "one more"}])
        assert e.value.status_code == 503
    finally:
        for sock, reader in holders:
            reader.close()
            sock.close()
    t.join(TIMEOUT)
    assert [r.choices[0].message.content for r in waiter] == ["9.9 is bigger."]


def test_n_beyond_parallel_is_a_400(start):
    srv = start([ANSWER], "--parallel", "2")
    with pytest.raises(openai.BadRequestError) as e:
        client(srv).chat.completions.create(
            model="kimi-k2-thinking", messages=[{"role": "user", "content": "x"}], n=3)
    assert "--parallel" in e.value.body["message"]


def test_a_batch_whose_kv_cache_cannot_fit_is_refused_at_start(tiny_ckpt, env):
    out = subprocess.run([*KIMI, "serve", "--model", str(tiny_ckpt), "--port", "0",
                          "--parallel", "100000", "--context-limit", "262144"], env=env,
                         capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)
    assert out.returncode == 1, out.stderr
    assert out.stderr.startswith("kimi: error: 100000 sequences of up to 262,144 tokens")
    assert "--parallel" in out.stderr and len(out.stderr.splitlines()) == 1


def test_left_to_itself_the_server_shrinks_its_context_to_what_the_kv_cache_holds(tiny_ckpt,
                                                                                  env):
    # So many sequences that ~20,000 tokens each fit (the tiny model's KV: 480 bytes a token;
    # 15% or at least 8 GiB of the machine kept free): the default 262,144 tokens cannot. No
    # --context-limit was given, so the server starts with what fits, says so, and keeps to it.
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    n = max(1, (memory - max(8 << 30, int(0.15 * memory))) // (480 * 20000))
    srv = ServeProcess(["--model", str(tiny_ckpt), "--parallel", str(n)], env)
    try:
        line = srv.wait_for_log(rf"requests of up to [\d,]+ tokens, {n} at a time")
        room = int(re.search(r"up to ([\d,]+) tokens", line).group(1).replace(",", ""))
        assert 4096 <= room < 262144, line
        too_long = "word " * (room + 10)
        with pytest.raises(openai.BadRequestError) as e:
            client(srv).chat.completions.create(
                model="kimi-k2-thinking", messages=[{"role": "user", "content": too_long}],
                max_tokens=4)
        assert f"{room:,}" in str(e.value.body) or str(room) in str(e.value.body)
    finally:
        srv.stop()


def test_parallel_must_be_at_least_one(env):
    out = subprocess.run([*KIMI, "serve", "--model", "demo", "--parallel", "0"], env=env,
                         capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)
    assert out.returncode == 2 and "--parallel must be at least 1" in out.stderr


# -- raw sockets: a stream the test can drop ------------------------------------------------

def health(srv: ServeProcess) -> dict:
    with urllib.request.urlopen(srv.url + "/health", timeout=TIMEOUT) as r:
        return json.loads(r.read())


def open_stream(srv: ServeProcess):
    u = urllib.parse.urlsplit(srv.url)
    data = json.dumps({"model": "kimi-k2-thinking", "stream": True,
                       "messages": [{"role": "user", "content": "go"}]})
    sock = socket.create_connection((u.hostname, u.port), timeout=TIMEOUT)
    sock.sendall(f"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n"
                 f"Content-Type: application/json\r\nContent-Length: {len(data)}\r\n\r\n"
                 f"{data}".encode())
    return sock, sock.makefile("rb")


def read_events(reader, n: int) -> None:
    seen = 0
    while seen < n:
        line = reader.readline()
        assert line, "the server closed the stream"
        seen += line.startswith(b"data: ")



def test_a_finished_request_leaves_its_reply_in_the_kv_cache_for_the_next(ckpt, tiny_ckpt, env):
    run = subprocess.run([*KIMI, "run", "--model", str(tiny_ckpt), "--raw", "-t", "0", "-n", "8",
                          "--format", "json", "Tell me"], env=env, capture_output=True,
                         text=True, timeout=120, stdin=subprocess.DEVNULL)
    done = json.loads(run.stdout)
    prompt, reply = done["prompt_token_ids"], done["token_ids"]
    first = complete(ckpt, prompt, 8)
    assert first.choices[0].text == done["text"]
    # The next prompt extends the first's prompt and reply: only the last token is prefilled.
    follow = complete(ckpt, prompt + reply, 6)
    assert follow.usage.prompt_tokens_details.cached_tokens == len(prompt) + len(reply) - 1
    complete(ckpt, [1, 2, 3], 2)  # another prompt takes the cache
    fresh = complete(ckpt, prompt + reply, 6)
    assert fresh.usage.prompt_tokens_details.cached_tokens < len(prompt)
    assert fresh.choices[0].text == follow.choices[0].text  # the kept KV is the right KV
