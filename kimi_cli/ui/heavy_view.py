"""The trajectories of a heavy run on screen: a live table on a terminal, one line each otherwise.

While they run: phase and token counts; once done, each one's answer collapsed to a line. The
aggregate turn after them uses the usual reasoning / answer panels (`render.make_renderer`).
"""

from __future__ import annotations

import time

from rich.console import Console, Group, RenderableType
from rich.live import Live
from rich.spinner import Spinner
from rich.table import Table
from rich.text import Text

from .render import ANSWER_STYLE, REASONING_STYLE
from .term import can_go_live


def _first_line(text: str) -> str:
    for line in text.strip().splitlines():
        if line.strip():
            return line.strip()
    return ""


class HeavyView:
    """`update(trajectories)` after each step; `close()` commits the final table."""

    def __init__(self, err: Console, quiet: bool = False):
        self.err = err
        self.quiet = quiet
        self.live_ok = can_go_live(err.file) and not quiet
        self._live: Live | None = None
        self._trajs: list = []
        self._reported: set[int] = set()
        self._t0 = time.perf_counter()
        self._last = 0.0
        self._closed = False

    def update(self, trajs: list) -> None:
        self._trajs = trajs
        if self.quiet:
            return
        if not self.live_ok:
            for t in trajs:  # plain: one line as each one finishes
                if t.finish_reason is not None and t.index not in self._reported:
                    self._reported.add(t.index)
                    self.err.print(f"kimi: trajectory {t.index}/{len(trajs)}: "
                                   f"{len(t.token_ids):,} tokens, {t.finish_reason}",
                                   highlight=False)
            return
        if self._live is None:
            self._live = Live(console=self.err, auto_refresh=True, refresh_per_second=8,
                              transient=True, redirect_stdout=False, redirect_stderr=False,
                              get_renderable=self._view)
            self._live.start()
        now = time.monotonic()
        if now - self._last >= 1 / 15:
            self._last = now
            self._live.refresh()

    def close(self, reason: str = "stop") -> None:
        """Stop the live table and print it once, final (idempotent)."""
        if self._closed:
            return
        self._closed = True
        if self._live is not None:
            self._live.stop()
            self._live = None
        if self.quiet:
            return
        if self.live_ok:
            self.err.print(self._table(final=True))
        if reason == "interrupted":
            self.err.print(Text("■ interrupted: the trajectories above are what was done",
                                style="dim"))

    def note(self, text: str) -> None:
        if not self.quiet:
            self.err.print(Text(text, style="dim") if self.live_ok else text, highlight=False)

    def _view(self) -> RenderableType:
        return self._table(final=False)

    def _table(self, final: bool) -> RenderableType:
        trajs = self._trajs
        done = sum(t.finish_reason is not None for t in trajs)
        tokens = sum(len(t.token_ids) for t in trajs)
        secs = time.perf_counter() - self._t0
        head = Text.assemble(("heavy", "bold " + ANSWER_STYLE),
                             (f" · {len(trajs)} trajectories · {done} done · {tokens:,} tokens"
                              f" · {tokens / secs if secs > 0 else 0:.1f} tok/s", "dim"))
        table = Table.grid(padding=(0, 1))
        table.add_column(justify="right", style="dim", no_wrap=True)
        table.add_column(no_wrap=True)
        table.add_column(justify="right", no_wrap=True)
        table.add_column(no_wrap=True, overflow="ellipsis", ratio=1)
        for t in trajs:
            n = f"{len(t.token_ids):,} tok"
            if t.finish_reason is None:
                mark: RenderableType = Spinner("dots", style=REASONING_STYLE)
                what = Text(t.phase == "answer" and "answering…" or "thinking…",
                            style=REASONING_STYLE)
            else:
                ok = t.finish_reason == "stop"
                mark = Text("✓" if ok else "■", style="green" if ok else "yellow")
                line = _first_line(t.content)
                what = Text(line or f"({t.finish_reason}, no answer)",
                            style=ANSWER_STYLE if line else "dim")
                if line and not ok:
                    what.append(f"  ({t.finish_reason})", style="dim")
            table.add_row(f"#{t.index}", mark, n, what)
        return Group(head, table) if not final or trajs else head
