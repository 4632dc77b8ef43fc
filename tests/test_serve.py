"""`kimi serve`, OpenAI side and server behaviour: a real subprocess on a free loopback port.

Driven by the official `openai` client and raw HTTP, with the scripted model (fixed outputs
through the real tokenizer, engine and parser) and with a tiny synthetic checkpoint.
"""

from __future__ import annotations

import http.client
import json
import re
import socket
import subprocess
import sys
import threading
import time
import urllib.parse
from pathlib import Path

import openai
import pytest
from serve_helpers import (
    AFTER_TOOL,
    ANSWER,
    CALL_IN_REASONING,
    CALL_SINGULAR_SECTION,
    CALL_WITHOUT_THINK,
    KIMI,
    SHELL_CALL,
    TWO_CALLS,
    ServeProcess,
    script_file,
    serve_env,
)

TIMEOUT = 30  # seconds, on every client call
REASONING = "Compare 9.11 and 9.9: 9.90 > 9.11."
SHELL_TOOL = {"type": "function", "function": {
    "name": "shell", "description": "Run a shell command.",
    "parameters": {"type": "object", "properties": {"command": {"type": "string"}},
                   "required": ["command"]}}}
LONG = "<think>" + " ".join(f"word{i}" for i in range(300))  # a long reasoning


@pytest.fixture(scope="module")
def env(tmp_path_factory) -> dict[str, str]:
    return serve_env(tmp_path_factory.mktemp("serve-home"))


@pytest.fixture(scope="module")
def answers(tmp_path_factory, env):
    """A server whose every generation is ANSWER: tests may share it in any order."""
    srv = ServeProcess(["--model", script_file(tmp_path_factory.mktemp("answers"),
                                               [ANSWER] * 100)], env)
    yield srv
    srv.stop()


def client(srv: ServeProcess, key: str = "unused") -> openai.OpenAI:
    return openai.OpenAI(api_key=key, base_url=srv.base, max_retries=0, timeout=TIMEOUT)


def post(srv: ServeProcess, path: str, body: bytes | dict, headers: dict | None = None,
         method: str = "POST") -> tuple[int, dict]:
    u = urllib.parse.urlsplit(srv.url)
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=TIMEOUT)
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    conn.request(method, path, body=data if method == "POST" else None,
                 headers={"Content-Type": "application/json", **(headers or {})})
    resp = conn.getresponse()
    status, payload = resp.status, json.loads(resp.read() or b"null")
    conn.close()
    return status, payload


