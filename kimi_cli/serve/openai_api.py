"""The OpenAI shapes: /v1/chat/completions, /v1/completions and /v1/models.

Requests become a Plan; reply events become a response object or `chat.completion.chunk`s,
with the reasoning in `reasoning_content` (or `reasoning`) and tool calls streamed by index.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterator

from .plan import Plan, Served, sampling
from .stream import CallArgs, CallStart, Finish, Reasoning, Text, Usage, total_usage
from .wire import ApiError, bad, field, string_list

ROLES = ("system", "developer", "user", "assistant", "tool")
FINISH = {"stop_sequence": "stop", "cancelled": "stop"}


def models(served: Served) -> dict:
    return {"object": "list", "data": [model_card(served)]}


def model_card(served: Served) -> dict:
    return {"id": served.name, "object": "model", "created": 0, "owned_by": "kimi-mlx",
            "context_length": served.context_limit}


def _max_tokens(body: dict) -> int | None:
    value = field(body, "max_completion_tokens", int)
    return value if value is not None else field(body, "max_tokens", int)


def _common(body: dict, served: Served) -> tuple[bool, bool, int]:
    stream = field(body, "stream", bool, False)
    options = field(body, "stream_options", dict, {})
    include_usage = field(options, "include_usage", bool, False, where="stream_options.")
    n = field(body, "n", int, 1)
    if not 1 <= n <= served.parallel:
        raise bad("n", f"must be in 1-{served.parallel}: the choices are decoded in one batch "
                       f"and this server decodes at most {served.parallel} sequences at once "
                       "(kimi serve --parallel)")
    if field(body, "logprobs", (bool, int), False):
        raise bad("logprobs", "not supported")
    return stream, include_usage, n


def chat_plan(body: dict, served: Served) -> Plan:
    served.check_model(body)
    raw_messages = field(body, "messages", list, required=True)
    if not raw_messages:
        raise bad("messages", "must not be empty")
    messages = [_message(m, f"messages[{i}]") for i, m in enumerate(raw_messages)]
    tools = _tools(field(body, "tools", list, []))
    choice = field(body, "tool_choice", (str, dict), "auto")
    if choice not in ("auto", "none"):
        raise bad("tool_choice", "only \"auto\" and \"none\" are supported")
    kwargs = field(body, "chat_template_kwargs", dict, {})
    stream, include_usage, n = _common(body, served)
    ids = served.render(messages, tools if choice == "auto" else None, kwargs)
    settings = sampling(body, served, len(ids), _max_tokens(body), "openai")
    return Plan(ids, settings, string_list(body, "stop", limit=4), stream,
                include_usage=include_usage, n=n)


def completion_plan(body: dict, served: Served) -> Plan:
    served.check_model(body)
    prompt = field(body, "prompt", (str, list), required=True)
    if isinstance(prompt, list):
        if len(prompt) == 1 and isinstance(prompt[0], str):
            prompt = prompt[0]
        elif prompt and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
            vocab = served.tokenizer.vocab_size
            if not all(0 <= t < vocab for t in prompt):
                raise bad("prompt", f"token ids must be in [0, {vocab})")
        else:
            raise bad("prompt", "expected a string, one string in an array, or token ids")
    ids = served.tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt)
    if not ids:
        raise bad("prompt", "must not be empty")
    stream, include_usage, n = _common(body, served)
    settings = sampling(body, served, len(ids), field(body, "max_tokens", int), "openai")
    return Plan(ids, settings, string_list(body, "stop", limit=4), stream, raw=True,
                include_usage=include_usage, n=n)


def _text(content, where: str) -> str | None:
    """OpenAI content: a string, null, or a list of text parts."""
    if content is None or isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise bad(where, "expected a string or an array of content parts")
    parts = []
    for j, part in enumerate(content):
        if isinstance(part, str):
            parts.append(part)
            continue
        if not isinstance(part, dict):
            raise bad(f"{where}[{j}]", "expected a content part object")
        kind = part.get("type", "text")
        if kind != "text":
            raise bad(f"{where}[{j}]", f"only text parts are supported, got {kind!r}")
        parts.append(field(part, "text", str, required=True, where=f"{where}[{j}]."))
    return "".join(parts)


def _message(m, where: str) -> dict:
    if not isinstance(m, dict):
        raise bad(where, "expected a message object")
    role = field(m, "role", str, required=True, where=f"{where}.")
    if role not in ROLES:
        raise bad(f"{where}.role", f"expected one of {', '.join(ROLES)}, got {role!r}")
    out: dict = {"role": "system" if role == "developer" else role,
                 "content": _text(m.get("content"), f"{where}.content") or ""}
    name = field(m, "name", str, where=f"{where}.")
    if name:
        out["name"] = name
    if role == "tool":
        out["tool_call_id"] = field(m, "tool_call_id", str, required=True, where=f"{where}.")
    if role == "assistant":
        reasoning = field(m, "reasoning_content", str, where=f"{where}.")
        if reasoning is None:
            reasoning = field(m, "reasoning", str, where=f"{where}.")
        if reasoning:
            out["reasoning_content"] = reasoning
        calls = field(m, "tool_calls", list, [], where=f"{where}.")
        if calls:
            out["tool_calls"] = [_call(c, f"{where}.tool_calls[{k}]")
                                 for k, c in enumerate(calls)]
    return out


def _call(c, where: str) -> dict:
    if not isinstance(c, dict):
        raise bad(where, "expected a tool call object")
    fn = field(c, "function", dict, required=True, where=f"{where}.")
    name = field(fn, "name", str, required=True, where=f"{where}.function.")
    args = field(fn, "arguments", (str, dict), "", where=f"{where}.function.")
    call_id = field(c, "id", str, where=f"{where}.") or f"functions.{name}:0"
    return {"id": call_id, "type": "function", "function": {"name": name, "arguments": args}}


def _tools(tools: list) -> list[dict]:
    for i, t in enumerate(tools):
        if not isinstance(t, dict):
            raise bad(f"tools[{i}]", "expected a tool object")
        fn = field(t, "function", dict, required=True, where=f"tools[{i}].")
        field(fn, "name", str, required=True, where=f"tools[{i}].function.")
    return tools


def usage_dict(u: Usage) -> dict:
    return {"prompt_tokens": u.prompt_tokens, "completion_tokens": u.completion_tokens,
            "total_tokens": u.prompt_tokens + u.completion_tokens,
            "prompt_tokens_details": {"cached_tokens": u.cached_tokens},
            "completion_tokens_details": {"reasoning_tokens": u.reasoning_tokens}}


def _reasoning(served: Served, text: str) -> dict:
    f = served.reasoning_field
    names = ("reasoning_content", "reasoning") if f == "both" else (f,)
    return {n: text for n in names}


def _call_dict(start: CallStart, arguments: str) -> dict:
    return {"id": start.id, "type": "function",
            "function": {"name": start.name, "arguments": arguments}}


def chat_response(events: Iterator, served: Served) -> dict | None:
    """The whole `chat.completion` object from (choice, event) pairs; None if the client
    went away."""
    choices: dict[int, dict] = {}
    finishes: dict[int, Finish] = {}
    for i, ev in events:
        c = choices.setdefault(i, {"reasoning": [], "content": [], "calls": {}})
        if isinstance(ev, Reasoning):
            c["reasoning"].append(ev.text)
        elif isinstance(ev, Text):
            c["content"].append(ev.text)
        elif isinstance(ev, CallStart):
            c["calls"][ev.index] = (ev, [])
        elif isinstance(ev, CallArgs):
            c["calls"][ev.index][1].append(ev.text)
        elif isinstance(ev, Finish):
            finishes[i] = ev
    if not finishes or len(finishes) < len(choices):
        return None
    out = []
    for i in sorted(choices):
        c = choices[i]
        message: dict = {"role": "assistant", "content": "".join(c["content"])}
        if c["reasoning"]:
            message.update(_reasoning(served, "".join(c["reasoning"])))
        if c["calls"]:
            message["tool_calls"] = [_call_dict(s, "".join(a)) for s, a in c["calls"].values()]
            message["content"] = message["content"] or None
        reason = finishes[i].reason
        out.append({"index": i, "message": message, "logprobs": None,
                    "finish_reason": FINISH.get(reason, reason)})
    return {"id": _id("chatcmpl"), "object": "chat.completion", "created": int(time.time()),
            "model": served.name, "choices": out,
            "usage": usage_dict(total_usage([finishes[i].usage for i in sorted(finishes)]))}


def chat_chunks(events: Iterator, served: Served, plan: Plan) -> Iterator[dict]:
    """`chat.completion.chunk` objects: each choice's role chunk, deltas and finish (chunks
    carry their choice's index), then the usage of them all."""
    cid, created = _id("chatcmpl"), int(time.time())
    usages: dict[int, Usage] = {}

    def chunk(i: int, delta: dict, finish: str | None = None) -> dict:
        return {"id": cid, "object": "chat.completion.chunk", "created": created,
                "model": served.name,
                "choices": [{"index": i, "delta": delta, "logprobs": None,
                             "finish_reason": finish}]}

    for i in range(plan.n):
        yield chunk(i, {"role": "assistant", "content": ""})
    for i, ev in events:
        if isinstance(ev, Reasoning):
            yield chunk(i, _reasoning(served, ev.text))
        elif isinstance(ev, Text):
            yield chunk(i, {"content": ev.text})
        elif isinstance(ev, CallStart):
            yield chunk(i, {"tool_calls": [{"index": ev.index, **_call_dict(ev, "")}]})
        elif isinstance(ev, CallArgs):
            yield chunk(i, {"tool_calls": [{"index": ev.index,
                                            "function": {"arguments": ev.text}}]})
        elif isinstance(ev, Finish):
            yield chunk(i, {}, FINISH.get(ev.reason, ev.reason))
            usages[i] = ev.usage
            if plan.include_usage and len(usages) == plan.n:
                yield {"id": cid, "object": "chat.completion.chunk", "created": created,
                       "model": served.name, "choices": [],
                       "usage": usage_dict(total_usage([usages[k] for k in sorted(usages)]))}


