"""write_file{path, content}: create or overwrite a text file in the workspace.

Safety: the path must resolve inside the workspace and not to a secret, a shell start-up file
or a non-regular file; the file is replaced (temp + rename), never written through a hard link.
"""

from __future__ import annotations

import difflib
from pathlib import Path

from ..safety import resolve
from .base import Tool, ToolContext, ToolError
from .files import read_bytes, replace
from .read_file import MAX_BYTES

MAX_DIFF_LINES = 400


def current_text(path: Path) -> str:
    if not path.exists():
        return ""
    return read_bytes(path, path.name, MAX_BYTES).decode("utf-8", errors="replace")


def diff(shown: str, before: str, after: str) -> str:
    """A unified diff for the approval prompt (cut to a readable length)."""
    shown = shown.replace("\n", "\\n")  # a name's newline would draw a line of its own
    lines = list(difflib.unified_diff(before.splitlines(keepends=True),
                                      after.splitlines(keepends=True),
                                      fromfile=f"a/{shown}", tofile=f"b/{shown}"))
    if len(lines) > MAX_DIFF_LINES:
        lines = lines[:MAX_DIFF_LINES] + [f"... ({len(lines) - MAX_DIFF_LINES} more lines)\n"]
    return "".join(line if line.endswith("\n") else line + "\n" for line in lines)


def write(path: Path, text: str, shown: str) -> str:
    """Replace the file; a note if it had other hard links (they keep the old content)."""
    links = replace(path, text)
    if links > 1:
        return (f" (it had {links} hard links: the other names keep the old content; only "
                f"{shown} has the new)")
    return ""


def run(args: dict, ctx: ToolContext) -> str:
    path = resolve(ctx.workspace, args["path"], write=True)
    if path.is_dir():
        raise ToolError(f"{args['path']} is a directory")
    existed = path.exists()
    note = write(path, args["content"], args["path"])
    n = args["content"].count("\n") + (0 if args["content"].endswith("\n") else 1)
    verb = "overwrote" if existed else "created"
    return f"{verb} {args['path']} ({n} lines, {len(args['content'].encode())} bytes){note}"


def check(args: dict, ctx: ToolContext) -> None:
    resolve(ctx.workspace, args["path"], write=True)


def preview(args: dict, ctx: ToolContext) -> str:
    path = resolve(ctx.workspace, args["path"], write=True)
    return diff(args["path"], current_text(path), args["content"])


TOOL = Tool(
    name="write_file",
    description="Create a text file in the workspace, or replace its whole content. "
                "Parent directories are created. Prefer edit_file for changes to a file.",
    parameters={
        "type": "object",
        "properties": {
            "path": {"type": "string", "description": "Path relative to the workspace."},
            "content": {"type": "string", "description": "The complete new content."},
        },
        "required": ["path", "content"],
    },
    kind="edit",
    run=run,
    check=check,
    preview=preview,
)
