"""The Anthropic Messages shapes: /v1/messages and /v1/messages/count_tokens.

Reasoning becomes `thinking` blocks, tool calls `tool_use` blocks (arguments streamed as
`input_json_delta`), and `tool_result` blocks go back to the model as tool messages.
"""

from __future__ import annotations

import hashlib
import json
import uuid
from collections.abc import Iterator

from .plan import Plan, Served, sampling
from .scheduler import Started
from .stream import CallArgs, CallEnd, CallStart, Finish, Reasoning, Text, Usage
from .wire import bad, field, string_list

STOP_REASONS = {"stop": "end_turn", "length": "max_tokens", "tool_calls": "tool_use",
                "stop_sequence": "stop_sequence", "cancelled": "end_turn"}


def _system(value, where: str = "system") -> str:
    if value is None or isinstance(value, str):
        return value or ""
    if not isinstance(value, list):
        raise bad(where, "expected a string or an array of text blocks")
    return "".join(_block_text(b, f"{where}[{i}]") for i, b in enumerate(value))


def _block_text(block, where: str) -> str:
    if not isinstance(block, dict) or block.get("type") != "text":
        kind = block.get("type") if isinstance(block, dict) else type(block).__name__
        raise bad(where, f"expected a text block, got {kind!r}")
    return field(block, "text", str, required=True, where=f"{where}.")


def _tool_result_text(content, where: str) -> str:
    if content is None or isinstance(content, str):
        return content or ""
    if not isinstance(content, list):
        raise bad(where, "expected a string or an array of text blocks")
    return "".join(_block_text(b, f"{where}[{i}]") for i, b in enumerate(content))


def _messages(raw: list, system: str) -> list[dict]:
    out: list[dict] = [{"role": "system", "content": system}] if system else []
    for i, m in enumerate(raw):
        where = f"messages[{i}]"
        if not isinstance(m, dict):
            raise bad(where, "expected a message object")
        role = field(m, "role", str, required=True, where=f"{where}.")
        if role not in ("user", "assistant"):
            raise bad(f"{where}.role", f"expected user or assistant, got {role!r}")
        content = m.get("content")
        if isinstance(content, str):
            out.append({"role": role, "content": content})
            continue
        if not isinstance(content, list):
            raise bad(f"{where}.content", "expected a string or an array of content blocks")
        out.extend(_assistant(content, where) if role == "assistant" else _user(content, where))
    return out


def _user(blocks: list, where: str) -> list[dict]:
    results, text = [], []
    for j, b in enumerate(blocks):
        w = f"{where}.content[{j}]"
        kind = b.get("type") if isinstance(b, dict) else None
        if kind == "tool_result":
            call_id = field(b, "tool_use_id", str, required=True, where=f"{w}.")
            body = _tool_result_text(b.get("content"), f"{w}.content")
            if b.get("is_error"):
                body = f"Error: {body}"
            results.append({"role": "tool", "tool_call_id": call_id, "content": body})
        elif kind == "text":
            text.append(_block_text(b, w))
        else:
            raise bad(w, f"only text and tool_result blocks are supported here, got {kind!r}")
    return results + ([{"role": "user", "content": "".join(text)}] if text else [])


def _assistant(blocks: list, where: str) -> list[dict]:
    msg: dict = {"role": "assistant", "content": ""}
    reasoning, text, calls = [], [], []
    for j, b in enumerate(blocks):
        w = f"{where}.content[{j}]"
        kind = b.get("type") if isinstance(b, dict) else None
        if kind == "text":
            text.append(_block_text(b, w))
        elif kind == "thinking":
            reasoning.append(field(b, "thinking", str, "", where=f"{w}."))
        elif kind == "redacted_thinking":
            continue
        elif kind == "tool_use":
            name = field(b, "name", str, required=True, where=f"{w}.")
            args = field(b, "input", dict, {}, where=f"{w}.")
            call_id = field(b, "id", str, required=True, where=f"{w}.")
            calls.append({"id": call_id, "type": "function",
                          "function": {"name": name,
                                       "arguments": json.dumps(args, ensure_ascii=False)}})
        else:
            raise bad(w, f"only text, thinking and tool_use blocks are supported here, "
                         f"got {kind!r}")
    msg["content"] = "".join(text)
    if reasoning:
        msg["reasoning_content"] = "".join(reasoning)
    if calls:
        msg["tool_calls"] = calls
    return [msg]


def _tools(tools: list) -> list[dict]:
    """Anthropic tool definitions in the OpenAI shape the chat template renders."""
    out = []
    for i, t in enumerate(tools):
        if not isinstance(t, dict):
            raise bad(f"tools[{i}]", "expected a tool object")
        name = field(t, "name", str, required=True, where=f"tools[{i}].")
        fn = {"name": name, "description": field(t, "description", str, "", where=f"tools[{i}]."),
              "parameters": field(t, "input_schema", dict, {"type": "object"},
                                  where=f"tools[{i}].")}
        out.append({"type": "function", "function": fn})
    return out


def _prompt(body: dict, served: Served) -> list[int]:
    raw = field(body, "messages", list, required=True)
    if not raw:
        raise bad("messages", "must not be empty")
    messages = _messages(raw, _system(body.get("system")))
    tools = _tools(field(body, "tools", list, []))
    choice = field(body, "tool_choice", dict, {"type": "auto"})
    kind = choice.get("type")
    if kind not in ("auto", "none"):
        raise bad("tool_choice.type", "only \"auto\" and \"none\" are supported")
    return served.render(messages, tools if kind == "auto" else None)


