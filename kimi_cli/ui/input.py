"""Reading what the user types in `kimi chat`: prompt-toolkit on a terminal, lines otherwise.

Enter sends; Alt-Enter, Esc-Enter or Ctrl-J add a line; a paste is taken verbatim; Ctrl-X Ctrl-E
opens $VISUAL/$EDITOR; `\"\"\"` opens a block that the next `\"\"\"` closes; Ctrl-R searches the
history, kept in the XDG state dir unless KIMI_NO_HISTORY is set.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterable
from pathlib import Path

from .. import config

HISTORY_FILE = "history"
QUOTES = '"""'


def history_path() -> Path | None:
    if os.environ.get("KIMI_NO_HISTORY"):
        return None
    return config.state_dir() / HISTORY_FILE


def open_block(text: str) -> bool:
    """Inside a `\"\"\"` block that is not closed yet (Enter then adds a line)."""
    return text.lstrip().startswith(QUOTES) and text.count(QUOTES) % 2 == 1


def unwrap(text: str) -> str:
    """A `\"\"\"...\"\"\"` block without its quotes; anything else as typed."""
    s = text.strip()
    if s.startswith(QUOTES) and s.endswith(QUOTES) and len(s) >= 2 * len(QUOTES):
        return s[len(QUOTES):-len(QUOTES)].strip("\n")
    return text


class LineReader:
    """Plain lines from a stream that is not a terminal (`printf 'hi\\n' | kimi chat`)."""

    def __init__(self, stream=None):
        self.stream = stream or sys.stdin

    def read(self) -> str:
        line = self.stream.readline()
        if not line:
            raise EOFError
        return line.rstrip("\n")


class PromptReader:
    """prompt-toolkit input with the key bindings above and slash-command completion (Tab)."""

    def __init__(self, commands: Iterable[str] = ()):
        from prompt_toolkit import PromptSession
        from prompt_toolkit.completion import WordCompleter
        from prompt_toolkit.filters import is_searching
        from prompt_toolkit.history import FileHistory, InMemoryHistory
        from prompt_toolkit.key_binding import KeyBindings
        from prompt_toolkit.styles import Style

        kb = KeyBindings()

        typing = ~is_searching  # in Ctrl-R search, Enter accepts the match as usual

        @kb.add("enter", filter=typing)
        def _enter(event) -> None:
            buf = event.current_buffer
            if open_block(buf.text):
                buf.insert_text("\n")
            else:
                buf.validate_and_handle()

        @kb.add("escape", "enter", filter=typing)
        @kb.add("c-j", filter=typing)
        def _newline(event) -> None:
            event.current_buffer.insert_text("\n")

        class _History(FileHistory):
            def store_string(self, string: str) -> None:
                try:  # a history that cannot be written must not break the prompt
                    from ..sessions import open_private, private_dir

                    private_dir(Path(self.filename).parent)
                    open_private(Path(self.filename), "a").close()  # 0600 before it holds text
                    super().store_string(string)
                except OSError:
                    pass

        path = history_path()
        history = InMemoryHistory() if path is None else _History(str(path))
        completer = WordCompleter(sorted(commands), sentence=True,
                                  pattern=None) if commands else None
        self.session = PromptSession(
            history=history,
            multiline=True,
            key_bindings=kb,
            enable_open_in_editor=True,
            completer=completer,
            complete_while_typing=False,
            prompt_continuation=lambda width, line, wrap: "… ".rjust(width),
            style=Style.from_dict({"prompt": "bold ansicyan"}),
        )

    def read(self) -> str:
        return self.session.prompt([("class:prompt", "› ")])
