"""What a renderer is fed: the chat parser's events plus the result of a tool the agent ran.

`ReasoningDelta`, `TextDelta` and `ToolCall` come from `kimi_cli.chat.parser`; `ToolResult` is
the agent's answer to one `ToolCall` (matched by `id`).
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

from ..chat.parser import ReasoningDelta, TextDelta, ToolCall


@dataclass
class ToolResult:
    """The output of one tool call, as sent back to the model (`content`); `error` marks a
    failed or refused call, whose `content` then says why."""

    id: str
    name: str
    content: str
    error: bool = False


class ThinkMode(str, Enum):
    """How the reasoning is displayed: in full, as its last few lines while streaming and a
    one-line summary after, or not at all."""

    show = "show"
    collapse = "collapse"
    hide = "hide"


UIEvent = ReasoningDelta | TextDelta | ToolCall | ToolResult

__all__ = ["ReasoningDelta", "TextDelta", "ThinkMode", "ToolCall", "ToolResult", "UIEvent"]
