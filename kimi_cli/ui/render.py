"""Rendering one model turn: reasoning, answer, tool calls and tool results as separate panels.

`make_renderer(out, err, ...)` gives live Rich panels on a terminal and plain streams otherwise;
feed it parser events and `ToolResult`s, then call `finish()`. Used by chat, run and the agent.
"""

from __future__ import annotations

import contextlib
import json
import re
import time
from typing import Protocol

from rich.console import Console, ConsoleOptions, RenderableType, RenderResult
from rich.live import Live
from rich.markdown import Markdown
from rich.segment import Segment
from rich.spinner import Spinner
from rich.style import Style
from rich.text import Text

from .. import config
from ..agent.escape import visible
from .events import ReasoningDelta, TextDelta, ThinkMode, ToolCall, ToolResult
from .term import can_go_live

LIVE_LINES = 12  # most rows of not-yet-committed text kept in the live region
COLLAPSED_LINES = 4  # rows of reasoning shown while it streams in collapse mode
RESULT_LINES = 12  # rows of a tool result shown in its panel
REFRESH_S = 1 / 15

REASONING_STYLE = "grey50"
ANSWER_STYLE = "cyan"
TOOL_STYLE = "yellow"
RESULT_STYLE = "green"
ERROR_STYLE = "red"


class Renderer(Protocol):
    """What every renderer does. `feed` takes the events of `kimi_cli.ui.events`; the agent (or
    anything with its own event types) can call the four methods below it directly: a tool
    call is anything with `id`, `name`, `arguments`, `raw_arguments` and `error`; a tool result
    anything with `id`, `name`, `content` and either `error` (bool) or `ok` (bool), plus an
    optional shorter `display` shown instead of `content`."""

    def feed(self, event: object) -> None:
        """A ReasoningDelta, TextDelta, ToolCall or ToolResult (anything else is ignored)."""

    def reasoning(self, text: str) -> None: ...

    def text(self, text: str) -> None: ...

    def tool_call(self, call) -> None: ...

    def tool_result(self, result) -> None: ...

    def note(self, text: str, style: str = "dim") -> None:
        """One line between panels (an approval, a warning)."""

    def progress(self, processed: int, total: int) -> None:
        """Prompt processing: `processed` of `total` new prompt tokens done."""

    def waiting(self, label: str) -> None:
        """Something slow without output is running (a tool, the first token)."""

    def finish(self, reason: str = "stop") -> None:
        """The turn ended (`stop`, `length`, `interrupted`, or an error message): the current
        block is committed and the live region closed. Events may follow (an agent's next
        step, or after asking the user something); they open a new live region."""


def make_renderer(out: Console, err: Console, *, think: ThinkMode = ThinkMode.show,
                  quiet: bool = False) -> Renderer:
    """Live panels when the answer's stream (and the reasoning's, unless hidden) is a real
    terminal; plain text otherwise (pipes, files, TERM=dumb)."""
    think = ThinkMode.hide if quiet else ThinkMode(think)
    if can_go_live(out.file) and (think is ThinkMode.hide or can_go_live(err.file)):
        return LiveRenderer(out, err, think=think, quiet=quiet)
    return PlainRenderer(out, err, think=think, quiet=quiet)


# ---------------------------------------------------------------------------------------------
# Panels


class Frame:
    """A panel that can be cut into pieces: the top border (with the title) only on the first
    piece and the bottom border (with the footer) only on the last, so a long block can be
    committed to the scrollback a paragraph at a time and still read as one panel."""

    def __init__(self, content: RenderableType | None, *, title: Text | str | None = None,
                 footer: Text | str | None = None, top: bool = True, bottom: bool = True,
                 style: str = "", max_lines: int | None = None, blank_after: bool = False):
        self.content = content
        self.title = title
        self.footer = footer
        self.top = top
        self.bottom = bottom
        self.style = style
        self.max_lines = max_lines
        self.blank_after = blank_after

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> RenderResult:
        width = max(8, options.max_width)
        border = console.get_style(self.style) if self.style else Style()
        inner = width - 4
        lines: list[list[Segment]] = []
        if self.content is not None:
            lines = console.render_lines(self.content, options.update(width=inner, height=None),
                                         pad=True)
            if isinstance(self.content, Markdown):
                lines = _trim_blank(lines)
        if self.blank_after:
            lines.append([Segment(" " * inner)])
        if self.max_lines and len(lines) > self.max_lines:
            hidden = len(lines) - self.max_lines + 1
            note = f"… {hidden} more line{'s' * (hidden != 1)} above"
            lines = [[Segment(note[:inner].ljust(inner), Style(dim=True))],
                     *lines[-(self.max_lines - 1):]]
        if self.top:
            yield from _rule("╭", "╮", self.title, width, border, console)
        for line in lines:
            yield Segment("│ ", border)
            yield from line
            yield Segment(" │", border)
            yield Segment.line()
        if self.bottom:
            yield from _rule("╰", "╯", self.footer, width, border, console)


