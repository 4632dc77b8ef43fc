"""Streaming parser for what Kimi-K2-Thinking generates: reasoning, answer text and tool calls.

Fed one token id at a time; returns events as soon as their text is complete UTF-8 (and cannot be
the start of a marker spelled out in text).

Variants handled besides the documented format (the ones vLLM's kimi_k2 parsers handle too):
reasoning without `<think>` closed by `</think>`; a tool-call section that ends reasoning with no
`</think>`; the singular `<|tool_call_section_begin|>` / `<|tool_call_section_end|>`, which are
not special tokens, so they arrive as text split across several tokens.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from enum import Enum

from kimi_cli.tokenizer import Tokenizer

THINK_BEGIN = "<think>"
THINK_END = "</think>"
SECTION_BEGIN = "<|tool_calls_section_begin|>"
SECTION_END = "<|tool_calls_section_end|>"
# Spellings the model also produces; no special token has them, so they are found in the text.
SECTION_ALIASES = {"<|tool_call_section_begin|>": SECTION_BEGIN,
                   "<|tool_call_section_end|>": SECTION_END}
CALL_BEGIN = "<|tool_call_begin|>"
ARGUMENT_BEGIN = "<|tool_call_argument_begin|>"
CALL_END = "<|tool_call_end|>"
STOP_TOKENS = ("<|im_end|>", "[EOS]")


@dataclass
class ReasoningDelta:
    text: str


@dataclass
class TextDelta:
    text: str


@dataclass
class ToolCall:
    """One complete call. `arguments` is set exactly when `error` is None."""

    id: str
    name: str
    index: int
    arguments: dict | None
    raw_arguments: str
    error: str | None = None


@dataclass
class End:
    reason: str  # "stop": the model ended its turn; otherwise what the caller passed to finish()


Event = ReasoningDelta | TextDelta | ToolCall | End


@dataclass
class ParsedOutput:
    reasoning: str = ""
    text: str = ""
    tool_calls: list[ToolCall] = field(default_factory=list)
    finish_reason: str | None = None


class _Mode(Enum):
    UNDECIDED = "undecided"  # nothing but text yet: reasoning if `</think>` follows, else answer
    TEXT = "text"
    REASONING = "reasoning"
    SECTION = "section"  # inside a tool-call section, between calls
    CALL_ID = "call_id"
    CALL_ARGS = "call_args"
    DONE = "done"


class OutputParser:
    """Turns generated ids into ReasoningDelta / TextDelta / ToolCall / End events.

    The prompt ends with `<|im_assistant|>assistant<|im_middle|>` and the model opens `<think>`
    itself; pass `starts_in_reasoning=True` if the prompt already ended with `<think>`. Text
    generated before any marker is held back until a marker says what it was: reasoning if
    `</think>` or a tool call follows, answer if `<think>` or the end does.
    """

    def __init__(self, tokenizer: Tokenizer, starts_in_reasoning: bool = False) -> None:
        self._detok = tokenizer.detokenizer()
        ids = tokenizer.special_tokens
        self._stop_ids = {ids[name] for name in STOP_TOKENS if name in ids}
        # Markers this parser acts on, by id; other special tokens pass through as text.
        self._markers = {
            ids[name]: name
            for name in (
                THINK_BEGIN,
                THINK_END,
                SECTION_BEGIN,
                SECTION_END,
                CALL_BEGIN,
                ARGUMENT_BEGIN,
                CALL_END,
            )
            if name in ids
        }
        # Markers the tokenizer has no single id for are looked for in the decoded text.
        self._text_markers = dict(SECTION_ALIASES)
        self._text_markers.update({name: name for name in (THINK_BEGIN, THINK_END, SECTION_BEGIN,
                                                           SECTION_END, CALL_BEGIN,
                                                           ARGUMENT_BEGIN, CALL_END)
                                   if name not in ids})
        self._tail = ""  # decoded text that may be the start of a text marker
        self._pending: list[str] = []  # text of the UNDECIDED start
        self._mode = _Mode.REASONING if starts_in_reasoning else _Mode.UNDECIDED
        self._call_id: list[str] = []
        self._call_args: list[str] = []
        self._n_calls = 0

    def feed(self, token_id: int) -> list[Event]:
        """Events completed by one more generated id."""
        if self._mode is _Mode.DONE:
            return []
        marker = self._markers.get(token_id)
        if marker is None and token_id not in self._stop_ids:
            return self._scan(self._detok.add_token(token_id))
        # Markers end any partial character: flush it into the mode it was generated in.
        events = self._scan(self._detok.finalize(), final=True)
        if token_id in self._stop_ids:
            events += self._decide(TextDelta)
            events += self._close_call("the turn ended inside a tool call")
            self._mode = _Mode.DONE
            return [*events, End("stop")]
        return events + self._marker(marker)

    def finish(self, reason: str = "length") -> list[Event]:
        """Flush at the end of generation; emits End(reason) unless a stop token already did."""
        if self._mode is _Mode.DONE:
            return []
        events = self._scan(self._detok.finalize(), final=True)
        events += self._decide(TextDelta)
        events += self._close_call("generation stopped inside a tool call")
        self._mode = _Mode.DONE
        return [*events, End(reason)]

    def _scan(self, text: str, final: bool = False) -> list[Event]:
        """Route decoded text, acting on the text markers in it. Unless `final`, a tail that could
        begin a marker is kept back for the next token (a marker may be split across tokens)."""
        text, self._tail = self._tail + text, ""
        events: list[Event] = []
        while text:
            found = [(text.find(m), m) for m in self._text_markers if m in text]
            if not found:
                break
            at, spelled = min(found)
            events += self._text(text[:at])
            events += self._marker(self._text_markers[spelled])
            text = text[at + len(spelled):]
        if not final:
            keep = _marker_prefix_len(text, self._text_markers)
            text, self._tail = text[:len(text) - keep], text[len(text) - keep:]
        return events + self._text(text)

    def _decide(self, kind: type[ReasoningDelta] | type[TextDelta]) -> list[Event]:
        """End the UNDECIDED start: its held-back text was `kind`."""
        if self._mode is not _Mode.UNDECIDED:
            return []
        text = "".join(self._pending)
        self._pending.clear()
        self._mode = _Mode.REASONING if kind is ReasoningDelta else _Mode.TEXT
        return [kind(text)] if text else []

    def _text(self, text: str) -> list[Event]:
        if not text:
            return []
        mode = self._mode
        if mode is _Mode.UNDECIDED:
            self._pending.append(text)
            return []
        if mode is _Mode.TEXT:
            return [TextDelta(text)]
        if mode is _Mode.REASONING:
            return [ReasoningDelta(text)]
        if mode is _Mode.CALL_ID:
            self._call_id.append(text)
        elif mode is _Mode.CALL_ARGS:
            self._call_args.append(text)
        # Text between calls in a section (a stray newline) carries nothing: drop it.
        return []

    def _marker(self, marker: str) -> list[Event]:
        if self._mode is _Mode.UNDECIDED:
            if marker == THINK_BEGIN:
                return self._decide(TextDelta) + self._marker(marker)
            if marker in (THINK_END, SECTION_BEGIN, CALL_BEGIN):
                # Reasoning the model began without `<think>`: `</think>` or a tool call ends it.
                return self._decide(ReasoningDelta) + self._marker(marker)
            return []
        mode = self._mode
        if marker == THINK_BEGIN:
            if mode is _Mode.TEXT:
                self._mode = _Mode.REASONING
            return []
        if marker == THINK_END:
            if mode is _Mode.REASONING:
                self._mode = _Mode.TEXT
            return []
        if marker == SECTION_BEGIN:
            events = self._close_call("a new tool-call section began inside a tool call")
            self._mode = _Mode.SECTION  # also ends reasoning: the model may skip </think>
            return events
        if marker == CALL_BEGIN:
            # Tolerated outside a section too: the call is what matters.
            events = self._close_call(f"the next {CALL_BEGIN} came before {CALL_END}")
            self._mode = _Mode.CALL_ID
            return events
        if marker == ARGUMENT_BEGIN:
            if mode is _Mode.CALL_ID:
                self._mode = _Mode.CALL_ARGS
            return []
        if marker == CALL_END:
            if mode in (_Mode.CALL_ID, _Mode.CALL_ARGS):
                return self._close_call(None)
            return []
        # SECTION_END: back to answer text, closing whatever call was open.
        if mode not in (_Mode.SECTION, _Mode.CALL_ID, _Mode.CALL_ARGS):
            return []
        events = self._close_call(f"the tool-call section ended before {CALL_END}")
        self._mode = _Mode.TEXT
        return events

    def _close_call(self, truncated: str | None) -> list[Event]:
        """Emit the open call, if any; `truncated` says why it ended early (None: it didn't)."""
        if self._mode not in (_Mode.CALL_ID, _Mode.CALL_ARGS):
            return []
        if self._mode is _Mode.CALL_ID and truncated is None:
            truncated = f"no {ARGUMENT_BEGIN} before {CALL_END}"
        call = _make_call("".join(self._call_id), "".join(self._call_args), self._n_calls)
        if truncated is not None:
            call.arguments, call.error = None, f"tool call cut off: {truncated}"
        self._n_calls += 1
        self._call_id.clear()
        self._call_args.clear()
        self._mode = _Mode.SECTION
        return [call]


def _marker_prefix_len(text: str, markers) -> int:
    """How many trailing characters of `text` are a proper prefix of some marker."""
    start = text.rfind("<", max(0, len(text) - max(map(len, markers), default=0)))
    while start != -1:
        tail = text[start:]
        if any(m.startswith(tail) for m in markers):
            return len(tail)
        start = text.find("<", start + 1)
    return 0


def _make_call(raw_id: str, raw_arguments: str, fallback_index: int) -> ToolCall:
    call_id = raw_id.strip()
    name, index = _split_call_id(call_id, fallback_index)
    call = ToolCall(id=call_id, name=name, index=index, arguments=None, raw_arguments=raw_arguments)
    if not name:
        call.error = f"tool call id {call_id!r} names no function"
        return call
    if not raw_arguments.strip():
        call.arguments = {}  # a tool without parameters; nothing to parse
        return call
    try:
        arguments = json.loads(raw_arguments)
    except json.JSONDecodeError as e:
        call.error = f"arguments are not valid JSON: {e.msg} at line {e.lineno} column {e.colno}"
        return call
    if not isinstance(arguments, dict):
        call.error = f"arguments must be a JSON object, got {type(arguments).__name__}"
        return call
    call.arguments = arguments
    return call


def _split_call_id(call_id: str, fallback_index: int) -> tuple[str, int]:
    """`functions.NAME:IDX` -> (NAME, IDX); without the prefix or the index, be lenient."""
    rest = call_id.removeprefix("functions.")
    head, sep, tail = rest.rpartition(":")
    if sep and tail.strip().isdigit():
        return head.strip(), int(tail)
    return rest.strip(), fallback_index


def parse_all(
    tokenizer: Tokenizer, ids: list[int] | str, starts_in_reasoning: bool = False
) -> ParsedOutput:
    """Parse a whole generation (ids, or text whose special-token strings count as tokens)."""
    if isinstance(ids, str):
        ids = tokenizer.encode(ids)
    parser = OutputParser(tokenizer, starts_in_reasoning=starts_in_reasoning)
    out = ParsedOutput()
    reasoning: list[str] = []
    text: list[str] = []
    for event in [e for i in ids for e in parser.feed(i)] + parser.finish():
        if isinstance(event, ReasoningDelta):
            reasoning.append(event.text)
        elif isinstance(event, TextDelta):
            text.append(event.text)
        elif isinstance(event, ToolCall):
            out.tool_calls.append(event)
        else:
            out.finish_reason = event.reason
    out.reasoning, out.text = "".join(reasoning), "".join(text)
    return out