def user(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


# -- the snippet Kimi-K2-Thinking's users copy ---------------------------------------------

SNIPPET = '''import openai
client = openai.OpenAI(api_key="your_key", base_url="http://127.0.0.1:8000/v1")
response = client.chat.completions.create(
    model="kimi-k2-thinking",
    messages=[{"role": "system", "content": "You are Kimi AI."},
              {"role": "user", "content": "Which is bigger: 9.11 or 9.9?"}],
    temperature=1.0, max_tokens=4096)
print("Answer:", response.choices[0].message.content)
print("Reasoning:", response.choices[0].message.reasoning_content)
'''


def test_the_getting_started_snippet_works_unchanged(answers, tmp_path):
    snippet = tmp_path / "snippet.py"
    snippet.write_text(SNIPPET.replace("http://127.0.0.1:8000/v1", answers.base))
    out = subprocess.run([sys.executable, str(snippet)], capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout == f"Answer: 9.9 is bigger.\nReasoning: {REASONING}\n"


def test_a_reply_reports_usage_with_reasoning_tokens(answers):
    r = client(answers).chat.completions.create(model="kimi-k2-thinking",
                                                messages=user("Which is bigger?"))
    assert r.choices[0].finish_reason == "stop"
    u = r.usage
    assert u.total_tokens == u.prompt_tokens + u.completion_tokens
    assert 0 < u.completion_tokens_details.reasoning_tokens < u.completion_tokens


def test_streaming_sends_reasoning_then_content_as_separate_deltas(answers):
    stream = client(answers).chat.completions.create(
        model="kimi-k2-thinking", messages=user("Which is bigger?"), stream=True,
        stream_options={"include_usage": True})
    chunks = list(stream)
    deltas = [c.choices[0].delta for c in chunks if c.choices]
    kinds = [("reasoning" if getattr(d, "reasoning_content", None) else
              "content" if d.content else None) for d in deltas]
    kinds = [k for k in kinds if k]
    assert kinds.count("reasoning") > 3 and kinds.count("content") > 3  # streamed, not whole
    assert kinds == sorted(kinds, key=lambda k: k != "reasoning")  # all reasoning first
    assert "".join(getattr(d, "reasoning_content", None) or "" for d in deltas) == REASONING
    assert "".join(d.content or "" for d in deltas) == "9.9 is bigger."
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens > 0


def test_cached_tokens_grow_as_a_conversation_resends_its_history(answers):
    c = client(answers)
    messages = [{"role": "system", "content": "You are a careful agent."}]
    usages = []
    for turn in ("First question?", "And the second?", "A third one?"):
        messages.append({"role": "user", "content": turn})
        r = c.chat.completions.create(model="kimi-k2-thinking", messages=messages)
        usages.append(r.usage)
        messages.append({"role": "assistant", "content": r.choices[0].message.content})
    for before, after in zip(usages, usages[1:]):
        # Everything the previous request sent is reused; only the new turns are prefilled.
        assert after.prompt_tokens_details.cached_tokens >= before.prompt_tokens
        assert after.prompt_tokens - after.prompt_tokens_details.cached_tokens < 30


def test_stop_sequences_end_the_answer_before_them(answers):
    c = client(answers)
    r = c.chat.completions.create(model="kimi-k2-thinking", messages=user("?"), stop=["bigger"])
    assert (r.choices[0].message.content, r.choices[0].finish_reason) == ("9.9 is ", "stop")
    stream = c.chat.completions.create(model="kimi-k2-thinking", messages=user("?"),
                                       stop="is big", stream=True)
    assert "".join(ch.choices[0].delta.content or "" for ch in stream if ch.choices) == "9.9 "


def test_completions_continue_raw_text(answers):
    c = client(answers)
    r = c.completions.create(model="kimi-k2-thinking", prompt="Once upon a time", max_tokens=4)
    assert r.choices[0].finish_reason == "length" and r.usage.completion_tokens == 4
    assert ANSWER.startswith(r.choices[0].text) and r.choices[0].text.startswith("<think>")
    pieces = [ch.choices[0].text for ch in c.completions.create(
        model="kimi-k2-thinking", prompt="Once", max_tokens=4, stream=True)]
    assert "".join(pieces) == r.choices[0].text


def test_models_lists_the_served_model_and_health_answers(answers):
    assert [m.id for m in client(answers).models.list()] == ["kimi-k2-thinking"]
    status, body = post(answers, "/health", b"", method="GET")
    assert status == 200 and body["status"] == "ok"


def test_four_concurrent_clients_each_get_their_whole_answer(answers):
    results: list[str] = []

    def ask(i: int) -> None:
        stream = client(answers).chat.completions.create(
            model="kimi-k2-thinking", messages=user(f"client {i}"), stream=True)
        results.append("".join(ch.choices[0].delta.content or "" for ch in stream))

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(TIMEOUT)
    assert results == ["9.9 is bigger."] * 4


def test_every_request_is_one_log_line_with_tokens_and_speed(answers):
    def request_lines() -> list[str]:
        return [line for line in answers.lines if line.startswith("kimi serve: ")]

    time.sleep(0.3)  # earlier requests' lines are all in
    before = len(request_lines())
    client(answers).chat.completions.create(model="kimi-k2-thinking", messages=user("log me"))
    client(answers).models.list()
    deadline = time.monotonic() + TIMEOUT
    while len(request_lines()) < before + 2 and time.monotonic() < deadline:
        time.sleep(0.02)
    time.sleep(0.3)  # a stray extra line would show up by now
    chat_line, models_line = request_lines()[before:]
    assert "POST /v1/chat/completions 200" in chat_line and "GET /v1/models 200" in models_line
    assert re.search(r"prompt \d+ tokens \(\d+ cached\), ttft [\d.]+ s \| \d+ generated, "
                     r"[\d.]+ tok/s \| stop", chat_line)
    assert "Traceback" not in answers.log()


# -- bad requests -------------------------------------------------------------------------

@pytest.mark.parametrize("body,status,needle", [
    (b"{not json", 400, "not valid JSON"),
    (b"[1, 2]", 400, "must be a JSON object"),
    ({"model": "kimi-k2-thinking"}, 400, "messages: required"),
    ({"messages": "hi"}, 400, "messages: expected an array"),
    ({"messages": [{"role": "robot", "content": "x"}]}, 400, "messages[0].role"),
    ({"messages": [{"role": "user", "content": 5}]}, 400, "messages[0].content"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]},
     400, "only text parts"),
    ({"messages": [{"role": "tool", "content": "x"}]}, 400, "tool_call_id: required"),
    ({"messages": [{"role": "user", "content": "x"}], "temperature": "hot"}, 400,
     "temperature: expected a number, got a string"),
    ({"messages": [{"role": "user", "content": "x"}], "stream": "yes"}, 400,
     "stream: expected a boolean"),
    ({"messages": [{"role": "user", "content": "x"}], "max_tokens": 1.5}, 400,
     "max_tokens: expected an integer"),
    ({"messages": [{"role": "user", "content": "x"}], "top_p": 0}, 400, "top_p"),
    ({"messages": [{"role": "user", "content": "x"}], "n": 5}, 400, "must be in 1-4"),
    ({"messages": [{"role": "user", "content": "x"}], "tool_choice": "required"}, 400,
     "tool_choice"),
    ({"messages": [{"role": "user", "content": "x"}], "model": "gpt-4o"}, 404, "not found"),
])
def test_bad_chat_requests_get_openai_shaped_errors(answers, body, status, needle):
    got, payload = post(answers, "/v1/chat/completions", body)
    assert got == status, payload
    assert needle in payload["error"]["message"]
    assert set(payload["error"]) == {"message", "type", "param", "code"}