def messages_plan(body: dict, served: Served) -> Plan:
    served.check_model(body, required=True)
    max_tokens = field(body, "max_tokens", int, required=True)
    ids = _prompt(body, served)
    thinking = field(body, "thinking", dict, {})
    settings = sampling(body, served, len(ids), max_tokens, "anthropic")
    return Plan(ids, settings, string_list(body, "stop_sequences"),
                field(body, "stream", bool, False),
                thinking=thinking.get("type") != "disabled")


def count_tokens(body: dict, served: Served) -> dict:
    served.check_model(body, required=True)
    return {"input_tokens": len(_prompt(body, served))}


def _usage(u: Usage) -> dict:
    # Anthropic counts cached prompt tokens apart from input_tokens.
    return {"input_tokens": u.prompt_tokens - u.cached_tokens, "output_tokens":
            u.completion_tokens, "cache_read_input_tokens": u.cached_tokens,
            "cache_creation_input_tokens": 0}


def signature(thinking: str) -> str:
    """An opaque value for a thinking block (clients require the field; nothing checks it)."""
    return hashlib.sha256(thinking.encode()).hexdigest()[:32]


def _message_head(served: Served, usage: dict) -> dict:
    return {"id": f"msg_{uuid.uuid4().hex[:24]}", "type": "message", "role": "assistant",
            "model": served.name, "content": [], "stop_reason": None, "stop_sequence": None,
            "usage": usage}


def message_response(events: Iterator, served: Served, plan: Plan) -> dict | None:
    blocks: list[dict] = []
    calls: dict[int, tuple[dict, list[str]]] = {}
    finish = None
    for ev in events:
        last = blocks[-1] if blocks else {}
        if isinstance(ev, Reasoning) and plan.thinking:
            if last.get("type") != "thinking":
                blocks.append(last := {"type": "thinking", "thinking": ""})
            last["thinking"] += ev.text
        elif isinstance(ev, Text):
            if last.get("type") != "text":
                blocks.append(last := {"type": "text", "text": ""})
            last["text"] += ev.text
        elif isinstance(ev, CallStart):
            block = {"type": "tool_use", "id": ev.id, "name": ev.name, "input": {}}
            blocks.append(block)
            calls[ev.index] = (block, [])
        elif isinstance(ev, CallEnd):
            calls[ev.index][0]["input"] = ev.call.arguments or {}
        elif isinstance(ev, Finish):
            finish = ev
    if finish is None:
        return None
    for b in blocks:
        if b["type"] == "thinking":
            b["signature"] = signature(b["thinking"])
    msg = _message_head(served, _usage(finish.usage))
    msg.update(content=blocks, stop_reason=STOP_REASONS[finish.reason],
               stop_sequence=finish.stop_sequence)
    return msg


def message_events(events: Iterator, served: Served, plan: Plan) -> Iterator[tuple[str, dict]]:
    """(event name, data) pairs in the order Anthropic's streaming clients expect."""
    index = -1
    open_kind: str | None = None
    thinking: list[str] = []

    def close() -> Iterator[tuple[str, dict]]:
        nonlocal open_kind
        if open_kind == "thinking":
            yield "content_block_delta", {"type": "content_block_delta", "index": index,
                                          "delta": {"type": "signature_delta",
                                                    "signature": signature("".join(thinking))}}
        if open_kind is not None:
            yield "content_block_stop", {"type": "content_block_stop", "index": index}
        open_kind = None

    def start(kind: str, block: dict) -> Iterator[tuple[str, dict]]:
        nonlocal index, open_kind
        yield from close()
        index += 1
        open_kind = kind
        yield "content_block_start", {"type": "content_block_start", "index": index,
                                      "content_block": block}

    def delta(d: dict) -> tuple[str, dict]:
        return "content_block_delta", {"type": "content_block_delta", "index": index,
                                       "delta": d}

    for ev in events:
        if isinstance(ev, Started):
            usage = _usage(Usage(ev.prompt_tokens, ev.cached_tokens))
            yield "message_start", {"type": "message_start",
                                    "message": _message_head(served, usage)}
            yield "ping", {"type": "ping"}
        elif isinstance(ev, Reasoning) and plan.thinking:
            if open_kind != "thinking":
                thinking = []
                yield from start("thinking", {"type": "thinking", "thinking": "",
                                              "signature": ""})
            thinking.append(ev.text)
            yield delta({"type": "thinking_delta", "thinking": ev.text})
        elif isinstance(ev, Text):
            if open_kind != "text":
                yield from start("text", {"type": "text", "text": ""})
            yield delta({"type": "text_delta", "text": ev.text})
        elif isinstance(ev, CallStart):
            yield from start("tool_use", {"type": "tool_use", "id": ev.id, "name": ev.name,
                                          "input": {}})
        elif isinstance(ev, CallArgs):
            yield delta({"type": "input_json_delta", "partial_json": ev.text})
        elif isinstance(ev, Finish):
            yield from close()
            yield "message_delta", {"type": "message_delta",
                                    "delta": {"stop_reason": STOP_REASONS[ev.reason],
                                              "stop_sequence": ev.stop_sequence},
                                    "usage": _usage(ev.usage)}
            yield "message_stop", {"type": "message_stop"}