def completion_response(events: Iterator, served: Served) -> dict | None:
    texts: dict[int, list[str]] = {}
    finishes: dict[int, Finish] = {}
    for i, ev in events:
        text = texts.setdefault(i, [])
        if isinstance(ev, Text):
            text.append(ev.text)
        elif isinstance(ev, Finish):
            finishes[i] = ev
    if not finishes or len(finishes) < len(texts):
        return None
    return {"id": _id("cmpl"), "object": "text_completion", "created": int(time.time()),
            "model": served.name,
            "choices": [{"index": i, "text": "".join(texts[i]), "logprobs": None,
                         "finish_reason": FINISH.get(finishes[i].reason, finishes[i].reason)}
                        for i in sorted(texts)],
            "usage": usage_dict(total_usage([finishes[i].usage for i in sorted(finishes)]))}


def completion_chunks(events: Iterator, served: Served, plan: Plan) -> Iterator[dict]:
    cid, created = _id("cmpl"), int(time.time())
    usages: dict[int, Usage] = {}

    def chunk(i: int, text: str, finish: str | None = None) -> dict:
        return {"id": cid, "object": "text_completion", "created": created,
                "model": served.name,
                "choices": [{"index": i, "text": text, "logprobs": None,
                             "finish_reason": finish}]}

    for i, ev in events:
        if isinstance(ev, Text):
            yield chunk(i, ev.text)
        elif isinstance(ev, Finish):
            yield chunk(i, "", FINISH.get(ev.reason, ev.reason))
            usages[i] = ev.usage
            if plan.include_usage and len(usages) == plan.n:
                yield {"id": cid, "object": "text_completion", "created": created,
                       "model": served.name, "choices": [],
                       "usage": usage_dict(total_usage([usages[k] for k in sorted(usages)]))}


def stream_error(err: ApiError) -> str:
    from .wire import openai_error

    return json.dumps(openai_error(err))


def _id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"