def test_context_overflow_is_400_with_the_numbers(answers):
    with pytest.raises(openai.BadRequestError) as e:
        client(answers).chat.completions.create(model="kimi-k2-thinking", messages=user("x"),
                                                max_tokens=300_000)
    msg = e.value.body["message"]
    assert "maximum context length is 262144 tokens" in msg and "300000 in the completion" in msg
    assert e.value.body["code"] == "context_length_exceeded"


def test_the_openai_client_raises_its_own_error_classes(answers):
    c = client(answers)
    with pytest.raises(openai.NotFoundError):
        c.chat.completions.create(model="no-such-model", messages=user("x"))
    with pytest.raises(openai.BadRequestError):
        c.chat.completions.create(model="kimi-k2-thinking", messages=[])
    status, payload = post(answers, "/v1/nowhere", {})
    assert status == 404 and "no such endpoint" in payload["error"]["message"]
    assert "Traceback" not in answers.log()


# -- tool calls ---------------------------------------------------------------------------

def test_a_tool_call_round_trip_reuses_the_whole_first_reply(start):
    srv = start([SHELL_CALL, AFTER_TOOL])
    c = client(srv)
    messages = user("What is in this directory?")
    r = c.chat.completions.create(model="kimi-k2-thinking", messages=messages,
                                  tools=[SHELL_TOOL])
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls"
    call = choice.message.tool_calls[0]
    assert (call.id, call.type, call.function.name) == ("functions.shell:0", "function", "shell")
    assert json.loads(call.function.arguments) == {"command": "ls -la"}
    assert choice.message.reasoning_content == "I should list the files."
    assert choice.message.content is None
    messages += [choice.message.model_dump(exclude_none=True),
                 {"role": "tool", "tool_call_id": call.id, "content": "a.txt\nb.txt"}]
    second = c.chat.completions.create(model="kimi-k2-thinking", messages=messages,
                                       tools=[SHELL_TOOL])
    assert second.choices[0].message.content == "There are two files: a.txt and b.txt."
    assert second.choices[0].finish_reason == "stop"
    # The assistant turn renders back exactly as generated (reasoning kept mid-turn): the
    # second request prefills only the tool result.
    cached = second.usage.prompt_tokens_details.cached_tokens
    assert cached >= r.usage.prompt_tokens + r.usage.completion_tokens - 1


