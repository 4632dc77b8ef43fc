"""One assistant reply: run the engine on a prompt, parse what it generates, collect the message.

Shared by `kimi run` and `kimi chat`; Ctrl-C ends the reply early with finish_reason
"interrupted", keeping what was generated and leaving the engine's KV cache consistent.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime

from ..engine import Done, Engine, PrefillProgress, SamplingSettings, Stats, Token, common_prefix
from .parser import End, OutputParser, ReasoningDelta, TextDelta, ToolCall


@dataclass
class Reply:
    reasoning: str = ""
    content: str = ""
    tool_calls: list[ToolCall] = field(default_factory=list)
    finish_reason: str = "stop"  # "stop", "length" or "interrupted"
    token_ids: list[int] = field(default_factory=list)
    stats: Stats = field(default_factory=Stats)

    def message(self) -> dict:
        """The assistant message for the conversation (and the session file)."""
        msg: dict = {"role": "assistant", "content": self.content}
        if self.reasoning:
            msg["reasoning_content"] = self.reasoning
        if self.tool_calls:
            msg["tool_calls"] = [tool_call_message(c) for c in self.tool_calls]
        msg["finish_reason"] = self.finish_reason
        msg["time"] = now_iso()
        return msg


def tool_call_message(call: ToolCall) -> dict:
    """OpenAI-style, as the chat template renders it (the raw arguments, byte for byte)."""
    return {"id": call.id, "type": "function",
            "function": {"name": call.name, "arguments": call.raw_arguments}}


def now_iso() -> str:
    return datetime.now().astimezone().isoformat(timespec="seconds")


def generate_reply(engine: Engine, tokenizer, prompt_ids: list[int],
                   settings: SamplingSettings | None = None,
                   on_event: Callable[[object], None] | None = None,
                   raw: bool = False) -> Reply:
    """Generate and parse one reply. `on_event` gets PrefillProgress and the parser's
    ReasoningDelta / TextDelta / ToolCall events as they complete. `raw`: no parser, every
    token's text is answer text."""
    emit = on_event or (lambda ev: None)
    parser = OutputParser(tokenizer)
    reply = Reply()
    reasoning: list[str] = []
    content: list[str] = []

    def handle(ev) -> None:
        if isinstance(ev, ReasoningDelta):
            reasoning.append(ev.text)
        elif isinstance(ev, TextDelta):
            content.append(ev.text)
        elif isinstance(ev, ToolCall):
            reply.tool_calls.append(ev)
        elif isinstance(ev, End):
            return
        emit(ev)

    reused = min(common_prefix(engine.cached_ids, prompt_ids), len(prompt_ids) - 1)
    t0 = time.perf_counter()
    t_first: float | None = None
    gen = engine.generate(prompt_ids, settings)
    try:
        for ev in gen:
            if isinstance(ev, PrefillProgress):
                emit(ev)
            elif isinstance(ev, Token):
                if t_first is None:
                    t_first = time.perf_counter()
                reply.token_ids.append(ev.id)
                if raw:
                    if ev.text:
                        handle(TextDelta(ev.text))
                else:
                    for pev in parser.feed(ev.id):
                        handle(pev)
            elif isinstance(ev, Done):
                reply.finish_reason = ev.finish_reason
                reply.stats = ev.stats
    except KeyboardInterrupt:
        gen.close()  # runs the engine's cleanup: cached_ids match the cache again
        reply.finish_reason = "interrupted"
        end = time.perf_counter()
        first = t_first or end
        reply.stats = Stats(prompt_tokens=len(prompt_ids), reused_tokens=reused,
                            prefilled_tokens=len(prompt_ids) - reused,
                            generation_tokens=len(reply.token_ids), prompt_time=first - t0,
                            generation_time=end - first, ttft=first - t0)
    if not raw:
        for pev in parser.finish(reply.finish_reason):
            handle(pev)
    reply.reasoning = "".join(reasoning)
    reply.content = "".join(content)
    return reply
