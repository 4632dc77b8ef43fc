"""What slash commands and agent turns may use of a running chat (`repl.ChatApp` is one): a
narrow interface defined below them, so that neither needs the REPL that calls them.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from rich.console import Console

    from ..engine import Engine, SamplingSettings
    from ..sessions import KVInfo, Session
    from .agent_mode import AgentMode
    from .events import ThinkMode
    from .render import Renderer


class ChatHost(Protocol):
    model: Any
    tokenizer: Any
    engine: Engine
    session: Session
    settings: SamplingSettings
    think: ThinkMode
    agent: AgentMode
    heavy_next: int  # trajectories for the next message (/heavy N), 0 for a normal reply
    out: Console  # the answers
    console: Console  # everything else: panels, notes, hints (stderr when stdout is piped)

    def renderer(self) -> Renderer:
        """A renderer for one reply, on `out` and `console`."""

    def note(self, text: str) -> None: ...

    def hint(self, text: str) -> None: ...

    def settings_dict(self) -> dict: ...

    def set_think(self, mode: ThinkMode) -> None: ...

    def set_agent(self, on: bool) -> None: ...

    def respond(self) -> None:
        """Answer the session's last (user) message."""

    def new_session(self) -> None: ...

    def switch_to(self, path: Path) -> None: ...

    def save_kv(self) -> KVInfo | None: ...

    def context_usage(self) -> tuple[int, int]:
        """Tokens of the conversation so far, and how many of them the KV cache holds."""

    def stats_lines(self) -> list[str]: ...

    def model_lines(self) -> list[str]: ...