def test_tool_call_arguments_stream_as_they_are_generated(start):
    # Three spellings of one call: inside the reasoning, after reasoning without <think>, and
    # with the singular section markers. None leaks a marker into the reasoning or the answer.
    srv = start([CALL_IN_REASONING, CALL_WITHOUT_THINK, CALL_SINGULAR_SECTION],
                "--reasoning-field", "both")
    for _ in range(3):
        stream = client(srv).chat.completions.create(
            model="kimi-k2-thinking", messages=user("Read my notes"), stream=True,
            tools=[{"type": "function", "function": {"name": "read_file", "parameters": {}}}])
        chunks = [ch for ch in stream if ch.choices]
        calls = [tc for ch in chunks for tc in (ch.choices[0].delta.tool_calls or [])]
        first, rest = calls[0], calls[1:]
        assert (first.index, first.id, first.function.name) == (0, "functions.read_file:0",
                                                                "read_file")
        assert len(rest) > 3 and all(tc.id is None and tc.index == 0 for tc in rest)
        assert "".join(tc.function.arguments for tc in calls) == '{"path": "notes.txt"}'
        deltas = [ch.choices[0].delta for ch in chunks]
        reasoning = "".join(getattr(d, "reasoning_content", None) or "" for d in deltas)
        assert reasoning == "".join(getattr(d, "reasoning", None) or "" for d in deltas)
        assert reasoning == "Let me look at the file first."
        assert all(not d.content for d in deltas)
        assert chunks[-1].choices[0].finish_reason == "tool_calls"


def test_two_calls_in_one_reply_stream_under_their_own_indexes(start):
    srv = start([TWO_CALLS, TWO_CALLS])
    c = client(srv)
    stream = c.chat.completions.create(model="kimi-k2-thinking", messages=user("Read both"),
                                       stream=True, tools=[SHELL_TOOL])
    calls = [tc for ch in stream if ch.choices for tc in (ch.choices[0].delta.tool_calls or [])]
    assert [(tc.index, tc.id) for tc in calls if tc.id] == [(0, "functions.read_file:0"),
                                                            (1, "functions.read_file:1")]
    args = ["".join(tc.function.arguments for tc in calls if tc.index == i) for i in (0, 1)]
    assert args == ['{"path": "a.txt"}', '{"path": "b.txt"}']
    whole = c.chat.completions.create(model="kimi-k2-thinking", messages=user("Read both"),
                                      tools=[SHELL_TOOL]).choices[0].message.tool_calls
    assert [json.loads(tc.function.arguments)["path"] for tc in whole] == ["a.txt", "b.txt"]


def test_tool_choice_none_leaves_the_tools_out_of_the_prompt(answers):
    c = client(answers)
    with_tools = c.chat.completions.create(model="kimi-k2-thinking", messages=user("?"),
                                           tools=[SHELL_TOOL]).usage.prompt_tokens
    none = c.chat.completions.create(model="kimi-k2-thinking", messages=user("?"),
                                     tools=[SHELL_TOOL], tool_choice="none").usage.prompt_tokens
    plain = c.chat.completions.create(model="kimi-k2-thinking",
                                      messages=user("?")).usage.prompt_tokens
    assert none == plain < with_tools