def _blank(line: list[Segment]) -> bool:
    return all(not seg.text.strip() and not (seg.style and seg.style.bgcolor) for seg in line)


def _trim_blank(lines: list[list[Segment]]) -> list[list[Segment]]:
    """Without the empty rows Markdown puts around some blocks (a list starts with one);
    a code block's padding rows have a background and stay."""
    start, end = 0, len(lines)
    while start < end and _blank(lines[start]):
        start += 1
    while end > start and _blank(lines[end - 1]):
        end -= 1
    return lines[start:end]


def _rule(left: str, right: str, label: Text | str | None, width: int, border: Style,
          console: Console) -> RenderResult:
    yield Segment(left, border)
    used = 2
    if label:
        text = Text(label) if isinstance(label, str) else label.copy()
        text.truncate(max(1, width - 8), overflow="ellipsis")
        yield Segment("─ ", border)
        yield from text.render(console, end="")
        yield Segment(" ", border)
        used += 3 + text.cell_len
    yield Segment("─" * max(0, width - used), border)
    yield Segment(right, border)
    yield Segment.line()


def _failed(result) -> bool:
    if hasattr(result, "error"):
        return bool(result.error)
    return not getattr(result, "ok", True)


def _shown(result) -> str:
    return getattr(result, "display", None) or result.content or ""


def tool_call_panel(call) -> Frame:
    # Everything here comes from the model: control characters are shown, never sent.
    if call.arguments is not None:
        body = Text(visible(json.dumps(call.arguments, indent=2, ensure_ascii=False)))
    else:
        body = Text(visible(call.raw_arguments or "(no arguments)"))
    if call.error:
        body.append(f"\n{visible(call.error)}", style=ERROR_STYLE)
    title = Text.assemble(("tool call ", "bold"),
                          (visible(call.name or "?"), "bold " + TOOL_STYLE))
    return Frame(body, title=title, footer=Text(visible(call.id), style="dim"), style=TOOL_STYLE)


def tool_result_panel(result) -> Frame:
    shown = visible(_shown(result), tabs=True)
    lines = shown.rstrip("\n").split("\n") if shown else ["(empty)"]
    body = Text("\n".join(lines[:RESULT_LINES]))
    if len(lines) > RESULT_LINES:
        body.append(f"\n… {len(lines) - RESULT_LINES} more lines", style="dim")
    style = ERROR_STYLE if _failed(result) else RESULT_STYLE
    title = Text.assemble(("error from " if _failed(result) else "result of ", "bold"),
                          (visible(result.name or "?"), "bold " + style))
    return Frame(body, title=title, footer=Text(visible(result.id), style="dim"), style=style)


def reasoning_summary(text: str, seconds: float, width: int) -> Text:
    """The one line collapse mode leaves: how long, how much, and how it began."""
    words = len(text.split())
    head = " ".join(text.split())
    summary = Text(f"▸ thought for {_seconds(seconds)} · {words} word{'s' * (words != 1)}",
                   style="dim")
    if head:
        summary.append(f" · {head}", style="dim italic")
    summary.truncate(max(10, width), overflow="ellipsis")
    summary.no_wrap = True
    return summary


def _seconds(s: float) -> str:
    return f"{s:.1f}s" if s < 60 else f"{int(s) // 60}m{int(s) % 60:02d}s"


