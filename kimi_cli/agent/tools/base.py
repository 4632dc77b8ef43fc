"""What every tool module provides (a `Tool`: schema, function, safety rule) and what it gets
(a `ToolContext`: the workspace, the sandbox, the limits).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from ... import config
from ..safety import Refused, command_protected, resolve, workspace_protected
from ..sandbox import Sandbox


class ToolError(Exception):
    """The call failed in a way the model can fix; the message goes back to it."""


@dataclass
class ToolContext:
    workspace: Path  # real path
    sandbox: Sandbox = field(default_factory=lambda: Sandbox("none"))
    output_cap: int = config.AGENT_TOOL_OUTPUT_CAP  # characters of a result the model sees
    shell_timeout: float = config.AGENT_SHELL_TIMEOUT
    shell_max_timeout: float = config.AGENT_SHELL_MAX_TIMEOUT
    grep_timeout: float = config.AGENT_GREP_TIMEOUT


def protected_target(args: dict, ctx: ToolContext) -> str | None:
    """Why a call that changes something always asks: it writes a file that runs code."""
    if isinstance(args.get("command"), str):
        return command_protected(args["command"], ctx.workspace)
    if isinstance(args.get("path"), str):
        try:
            return workspace_protected(resolve(ctx.workspace, args["path"], write=True),
                                       ctx.workspace)
        except Refused:
            return None
    return None


@dataclass(frozen=True)
class Tool:
    name: str
    description: str
    parameters: dict  # JSON schema of the arguments: names and types are a contract
    kind: str  # "read": runs in every mode; "edit": file changes; "exec": runs commands
    run: Callable[[dict, ToolContext], str]
    # Safety rule: raise Refused (hard deny, no mode overrides it); runs before approval.
    check: Callable[[dict, ToolContext], None] = lambda args, ctx: None
    # What the user sees when asked to approve (the full command, or a diff).
    preview: Callable[[dict, ToolContext], str] = lambda args, ctx: ""
    # Why this call must ask in every mode (safety.workspace_protected), or None.
    protected: Callable[[dict, ToolContext], str | None] = protected_target

    def schema(self) -> dict:
        return {"type": "function", "function": {
            "name": self.name, "description": self.description, "parameters": self.parameters}}


_TYPES = {"string": str, "integer": int, "number": (int, float), "boolean": bool}
_ARTICLE = {"integer": "an"}


def validate(tool: Tool, args: dict) -> None:
    """Arguments against the schema: required, known, of the right JSON type."""
    props = tool.parameters.get("properties", {})
    for name in args:
        if name not in props:
            raise ToolError(f"unknown argument {name!r}; {tool.name} takes {_signature(tool)}")
    for name in tool.parameters.get("required", []):
        if name not in args:
            raise ToolError(f"missing required argument {name!r}; {tool.name} takes "
                            f"{_signature(tool)}")
    for name, value in args.items():
        want = props[name].get("type")
        ok = isinstance(value, _TYPES.get(want, object)) and not (
            want in ("integer", "number") and isinstance(value, bool))
        if not ok:
            raise ToolError(f"argument {name!r} must be {_ARTICLE.get(want, 'a')} {want}, "
                            f"got {type(value).__name__}")


def _signature(tool: Tool) -> str:
    required = set(tool.parameters.get("required", []))
    names = [n if n in required else n + "?" for n in tool.parameters.get("properties", {})]
    return "{" + ", ".join(names) + "}"


def cap_text(text: str, cap: int, note: str) -> str:
    """`text` cut to about `cap` characters at a line break, with `note` saying how to see more."""
    if len(text) <= cap:
        return text
    cut = text.rfind("\n", 0, cap)
    cut = cut + 1 if cut > cap // 2 else cap
    return text[:cut] + f"\n[truncated: {len(text) - cut} more characters. {note}]"


__all__ = ["Refused", "Tool", "ToolContext", "ToolError", "cap_text", "validate"]
