"""The agent's tools, one small module each (schema, function, safety rule), and `--tools`.

Argument names are a contract: read_file{path, start_line?, end_line?}, list_files{pattern?},
grep{pattern, path?}, write_file{path, content}, edit_file{path, old, new}, shell{command, timeout?}.
"""

from __future__ import annotations

from ...errors import UsageError
from . import edit_file, grep, list_files, read_file, shell, write_file
from .base import Tool, ToolContext, ToolError, cap_text, validate

ALL: dict[str, Tool] = {t.name: t for t in (read_file.TOOL, list_files.TOOL, grep.TOOL,
                                              write_file.TOOL, edit_file.TOOL, shell.TOOL)}
READ_ONLY = [name for name, t in ALL.items() if t.kind == "read"]


def select(spec: str | None) -> list[Tool]:
    """`--tools`: comma-separated names, `all` (the default) or `read-only`."""
    if spec is None or spec.strip() in ("", "all"):
        return list(ALL.values())
    names: list[str] = []
    for part in (p.strip() for p in spec.split(",")):
        if part == "read-only":
            names += READ_ONLY
        elif part == "all":
            names += list(ALL)
        elif part in ALL:
            names.append(part)
        elif part:
            raise UsageError(f"--tools: unknown tool {part!r}; choose from "
                             f"{', '.join(ALL)} (or all, read-only)")
    return [ALL[n] for n in dict.fromkeys(names)]


__all__ = ["ALL", "Tool", "ToolContext", "ToolError", "cap_text", "select", "validate"]
