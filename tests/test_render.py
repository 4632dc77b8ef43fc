"""The turn renderer on its own: scripted events in, the screen a terminal would show out.

A Rich console writes into a buffer that is played into a pyte terminal emulator.
"""

from __future__ import annotations

import io

import pyte
from rich.console import Console

from kimi_cli.chat.parser import ToolCall
from kimi_cli.ui.events import ReasoningDelta, TextDelta, ThinkMode, ToolResult
from kimi_cli.ui.render import LiveRenderer, PlainRenderer, markdown_split

COLS, ROWS = 70, 30


def live_screen(events, think=ThinkMode.show, finish="stop") -> str:
    buf = io.StringIO()
    console = Console(file=buf, force_terminal=True, width=COLS, height=ROWS,
                      color_system="standard")
    r = LiveRenderer(console, think=think)
    r.waiting("thinking…")
    for ev in events:
        r.feed(ev)
    r.finish(finish)
    screen = pyte.HistoryScreen(COLS, ROWS, history=1000)
    pyte.Stream(screen).feed(buf.getvalue().replace("\n", "\r\n"))
    rows = ["".join(line[x].data for x in range(COLS)).rstrip() for line in screen.history.top]
    return "\n".join(rows + [line.rstrip() for line in screen.display]).strip()


def deltas(cls, text: str, size: int = 3):
    return [cls(text[i:i + size]) for i in range(0, len(text), size)]


def test_markdown_is_committed_only_at_block_boundaries_outside_code():
    assert markdown_split("one\n\ntwo") == len("one\n\n")
    assert markdown_split("one\ntwo") == 0
    fenced = "intro\n\n```\na\n\nb\n```\n"
    assert markdown_split(fenced) == len("intro\n\n"), "no cut inside the fence"
    assert markdown_split(fenced + "\nafter") == len(fenced + "\n")


def test_reasoning_and_answer_are_two_panels_even_when_committed_in_pieces():
    reasoning = "\n".join(f"step {i} of the plan" for i in range(6))
    answer = "\n\n".join(f"Paragraph {i} with **bold** text." for i in range(5))
    screen = live_screen(deltas(ReasoningDelta, reasoning) + deltas(TextDelta, answer))
    lines = screen.splitlines()
    assert [s.split()[1] for s in lines if s.startswith("╭─")] == ["thinking", "Kimi"], screen
    assert sum(s.startswith("╰─") for s in lines) == 2, screen
    for i in range(6):
        assert f"│ step {i} of the plan" in screen
    for i in range(5):
        assert f"│ Paragraph {i} with bold text." in screen
    assert "thought for" in screen and "**" not in screen


def test_collapse_leaves_one_summary_line_and_hide_leaves_nothing():
    events = deltas(ReasoningDelta, "first idea\nsecond idea\nthird idea") + [TextDelta("Done.")]
    collapsed = live_screen(events, ThinkMode.collapse)
    assert "▸ thought for" in collapsed and "3 words" not in collapsed
    assert "6 words · first idea second idea third idea" in collapsed, collapsed
    assert "╭─ thinking" not in collapsed
    hidden = live_screen(events, ThinkMode.hide)
    assert "idea" not in hidden and "│ Done." in hidden, hidden


def test_tool_calls_and_results_have_their_own_panels():
    call = ToolCall(id="functions.shell:0", name="shell", index=0,
                    arguments={"command": "ls"}, raw_arguments='{"command": "ls"}')
    screen = live_screen([ReasoningDelta("list files"), call,
                          ToolResult("functions.shell:0", "shell", "a.txt\nb.txt"),
                          ToolResult("functions.shell:1", "shell", "denied", error=True),
                          TextDelta("Two files.")])
    assert "╭─ tool call shell" in screen and '"command": "ls"' in screen, screen
    assert "╭─ result of shell" in screen and "│ b.txt" in screen, screen
    assert "╭─ error from shell" in screen, screen
    assert screen.index("tool call") < screen.index("result of") < screen.index("Two files.")


def test_an_interrupted_answer_says_so_in_its_border():
    screen = live_screen([TextDelta("Half an ans")], finish="interrupted")
    assert "│ Half an ans" in screen and "╰─ interrupted" in screen, screen


def test_plain_mode_is_the_answer_on_out_and_the_rest_on_err():
    out, err = io.StringIO(), io.StringIO()
    r = PlainRenderer(Console(file=out, color_system=None), Console(file=err, color_system=None))
    for ev in [ReasoningDelta("hmm"), TextDelta("Answer"), ToolResult("x:0", "x", "ok")]:
        r.feed(ev)
    r.finish()
    assert out.getvalue() == "Answer\n"
    assert err.getvalue() == "hmm\n[tool result x:0]\nok\n"


# The attack: model text that clears the screen, moves the cursor or retitles the terminal.
HOSTILE = "before\x1b[2J\x1b[H\x1b]0;pwned\x07\rafter"


def test_the_models_escape_sequences_never_reach_a_terminal_in_live_panels():
    buf = io.StringIO()
    console = Console(file=buf, force_terminal=True, width=COLS, height=ROWS,
                      color_system="standard")
    r = LiveRenderer(console, think=ThinkMode.show)
    for ev in [ReasoningDelta(HOSTILE + "\n"), TextDelta(HOSTILE + "\n\n")]:
        r.feed(ev)
    r.finish()
    written = buf.getvalue()
    assert "\x1b[2J" not in written and "\x1b]0;" not in written and "\x07" not in written
    assert written.count("before\\x1b[2J\\x1b[H\\x1b]0;pwned\\x07\\rafter") == 2, written


class _Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_plain_mode_shows_escapes_on_a_terminal_and_passes_them_byte_for_byte_to_a_pipe():
    for out, expected in [(_Tty(), "before\\x1b[2J\\x1b[H\\x1b]0;pwned\\x07\\rafter\n"),
                          (io.StringIO(), HOSTILE + "\n")]:
        err = _Tty()
        r = PlainRenderer(Console(file=out, color_system=None),
                          Console(file=err, color_system=None))
        for ev in [ReasoningDelta(HOSTILE), TextDelta(HOSTILE)]:
            r.feed(ev)
        r.finish()
        assert out.getvalue() == expected
        assert "\x1b" not in err.getvalue() and "\\x1b[2J" in err.getvalue()