def test_content_parts_developer_role_and_template_kwargs_render_as_plain_text(answers):
    c = client(answers)
    plain = c.chat.completions.create(model="kimi-k2-thinking", messages=[
        {"role": "system", "content": "Be brief."}, *user("Hello there")]).usage.prompt_tokens
    parts = c.chat.completions.create(
        model="kimi-k2-thinking", extra_body={"chat_template_kwargs": {"unused_flag": True}},
        messages=[{"role": "developer", "content": [{"type": "text", "text": "Be brief."}]},
                  {"role": "user", "content": [{"type": "text", "text": "Hello "},
                                               {"type": "text", "text": "there"}]}])
    assert parts.usage.prompt_tokens == plain
    assert parts.usage.prompt_tokens_details.cached_tokens == plain - 1  # the same prompt


def test_reasoning_field_reasoning_is_what_vllm_clients_read(start):
    srv = start([ANSWER], "--reasoning-field", "reasoning")
    msg = client(srv).chat.completions.create(model="kimi-k2-thinking",
                                              messages=user("?")).choices[0].message
    assert getattr(msg, "reasoning", None) == REASONING
    assert getattr(msg, "reasoning_content", None) is None


def test_assistant_reasoning_is_rendered_back_under_either_name(start):
    srv = start([ANSWER] * 3)
    c = client(srv)
    call = {"id": "functions.shell:0", "type": "function",
            "function": {"name": "shell", "arguments": '{"command": "ls"}'}}

    def ask(extra: dict):
        messages = [*user("list"), {"role": "assistant", "content": "", **extra,
                                    "tool_calls": [call]},
                    {"role": "tool", "tool_call_id": call["id"], "content": "a.txt"}]
        return c.chat.completions.create(model="kimi-k2-thinking", messages=messages,
                                         tools=[SHELL_TOOL]).usage

    first = ask({"reasoning_content": "I will list the files first."})
    second = ask({"reasoning": "I will list the files first."})
    without = ask({})
    assert second.prompt_tokens == first.prompt_tokens > without.prompt_tokens
    assert second.prompt_tokens_details.cached_tokens == second.prompt_tokens - 1  # same prompt


# -- server behaviour ---------------------------------------------------------------------

def _open_stream(srv: ServeProcess, body: dict | None = None) -> tuple[socket.socket, object]:
    """Send a chat request on a raw socket; return it and a reader past the status line."""
    u = urllib.parse.urlsplit(srv.url)
    data = json.dumps(body or {"model": "kimi-k2-thinking", "messages": user("go"),
                               "stream": True})
    sock = socket.create_connection((u.hostname, u.port), timeout=TIMEOUT)
    sock.sendall(f"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n"
                 f"Content-Type: application/json\r\nContent-Length: {len(data)}\r\n\r\n"
                 f"{data}".encode())
    reader = sock.makefile("rb")
    return sock, reader


def _stream_some(srv: ServeProcess, n_chunks: int) -> None:
    """Start a streaming chat request, read `n_chunks` events, then drop the connection."""
    sock, reader = _open_stream(srv)
    with sock, reader:
        assert reader.readline().startswith(b"HTTP/1.1 200")
        seen = 0
        while seen < n_chunks:
            line = reader.readline()
            assert line, "the server closed the stream"
            seen += line.startswith(b"data: ")


def _stopped_after(srv: ServeProcess) -> int:
    line = srv.wait_for_log(r"generation stopped after \d+ tokens")
    return int(line.split("after ")[1].split()[0])


def test_a_client_leaving_mid_stream_stops_its_generation_and_the_server_goes_on(start):
    srv = start([LONG, ANSWER], rate=40)
    _stream_some(srv, 6)  # the role chunk and five reasoning deltas (one per token)
    # Of ~600 tokens: the client's close is seen at the next token, the engine stops at the
    # one after (a step is 25 ms here; a loaded machine may add a few).
    assert _stopped_after(srv) < 15
    srv.wait_for_log(r"POST /v1/chat/completions 499 .*went away")
    r = client(srv).chat.completions.create(model="kimi-k2-thinking", messages=user("again"))
    assert r.choices[0].message.content == "9.9 is bigger."


