"""Terminal decisions in one place: colour (--color, NO_COLOR, FORCE_COLOR, TERM=dumb), live
regions, Rich consoles per stream, and keeping typed keys from echoing over a live region.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterator
from enum import Enum
from typing import IO

from rich.console import Console


class ColorMode(str, Enum):
    auto = "auto"
    always = "always"
    never = "never"


def is_tty(stream: IO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


def dumb_terminal() -> bool:
    return os.environ.get("TERM", "") in ("dumb", "unknown")


def use_color(stream: IO, mode: ColorMode | str = ColorMode.auto) -> bool:
    """--color wins; then NO_COLOR, FORCE_COLOR, TERM=dumb; then whether `stream` is a terminal."""
    mode = ColorMode(mode)
    if mode is not ColorMode.auto:
        return mode is ColorMode.always
    if os.environ.get("NO_COLOR"):
        return False
    if os.environ.get("FORCE_COLOR"):
        return True
    return is_tty(stream) and not dumb_terminal()


def can_go_live(stream: IO) -> bool:
    """Cursor movement (live panels, spinners, progress lines) needs a real, non-dumb terminal."""
    return is_tty(stream) and not dumb_terminal()


def make_console(stream: IO, mode: ColorMode | str = ColorMode.auto) -> Console:
    """A Rich console for `stream` whose colour follows `use_color` and whose live features
    follow `can_go_live`; it never picks a colour system itself beyond detecting the terminal."""
    color = use_color(stream, mode)
    live = can_go_live(stream)
    return Console(
        file=stream,
        force_terminal=live or color,
        no_color=not color,
        # FORCE_COLOR / --color always beat TERM=dumb, which Rich alone would not colour.
        color_system=("standard" if dumb_terminal() else "auto") if color else None,
        highlight=False,
        emoji=False,
        soft_wrap=not live,  # no word wrap in pipes and files
        # A forced (non-terminal) console must not pretend to know the terminal's size.
        width=None if live else _env_int("COLUMNS", 80),
        _environ={k: v for k, v in os.environ.items() if k not in ("FORCE_COLOR", "NO_COLOR")},
    )


def _env_int(name: str, default: int) -> int:
    try:
        return max(20, int(os.environ.get(name, default)))
    except ValueError:
        return default


@contextlib.contextmanager
def _tty_mode(stream: IO | None, echo_and_lines: bool, flush: bool = False) -> Iterator[None]:
    """Turn echo, line editing and CR->NL on or off for the block; restore the old mode after.
    Not a terminal (or no termios): the block runs unchanged."""
    stream = stream or sys.stdin
    try:
        import termios

        fd = stream.fileno()
        old = termios.tcgetattr(fd)
    except (ImportError, AttributeError, ValueError, OSError):
        yield
        return
    new = list(old)
    if echo_and_lines:
        new[3] |= termios.ECHO | termios.ICANON
        new[0] |= termios.ICRNL
    else:
        new[3] &= ~(termios.ECHO | termios.ICANON)
        new[0] &= ~termios.ICRNL  # Enter typed ahead must stay Enter (\r), not Ctrl-J (\n)
    try:
        if flush:
            termios.tcflush(fd, termios.TCIFLUSH)
        termios.tcsetattr(fd, termios.TCSANOW, new)
    except termios.error:
        yield
        return
    try:
        yield
    finally:
        with contextlib.suppress(termios.error):
            termios.tcsetattr(fd, termios.TCSANOW, old)


def no_echo(stream: IO | None = None) -> contextlib.AbstractContextManager[None]:
    """Keys typed while the model writes stay queued for the next prompt instead of being echoed
    into the live region (Ctrl-C still interrupts: ISIG is kept)."""
    return _tty_mode(stream, echo_and_lines=False)


def line_input(stream: IO | None = None) -> contextlib.AbstractContextManager[None]:
    """Ordinary line input (echo, line editing, Enter) for a question asked inside `no_echo`;
    keys typed ahead are dropped first, so an answer is always typed after the question."""
    return _tty_mode(stream, echo_and_lines=True, flush=True)


def wait_for_reader(stream: IO, timeout: float = 0.25) -> None:
    """Before a stderr line on a terminal, let the reader of a piped `stream` (`| cat` to the
    same terminal) take what was written, so the line does not land inside the output."""
    import fcntl
    import stat
    import struct
    import termios
    import time

    try:
        stream.flush()
        fd = stream.fileno()
        if not stat.S_ISFIFO(os.fstat(fd).st_mode) or not is_tty(sys.stderr):
            return
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            unread = struct.unpack("i", fcntl.ioctl(fd, termios.FIONREAD, b"\0" * 4))[0]
            if unread == 0:
                time.sleep(0.01)  # the reader took it; give it a moment to write it out
                return
            time.sleep(0.005)
    except (OSError, ValueError, AttributeError):
        return