_FENCE = re.compile(r" {0,3}(`{3,}|~{3,})")


def markdown_split(text: str) -> int:
    """Length of the longest prefix of `text` made of whole Markdown blocks: it ends with a
    blank line outside any code fence, so what follows cannot change how it renders."""
    fence: str | None = None
    pos = best = 0
    seen = False
    for line in text.splitlines(keepends=True):
        if not line.endswith("\n"):
            break
        if fence:
            if re.fullmatch(rf" {{0,3}}{re.escape(fence[0])}{{{len(fence)},}}\s*", line):
                fence = None
        else:
            m = _FENCE.match(line)
            if m:
                fence = m.group(1)
                seen = True
            elif line.strip():
                seen = True
            elif seen:
                best = pos + len(line)
        pos += len(line)
    return best


# ---------------------------------------------------------------------------------------------
# Live panels


class _Block:
    """The reasoning or the answer while it streams: its text and how much is committed."""

    def __init__(self, kind: str, console: Console):
        self.kind = kind
        self.console = console
        self.text = ""
        self.committed = 0
        self.opened = False  # its top border is in the scrollback
        self.start = time.monotonic()

    def add(self, delta: str) -> None:
        if not self.text:
            delta = delta.lstrip("\n")
        self.text += delta

    @property
    def pending(self) -> str:
        return self.text[self.committed:]

    def elapsed(self) -> float:
        return time.monotonic() - self.start