def test_a_client_leaving_a_whole_reply_request_stops_it_too(start):
    srv = start([LONG, ANSWER], rate=40)
    sock, reader = _open_stream(srv, {"messages": user("go")})  # not streamed: no writes
    with sock, reader:
        deadline = time.monotonic() + TIMEOUT
        while not post(srv, "/health", b"", method="GET")[1]["busy"]:
            assert time.monotonic() < deadline
            time.sleep(0.02)
    assert _stopped_after(srv) < 60  # not the ~600 a finished reply would take
    r = client(srv).chat.completions.create(model="kimi-k2-thinking", messages=user("again"))
    assert r.choices[0].message.content == "9.9 is bigger."


def test_a_full_queue_answers_503_and_the_queued_request_is_answered(start):
    srv = start([LONG, ANSWER], "--max-queue", "1", "--parallel", "1", rate=40)
    holder, reader = _open_stream(srv)  # runs LONG: the engine is busy
    with holder, reader:
        assert reader.readline().startswith(b"HTTP/1.1 200")
        queued: list = []
        waiter = threading.Thread(target=lambda: queued.append(
            client(srv).chat.completions.create(model="kimi-k2-thinking",
                                                messages=user("queued"))))
        waiter.start()
        deadline = time.monotonic() + TIMEOUT
        while post(srv, "/health", b"", method="GET")[1]["waiting"] < 1:
            assert time.monotonic() < deadline
            time.sleep(0.02)
        with pytest.raises(openai.InternalServerError) as e:
            client(srv).chat.completions.create(model="kimi-k2-thinking",
                                                messages=user("one more"))
        assert e.value.status_code == 503 and "busy" in e.value.body["message"]
        assert e.value.response.headers["Retry-After"] == "1"
    # The holder left: the engine moves on to the waiting request, which gets its answer.
    waiter.join(TIMEOUT)
    assert [r.choices[0].message.content for r in queued] == ["9.9 is bigger."]


def test_the_api_key_is_required_on_every_request(start):
    srv = start([ANSWER], "--api-key", "s3cret")
    with pytest.raises(openai.AuthenticationError):
        client(srv, "wrong").models.list()
    status, body = post(srv, "/v1/chat/completions", {"messages": user("x")})
    assert status == 401 and body["error"]["code"] == "invalid_api_key"
    assert post(srv, "/health", b"", method="GET")[0] == 401
    assert [m.id for m in client(srv, "s3cret").models.list()] == ["kimi-k2-thinking"]


def test_ctrl_c_stops_the_server_with_exit_130_and_no_traceback(start):
    srv = start([ANSWER])
    assert srv.stop() == 130
    log = srv.log()
    assert log.rstrip().endswith("kimi: interrupted") and "Traceback" not in log


def test_ctrl_c_during_a_generation_also_exits_130_cleanly(start):
    srv = start([LONG], rate=40)
    sock, reader = _open_stream(srv)
    with sock, reader:
        assert reader.readline().startswith(b"HTTP/1.1 200")
        lines = [reader.readline() for _ in range(12)]  # headers, then a few deltas
        assert any(b"reasoning_content" in line for line in lines)  # the model is generating
        assert srv.stop() == 130
    log = srv.log()
    assert log.rstrip().endswith("kimi: interrupted") and "Traceback" not in log


@pytest.mark.parametrize("flags,needle", [
    (["--port", "70000"], "--port"),
    (["--max-queue", "0"], "--max-queue"),
    (["--reasoning-field", "thoughts"], "--reasoning-field"),
])
def test_bad_flags_are_usage_errors(env, flags, needle):
    out = subprocess.run([*KIMI, "serve", "--model", "scripted:/nonexistent.json", *flags],
                         env=env, capture_output=True, text=True, timeout=60,
                         stdin=subprocess.DEVNULL)
    assert out.returncode == 2 and needle in out.stderr and "Traceback" not in out.stderr


