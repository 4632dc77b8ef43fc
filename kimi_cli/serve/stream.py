"""One reply as API-neutral events: reasoning, text and tool calls whose arguments stream.

Turns the engine's tokens into the chat parser's events, adds incremental tool-call arguments
and stop sequences, and ends with the finish reason and usage the wire shapes report.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from ..chat import parser as chat
from ..engine import Done, Token
from .scheduler import Started


@dataclass
class Reasoning:
    text: str


@dataclass
class Text:
    text: str


@dataclass
class CallStart:
    index: int  # position among this reply's calls (the OpenAI `index`)
    id: str
    name: str


@dataclass
class CallArgs:
    index: int
    text: str  # the next piece of the arguments' JSON, as generated


@dataclass
class CallEnd:
    index: int
    call: chat.ToolCall  # the parser's complete call


@dataclass
class Usage:
    prompt_tokens: int = 0
    cached_tokens: int = 0
    completion_tokens: int = 0
    reasoning_tokens: int = 0
    ttft: float = 0.0
    generation_tps: float = 0.0


@dataclass
class Finish:
    reason: str  # "stop", "length", "tool_calls", "stop_sequence" or "cancelled"
    usage: Usage
    stop_sequence: str | None = None


Event = Started | Reasoning | Text | CallStart | CallArgs | CallEnd | Finish


class CallTracker:
    """Watches the tool-call markers to stream each call's arguments token by token.

    The parser emits a call only once it is complete; this sees the same ids and reports the
    call's start (at `<|tool_call_argument_begin|>`) and every piece of its arguments.
    """

    def __init__(self, tokenizer):
        ids = tokenizer.special_tokens
        self._begin = ids.get(chat.CALL_BEGIN)
        self._args = ids.get(chat.ARGUMENT_BEGIN)
        self._ends = {ids.get(chat.CALL_END), ids.get(chat.SECTION_END),
                      ids.get(chat.SECTION_BEGIN), *tokenizer.stop_ids} - {None}
        self._detok = tokenizer.detokenizer()
        self._state: str | None = None  # None, "id" or "args"
        self._id: list[str] = []
        self.count = 0  # calls begun (each <|tool_call_begin|> becomes one parser call)
        self.ended = 0  # calls the parser has emitted
        self.started: set[int] = set()

    def feed(self, token_id: int) -> list[CallStart | CallArgs]:
        if token_id == self._begin:
            events = self._close()
            self._state, self._id = "id", []
            self.count += 1
            return events
        if token_id == self._args and self._state == "id":
            self._id.append(self._detok.finalize())
            call_id = "".join(self._id).strip()
            index = self.count - 1
            self.started.add(index)
            self._state = "args"
            return [CallStart(index, call_id, split_call_id(call_id))]
        if token_id in self._ends:
            return self._close()
        if self._state is None or token_id == self._args:
            return []
        text = self._detok.add_token(token_id)
        if self._state == "id":
            self._id.append(text)
            return []
        return [CallArgs(self.count - 1, text)] if text else []

    def _close(self) -> list[CallArgs]:
        tail = self._detok.finalize()
        state, self._state = self._state, None
        return [CallArgs(self.count - 1, tail)] if state == "args" and tail else []


def split_call_id(call_id: str) -> str:
    """The function name in `functions.NAME:IDX` (lenient without the prefix or the index)."""
    rest = call_id.removeprefix("functions.")
    head, sep, tail = rest.rpartition(":")
    return (head if sep and tail.strip().isdigit() else rest).strip()


class StopMatcher:
    """Holds back answer text that could be the start of a stop sequence."""

    def __init__(self, stops: list[str]):
        self.stops = stops
        self._held = ""

    def feed(self, text: str) -> tuple[str, str | None]:
        """(text safe to send, the stop sequence hit or None)."""
        if not self.stops:
            return text, None
        buf = self._held + text
        hits = [(buf.find(s), s) for s in self.stops if s in buf]
        if hits:
            at, stop = min(hits)
            self._held = ""
            return buf[:at], stop
        keep = max((k for s in self.stops for k in range(1, len(s))
                    if buf.endswith(s[:k])), default=0)
        self._held = buf[len(buf) - keep:] if keep else ""
        return buf[:len(buf) - keep], None

    def flush(self) -> str:
        held, self._held = self._held, ""
        return held


def reply_events(events: Iterator, tokenizer, stops: list[str] | None = None,
                 raw: bool = False, on_stop=None) -> Iterator[Event]:
    """API-neutral events from a job's Started / Token / Done stream.

    `raw`: no chat parsing, every token is answer text (/v1/completions). `on_stop` is called
    when a stop sequence ends the reply early, so the caller can cancel the generation.
    """
    parser = None if raw else chat.OutputParser(tokenizer)
    tracker = None if raw else CallTracker(tokenizer)
    think_end = tokenizer.special_tokens.get(chat.THINK_END)
    matcher = StopMatcher(stops or [])
    usage = Usage()
    n_tokens = 0
    reasoning_until = 0  # tokens generated up to the end of the reasoning
    in_reasoning = False
    stopped: str | None = None
    has_calls = False

    def text_events(text: str) -> list[Event]:
        nonlocal stopped
        safe, hit = matcher.feed(text)
        out: list[Event] = [Text(safe)] if safe else []
        if hit is not None:
            stopped = hit
            if on_stop is not None:
                on_stop()
        return out

    for ev in events:
        if ev is None:  # nothing yet (see choice_events): say so, and go on when asked
            yield None
            continue
        if isinstance(ev, Started):
            usage.prompt_tokens, usage.cached_tokens = ev.prompt_tokens, ev.cached_tokens
            yield ev
            continue
        if isinstance(ev, Done):
            usage.completion_tokens = n_tokens
            usage.ttft = ev.stats.ttft
            usage.generation_tps = ev.stats.generation_tps
            if stopped is not None:
                break
            pending = [] if parser is None else parser.finish(
                "length" if ev.finish_reason == "length" else "stop")
            for out in _convert(pending, tracker, text_events):
                if isinstance(out, CallEnd):
                    has_calls = True
                yield out
            if stopped is None:
                tail = matcher.flush()
                if tail:
                    yield Text(tail)
            reason = ev.finish_reason
            break
        if not isinstance(ev, Token) or stopped is not None:
            continue
        n_tokens += 1
        if raw:
            yield from text_events(ev.text)  # the engine's text: stop tokens are empty
            continue
        pevents = parser.feed(ev.id)
        if any(isinstance(p, chat.ReasoningDelta) for p in pevents):
            in_reasoning = True
        if in_reasoning:
            reasoning_until = n_tokens
            if ev.id == think_end or any(not isinstance(p, chat.ReasoningDelta)
                                         for p in pevents):
                in_reasoning = False
        for out in [*tracker.feed(ev.id), *_convert(pevents, tracker, text_events)]:
            if isinstance(out, CallEnd):
                has_calls = True
            yield out
    else:
        return  # the client went away: nothing more to send
    usage.reasoning_tokens = reasoning_until
    if stopped is not None:
        yield Finish("stop_sequence", usage, stopped)
    elif reason == "cancelled":
        yield Finish("cancelled", usage)
    elif has_calls and reason == "stop":
        yield Finish("tool_calls", usage)
    else:
        yield Finish(reason, usage)


def choice_events(stream: Iterator[tuple[int, object]], n: int,
                  reply: Callable[[int, Iterator], Iterator[Event | None]]
                  ) -> Iterator[tuple[int, Event]]:
    """(choice, event) pairs from a job's (choice, engine event) stream: each choice has its own
    `reply(choice, events)` (parser, tool calls, stop sequences), fed as its events arrive."""
    inboxes = [deque() for _ in range(n)]

    def inbox(q: deque) -> Iterator:
        while True:
            yield q.popleft() if q else None

    replies = [reply(i, inbox(q)) for i, q in enumerate(inboxes)]
    live = set(range(n))
    for i, ev in stream:
        inboxes[i].append(ev)
        for out in replies[i]:
            if out is None:  # it has used what there is
                break
            yield i, out
        else:
            live.discard(i)
            if not live:
                return


def total_usage(usages: list[Usage]) -> Usage:
    """One request's usage over its choices: the prompt once, the completions summed."""
    first = usages[0]
    return Usage(first.prompt_tokens, first.cached_tokens,
                 sum(u.completion_tokens for u in usages),
                 sum(u.reasoning_tokens for u in usages),
                 min(u.ttft for u in usages), sum(u.generation_tps for u in usages))


def _convert(pevents: list, tracker: CallTracker | None, text_events) -> Iterator[Event]:
    for p in pevents:
        if isinstance(p, chat.ReasoningDelta):
            yield Reasoning(p.text)
        elif isinstance(p, chat.TextDelta):
            yield from text_events(p.text)
        elif isinstance(p, chat.ToolCall):
            index = tracker.ended
            tracker.ended += 1
            if index not in tracker.started:  # never reached its arguments: send it whole
                tracker.started.add(index)
                yield CallStart(index, p.id, p.name)
                if p.raw_arguments:
                    yield CallArgs(index, p.raw_arguments)
            yield CallEnd(index, p)