class LiveRenderer:
    """Rich panels: the block being written lives in a small live region; finished paragraphs
    and finished blocks are printed above it into the scrollback."""

    def __init__(self, out: Console, err: Console | None = None, *,
                 think: ThinkMode = ThinkMode.show, quiet: bool = False):
        self.out = out
        self.err = err or out
        self.think = ThinkMode(think)
        self.quiet = quiet
        self._live: Live | None = None
        self._block: _Block | None = None
        self._label: str | None = None  # spinner text while nothing streams
        self._last_refresh = 0.0
        self.reasoning_text = ""  # all of it (collapse and hide keep it off the screen)

    # The events

    def feed(self, event: object) -> None:
        _dispatch(self, event)

    def tool_call(self, call) -> None:
        self._close_block()
        if not self.quiet:
            self._print(self.err, tool_call_panel(call))

    def tool_result(self, result) -> None:
        self._close_block()
        if not self.quiet:
            self._print(self.err, tool_result_panel(result))

    def note(self, text: str, style: str = "dim") -> None:
        self._close_block()
        if not self.quiet:
            self._print(self.err, Text(text, style=style))

    def progress(self, processed: int, total: int) -> None:
        if self._block is None and not self.quiet:
            self._label = (f"reading the prompt · {processed:,}/{total:,} tokens"
                           if processed < total else "thinking…")
            self._ensure_live(self.err)
            self._refresh(force=True)

    def waiting(self, label: str) -> None:
        self._close_block()
        if not self.quiet:
            self._label = label
            self._ensure_live(self.err)
            self._refresh(force=True)

    def finish(self, reason: str = "stop") -> None:
        closing = self._block
        self._close_block(reason)
        self._stop_live()
        if reason not in ("stop", "length") and not self.quiet and (
                closing is None or closing.kind != "answer"):
            self.err.print(Text(f"■ {reason}", style="dim"))

    # Reasoning and answer

    def reasoning(self, delta: str) -> None:
        self.reasoning_text += delta
        block = self._open("reasoning", self.err)
        block.add(delta)
        if self.think is ThinkMode.show:
            cut = block.pending.rfind("\n")
            if cut >= 0:
                self._commit(block, cut + 1)
        self._refresh()

    def text(self, delta: str) -> None:
        block = self._open("answer", self.out)
        block.add(delta)
        cut = markdown_split(block.pending)
        if cut:
            self._commit(block, cut)
        self._refresh()

    def _open(self, kind: str, console: Console) -> _Block:
        if self._block is None or self._block.kind != kind:
            self._close_block()
            self._block = _Block(kind, console)
            self._label = None
            self._ensure_live(console)
        return self._block

    def _content(self, block: _Block, text: str) -> RenderableType:
        if block.kind == "answer":
            return Markdown(text.strip("\n"))
        return Text(text, style="dim")

    def _commit(self, block: _Block, n: int) -> None:
        """Print the next `n` characters of the block above the live region."""
        chunk = block.text[block.committed:block.committed + n]
        if block.kind == "answer":
            frame = self._frame(block, self._content(block, chunk), top=not block.opened,
                                bottom=False, blank_after=True) if chunk.strip() else None
        else:
            frame = self._frame(block, self._content(block, chunk[:-1]), top=not block.opened,
                                bottom=False)
        # Under the live region's lock, so its refresh thread never draws the chunk twice
        # (or not at all) while it moves into the scrollback.
        with self._lock():
            block.committed += n
            if frame is not None:
                block.opened = True
                self._print(block.console, frame)

    def _lock(self):
        lock = getattr(self._live, "_lock", None)
        return lock if lock is not None else contextlib.nullcontext()

    def _frame(self, block: _Block, body: RenderableType | None, **kw) -> Frame:
        if block.kind == "answer":
            return Frame(body, title=Text("Kimi", style="bold " + ANSWER_STYLE),
                         style=ANSWER_STYLE, **kw)
        return Frame(body, title=Text("thinking", style="italic " + REASONING_STYLE),
                     style=REASONING_STYLE, **kw)

    def _close_block(self, reason: str = "stop") -> None:
        with self._lock():
            self._close_block_locked(reason)

    def _close_block_locked(self, reason: str) -> None:
        block, self._block = self._block, None
        if block is None:
            return
        rest = block.pending.rstrip()
        if block.kind == "answer":
            footer = reason_label(reason)
            if rest or block.opened:
                self._print(block.console, self._frame(
                    block, self._content(block, rest) if rest else None, top=not block.opened,
                    footer=Text(footer, style="dim") if footer else None))
            return
        if self.think is ThinkMode.show:
            if rest or block.opened:
                done = reason_label(reason)
                footer = f"thought for {_seconds(block.elapsed())}" + (f" · {done}" if done
                                                                        else "")
                self._print(block.console, self._frame(
                    block, self._content(block, rest) if rest else None, top=not block.opened,
                    footer=Text(footer, style="dim")))
        elif self.think is ThinkMode.collapse and block.text.strip():
            self._print(block.console, reasoning_summary(block.text, block.elapsed(),
                                                         block.console.width))

    def _view(self) -> RenderableType:
        block = self._block
        if block is None:
            return Spinner("dots", Text(self._label or "", style="dim"), style=REASONING_STYLE)
        elapsed = Text(_seconds(block.elapsed()), style="dim")
        room = max(3, min(LIVE_LINES, block.console.height - 6))
        if block.kind == "answer":
            body = self._content(block, block.pending) if block.pending.strip() else None
            return self._frame(block, body, top=not block.opened, max_lines=room)
        if self.think is ThinkMode.hide:
            return Spinner("dots", Text(f"thinking… {_seconds(block.elapsed())}", style="dim"),
                           style=REASONING_STYLE)
        if self.think is ThinkMode.collapse:
            return self._frame(block, self._content(block, block.text.rstrip("\n")),
                               footer=elapsed, max_lines=COLLAPSED_LINES)
        return self._frame(block, self._content(block, block.pending), top=not block.opened,
                           footer=elapsed, max_lines=room)

    # The live region

    def _ensure_live(self, console: Console) -> None:
        if self._live is not None and self._live.console is console:
            return
        self._stop_live()
        # A background refresh keeps the spinner and the clock moving while nothing streams
        # (a long prefill, a running tool); streaming text refreshes at once, throttled.
        self._live = Live(console=console, auto_refresh=True, refresh_per_second=8,
                          transient=True, redirect_stdout=False, redirect_stderr=False,
                          get_renderable=self._view)
        self._live.start()

    def _stop_live(self) -> None:
        live, self._live = self._live, None
        if live is not None:
            live.stop()

    def _refresh(self, force: bool = False) -> None:
        now = time.monotonic()
        if self._live is not None and (force or now - self._last_refresh >= REFRESH_S):
            self._last_refresh = now
            self._live.refresh()

    def _print(self, console: Console, renderable: RenderableType) -> None:
        if self._live is not None and self._live.console is not console:
            self._stop_live()
        console.print(renderable)  # above the live region when one is running on `console`