def test_a_missing_script_is_one_error_line(env, tmp_path):
    out = subprocess.run([*KIMI, "serve", "--model", f"scripted:{tmp_path / 'no.json'}"],
                         env=env, capture_output=True, text=True, timeout=60,
                         stdin=subprocess.DEVNULL)
    assert out.returncode == 1
    assert out.stderr.startswith("kimi: error:") and len(out.stderr.splitlines()) == 1


# -- a real (synthetic) checkpoint --------------------------------------------------------

@pytest.fixture(scope="module")
def ckpt_server(tiny_ckpt: Path, env):
    srv = ServeProcess(["--model", str(tiny_ckpt)], env)
    yield srv
    srv.stop()


def test_greedy_completions_match_kimi_run_token_for_token(ckpt_server, tiny_ckpt, env):
    run = subprocess.run([*KIMI, "run", "--model", str(tiny_ckpt), "--raw", "-t", "0", "-n",
                          "8", "--format", "json", "Hello there"], env=env,
                         capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL)
    expected = json.loads(run.stdout)
    r = client(ckpt_server).completions.create(model="kimi-k2-thinking", prompt="Hello there",
                                               max_tokens=8, temperature=0)
    assert r.choices[0].text == expected["text"]
    assert r.usage.prompt_tokens == len(expected["prompt_token_ids"])


def test_a_checkpoint_reuses_its_kv_cache_across_chat_requests(ckpt_server):
    c = client(ckpt_server)
    messages = [{"role": "system", "content": "Be brief. " * 20}, *user("Hi")]
    first = c.chat.completions.create(model="kimi-k2-thinking", messages=messages,
                                      max_tokens=4, temperature=0)
    messages += [{"role": "assistant", "content": "Hello."}, *user("Again")]
    second = c.chat.completions.create(model="kimi-k2-thinking", messages=messages,
                                       max_tokens=4, temperature=0)
    assert second.usage.prompt_tokens_details.cached_tokens >= first.usage.prompt_tokens


def test_greedy_chat_matches_kimi_run_token_for_token(ckpt_server, tiny_ckpt, env):
    run = subprocess.run([*KIMI, "run", "--model", str(tiny_ckpt), "-t", "0", "-n", "12",
                          "--system", "Be brief.", "--format", "json", "Hello there"], env=env,
                         capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL)
    expected = json.loads(run.stdout)
    r = client(ckpt_server).chat.completions.create(
        model="kimi-k2-thinking", max_tokens=12, temperature=0,
        messages=[{"role": "system", "content": "Be brief."}, *user("Hello there")])
    assert r.usage.prompt_tokens == len(expected["prompt_token_ids"])
    assert r.usage.completion_tokens == len(expected["token_ids"])
    msg = r.choices[0].message
    reasoning = getattr(msg, "reasoning_content", None) or ""  # absent when there is none
    assert (msg.content or "", reasoning) == (expected["text"], expected["reasoning"])


@pytest.mark.parametrize("flags,env_extra,needle", [
    (["--expert-cache", "lots"], {}, "--expert-cache"),
    ([], {"KIMI_KERNELS": "cuda"}, "KIMI_KERNELS='cuda'"),
])
def test_serve_takes_the_loading_options_run_takes(tiny_ckpt, env, flags, env_extra, needle):
    out = subprocess.run([*KIMI, "serve", "--model", str(tiny_ckpt), "--port", "0", *flags],
                         env={**env, **env_extra}, capture_output=True, text=True, timeout=60,
                         stdin=subprocess.DEVNULL)
    assert out.returncode == 2, out.stderr
    assert out.stderr.startswith("kimi: error:") and needle in out.stderr
    assert len(out.stderr.splitlines()) == 1
