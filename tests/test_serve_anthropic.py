"""`kimi serve`, Anthropic side: /v1/messages driven by the official `anthropic` client.

Thinking blocks, tool_use / tool_result round trips, the streaming event sequence, prompt
caching across an agent's turns, and Anthropic-shaped errors, against a real subprocess.
"""

from __future__ import annotations

import http.client
import json
import urllib.parse

import anthropic
import pytest
from serve_helpers import AFTER_TOOL, ANSWER, SHELL_CALL, ServeProcess, script_file, serve_env

TIMEOUT = 30  # seconds, on every client call
MODEL = "kimi-k2-thinking"
REASONING = "Compare 9.11 and 9.9: 9.90 > 9.11."
SHELL_TOOL = {"name": "shell", "description": "Run a shell command.",
              "input_schema": {"type": "object", "properties": {"command": {"type": "string"}},
                               "required": ["command"]}}


@pytest.fixture(scope="module")
def env(tmp_path_factory) -> dict[str, str]:
    return serve_env(tmp_path_factory.mktemp("serve-home"))


@pytest.fixture(scope="module")
def answers(tmp_path_factory, env):
    """A server whose every generation is ANSWER, with an API key (as Claude Code sends it)."""
    srv = ServeProcess(["--model", script_file(tmp_path_factory.mktemp("answers"),
                                               [ANSWER] * 100), "--api-key", "k3y"], env)
    yield srv
    srv.stop()


def client(srv: ServeProcess, key: str = "k3y") -> anthropic.Anthropic:
    # The client appends /v1/messages to the base URL, as with ANTHROPIC_BASE_URL.
    return anthropic.Anthropic(api_key=key, base_url=srv.url, max_retries=0, timeout=TIMEOUT)


def user(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


def post(srv: ServeProcess, body: bytes | dict, key: str | None = "k3y",
         path: str = "/v1/messages", headers: dict | None = None) -> tuple[int, dict]:
    u = urllib.parse.urlsplit(srv.url)
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=TIMEOUT)
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    conn.request("POST", path, body=data, headers={
        "Content-Type": "application/json", **({"x-api-key": key} if key else {}),
        **(headers or {})})
    resp = conn.getresponse()
    status, payload = resp.status, json.loads(resp.read())
    conn.close()
    return status, payload


def test_a_reply_has_a_signed_thinking_block_then_the_text(answers):
    msg = client(answers).messages.create(model=MODEL, max_tokens=4096, messages=user("?"),
                                          system="You are Kimi AI.")
    thinking, text = msg.content
    assert (thinking.type, thinking.thinking) == ("thinking", REASONING)
    assert thinking.signature  # clients that send thinking back require it
    assert (text.type, text.text) == ("text", "9.9 is bigger.")
    assert msg.stop_reason == "end_turn" and msg.role == "assistant" and msg.model == MODEL
    assert msg.usage.input_tokens > 0 and msg.usage.output_tokens > 0


def test_streaming_sends_the_event_sequence_the_client_accumulates(answers):
    with client(answers).messages.stream(model=MODEL, max_tokens=4096,
                                         messages=user("?")) as stream:
        events = list(stream)
        final = stream.get_final_message()
    raw = [e for e in events if e.type in ("message_start", "content_block_start",
                                           "content_block_delta", "content_block_stop",
                                           "message_delta", "message_stop")]
    assert raw[0].type == "message_start" and raw[-1].type == "message_stop"
    assert raw[-2].type == "message_delta" and raw[-2].delta.stop_reason == "end_turn"
    kinds = [e.delta.type for e in raw if e.type == "content_block_delta"]
    assert kinds.count("thinking_delta") > 3 and kinds.count("text_delta") > 3  # streamed
    assert kinds.index("signature_delta") < kinds.index("text_delta")  # closes the thinking
    starts = [e.content_block.type for e in raw if e.type == "content_block_start"]
    assert starts == ["thinking", "text"]
    assert [b.type for b in final.content] == ["thinking", "text"]
    assert (final.content[0].thinking, final.content[1].text) == (REASONING, "9.9 is bigger.")
    assert final.usage.output_tokens > 0


def test_system_blocks_stop_sequences_and_thinking_disabled(answers):
    c = client(answers)
    msg = c.messages.create(model=MODEL, max_tokens=100, messages=user("?"),
                            system=[{"type": "text", "text": "You are Kimi AI.",
                                     "cache_control": {"type": "ephemeral"}}],
                            stop_sequences=["bigger"], thinking={"type": "disabled"})
    assert [b.type for b in msg.content] == ["text"]  # the reasoning is not sent
    assert msg.content[0].text == "9.9 is "
    assert (msg.stop_reason, msg.stop_sequence) == ("stop_sequence", "bigger")


def test_cache_read_input_tokens_grow_across_an_agents_turns(answers):
    c = client(answers)
    messages: list = []
    usages = []
    for turn in ("First task?", "Second task?", "Third task?"):
        messages.append({"role": "user", "content": turn})
        msg = c.messages.create(model=MODEL, max_tokens=4096, messages=messages,
                                system="You are a coding agent.")
        usages.append(msg.usage)
        messages.append({"role": "assistant", "content": [b.model_dump() for b in msg.content]})
    for before, after in zip(usages, usages[1:]):
        prompt_before = before.input_tokens + before.cache_read_input_tokens
        assert after.cache_read_input_tokens >= prompt_before  # the whole earlier prompt
        assert after.input_tokens < 30  # only the new turn is prefilled