def _dispatch(renderer, event: object) -> None:
    if isinstance(event, ReasoningDelta):
        renderer.reasoning(event.text)
    elif isinstance(event, TextDelta):
        renderer.text(event.text)
    elif isinstance(event, ToolCall):
        renderer.tool_call(event)
    elif isinstance(event, ToolResult):
        renderer.tool_result(event)


def reason_label(reason: str) -> str:
    if reason == "stop":
        return ""
    if reason == "length":
        return "stopped at --max-tokens"
    return reason


# ---------------------------------------------------------------------------------------------
# Plain streams


class PlainRenderer:
    """Pipes, files and dumb terminals: the answer as plain text on `out`; reasoning (dim when
    colour is on), tool traces and progress on `err`. No cursor movement except a `\\r`
    progress line when `err` is a real terminal."""

    def __init__(self, out: Console, err: Console, *, think: ThinkMode = ThinkMode.show,
                 quiet: bool = False):
        self.out = out.file
        self.err = err.file
        color = err.color_system is not None
        self.dim_on, self.dim_off = ("\x1b[2m", "\x1b[0m") if color else ("", "")
        self.show_reasoning = not quiet and ThinkMode(think) is not ThinkMode.hide
        self.quiet = quiet
        self.progress_line = not quiet and can_go_live(self.err)
        self._in_reasoning = False
        self._answer_tail = ""
        self._progress_shown = False
        self.reasoning_text = ""
        self.before_answer = ""  # written once before the answer (a chat's separator)
        self.answered = False  # some of the answer is on `out`

    def _write(self, stream, text: str) -> None:
        stream.write(text)
        stream.flush()

    def _end_reasoning(self) -> None:
        if self._in_reasoning:
            self._write(self.err, "\n")
            self._in_reasoning = False

    def feed(self, event: object) -> None:
        _dispatch(self, event)

    def reasoning(self, text: str) -> None:
        self.reasoning_text += text
        if self.show_reasoning:
            self._write(self.err, self.dim_on + text + self.dim_off)
            self._in_reasoning = True

    def text(self, text: str) -> None:
        self._end_reasoning()
        if not self.answered and text:
            text = self.before_answer + text
            self.answered = True
        self._write(self.out, text)
        self._answer_tail = (self._answer_tail + text)[-1:]

    def tool_call(self, call) -> None:
        self._end_reasoning()
        if not self.quiet:
            self._write(self.err, f"[tool call {visible(call.id)}: "
                                  f"{visible(call.raw_arguments or '')}]\n")

    def tool_result(self, result) -> None:
        self._end_reasoning()
        if not self.quiet:
            lines = visible(_shown(result), tabs=True).rstrip("\n").split("\n")
            body = "\n".join(lines[:RESULT_LINES])
            more = (f"\n… {len(lines) - RESULT_LINES} more lines"
                    if len(lines) > RESULT_LINES else "")
            what = "tool error" if _failed(result) else "tool result"
            self._write(self.err, f"[{what} {visible(result.id)}]\n{body}{more}\n")

    def note(self, text: str, style: str = "dim") -> None:
        self._end_reasoning()
        if not self.quiet:
            self._write(self.err, text + "\n")

    def progress(self, processed: int, total: int) -> None:
        if self.progress_line and total > config.PREFILL_CHUNK:  # short prompts: no flash
            self._write(self.err, f"\rreading the prompt: {processed}/{total} tokens")
            self._progress_shown = True
            if processed >= total:
                self._clear_progress()

    def _clear_progress(self) -> None:
        if self._progress_shown:
            self._write(self.err, "\r\x1b[K")
            self._progress_shown = False

    def waiting(self, label: str) -> None:
        self._end_reasoning()

    def finish(self, reason: str = "stop") -> None:
        self._clear_progress()
        self._end_reasoning()
        if self._answer_tail and self._answer_tail != "\n":
            self._write(self.out, "\n")
        self._answer_tail = ""