def test_count_tokens_matches_the_prompt_a_message_uses(answers):
    c = client(answers)
    counted = c.messages.count_tokens(model=MODEL, messages=user("How many?"))
    msg = c.messages.create(model=MODEL, max_tokens=10, messages=user("How many?"))
    assert counted.input_tokens == msg.usage.input_tokens + msg.usage.cache_read_input_tokens


def test_a_tool_use_and_tool_result_round_trip(start):
    srv = start([SHELL_CALL, AFTER_TOOL], "--api-key", "k3y")
    c = client(srv)
    messages = user("What is in this directory?")
    with c.messages.stream(model=MODEL, max_tokens=4096, messages=messages,
                           tools=[SHELL_TOOL]) as stream:
        events = list(stream)
        first = stream.get_final_message()
    pieces = [e.delta.partial_json for e in events
              if e.type == "content_block_delta" and e.delta.type == "input_json_delta"]
    assert len(pieces) > 3 and "".join(pieces) == '{"command": "ls -la"}'  # as generated
    assert first.stop_reason == "tool_use"
    thinking, call = first.content
    assert thinking.thinking == "I should list the files."
    assert (call.type, call.id, call.name, call.input) == (
        "tool_use", "functions.shell:0", "shell", {"command": "ls -la"})
    messages += [{"role": "assistant", "content": [b.model_dump() for b in first.content]},
                 {"role": "user", "content": [{"type": "tool_result", "tool_use_id": call.id,
                                               "content": [{"type": "text",
                                                            "text": "a.txt\nb.txt"}]}]}]
    second = c.messages.create(model=MODEL, max_tokens=4096, messages=messages,
                               tools=[SHELL_TOOL])
    assert [b.type for b in second.content] == ["thinking", "text"]
    assert second.content[1].text == "There are two files: a.txt and b.txt."
    assert second.stop_reason == "end_turn"
    # The assistant turn (thinking kept mid-turn) renders back as generated.
    first_total = (first.usage.input_tokens + first.usage.cache_read_input_tokens
                   + first.usage.output_tokens)
    assert second.usage.cache_read_input_tokens >= first_total - 1


# -- errors, in the shape Anthropic clients parse ----------------------------------------

def test_the_client_raises_its_own_error_classes(answers):
    with pytest.raises(anthropic.AuthenticationError) as e:
        client(answers, key="wrong").messages.create(model=MODEL, max_tokens=5,
                                                     messages=user("x"))
    assert e.value.body["error"]["type"] == "authentication_error"
    with pytest.raises(anthropic.NotFoundError) as e:
        client(answers).messages.create(model="claude-3-opus", max_tokens=5, messages=user("x"))
    assert "kimi-k2-thinking" in e.value.body["error"]["message"]
    with pytest.raises(anthropic.BadRequestError) as e:
        client(answers).messages.create(model=MODEL, max_tokens=300_000, messages=user("x"))
    assert "prompt is too long" in e.value.body["error"]["message"]
    assert "262144" in e.value.body["error"]["message"]


@pytest.mark.parametrize("body,status,needle", [
    (b"{oops", 400, "not valid JSON"),
    ({"model": MODEL, "messages": user("x")}, 400, "max_tokens: required"),
    ({"max_tokens": 5, "messages": user("x")}, 400, "model: required"),
    ({"model": MODEL, "max_tokens": "5", "messages": user("x")}, 400,
     "max_tokens: expected an integer, got a string"),
    ({"model": MODEL, "max_tokens": 5, "messages": [{"role": "system", "content": "x"}]}, 400,
     "messages[0].role"),
    ({"model": MODEL, "max_tokens": 5, "messages": user("x"), "system": 3}, 400, "system"),
    ({"model": MODEL, "max_tokens": 5, "messages": [{"role": "user", "content": [
        {"type": "image", "source": {}}]}]}, 400, "only text and tool_result blocks"),
    ({"model": MODEL, "max_tokens": 5, "messages": user("x"), "tool_choice": {"type": "any"}},
     400, "tool_choice"),
    ({"model": "gpt-4o", "max_tokens": 5, "messages": user("x")}, 404, "not found"),
])
def test_bad_requests_get_anthropic_shaped_errors(answers, body, status, needle):
    got, payload = post(answers, body)
    assert got == status, payload
    assert payload["type"] == "error" and needle in payload["error"]["message"]
    assert set(payload["error"]) == {"type", "message"}
    assert "Traceback" not in answers.log()


def test_no_key_is_401_in_the_anthropic_shape(answers):
    status, payload = post(answers, {"model": MODEL, "max_tokens": 5, "messages": user("x")},
                           key=None)
    assert status == 401 and payload["error"]["type"] == "authentication_error"


def test_a_claude_code_style_request_is_answered(answers):
    # Claude Code posts to /v1/messages?beta=true with a bearer token, beta headers, cached
    # system blocks, metadata and a thinking budget.
    status, msg = post(answers, {
        "model": MODEL, "max_tokens": 32000, "stream": False, "metadata": {"user_id": "u"},
        "thinking": {"type": "enabled", "budget_tokens": 1024},
        "system": [{"type": "text", "text": "You are Claude Code.",
                    "cache_control": {"type": "ephemeral"}}],
        "messages": [{"role": "user", "content": [{"type": "text", "text": "hi",
                                                   "cache_control": {"type": "ephemeral"}}]}],
        "tools": [SHELL_TOOL]}, key=None, path="/v1/messages?beta=true",
        headers={"Authorization": "Bearer k3y", "anthropic-beta": "claude-code-20250219",
                 "anthropic-version": "2023-06-01"})
    assert status == 200, msg
    assert [b["type"] for b in msg["content"]] == ["thinking", "text"]
