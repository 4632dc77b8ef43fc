"""read_file{path, start_line?, end_line?}: a text file of the workspace, or a range of its lines.

Safety: the path must resolve (symlinks followed) inside the workspace, not to a secret, and
to a regular file (never a FIFO or device).
"""

from __future__ import annotations

from ..safety import resolve
from .base import Tool, ToolContext, ToolError
from .files import read_bytes

MAX_BYTES = 64 << 20


def read_text(path, shown: str) -> str:
    """A file's text, exactly (line endings kept); binary or huge files are tool errors."""
    data = read_bytes(path, shown, MAX_BYTES)
    if b"\0" in data[:8192]:
        raise ToolError(f"{shown} is a binary file")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return data.decode("utf-8", errors="replace")


def run(args: dict, ctx: ToolContext) -> str:
    path = resolve(ctx.workspace, args["path"])
    lines = read_text(path, args["path"]).splitlines(keepends=True)
    n = len(lines)
    start = args.get("start_line", 1)
    end = args.get("end_line", max(n, start))
    if start < 1 or end < start:
        raise ToolError(f"bad line range {start}-{end}: lines are numbered from 1 and "
                        "end_line must not be before start_line")
    if n == 0:
        return "(empty file)"
    if start > n:
        raise ToolError(f"start_line {start} is past the end of {args['path']} ({n} lines)")
    end = min(end, n)
    out: list[str] = []
    size = 0
    last = start - 1
    for line in lines[start - 1:end]:
        if size + len(line) > ctx.output_cap and out:
            break
        out.append(line)
        size += len(line)
        last += 1
    text = "".join(out)
    if last < end:
        return (text + ("" if text.endswith("\n") else "\n")
                + f"[truncated: showing lines {start}-{last} of {n}. Call read_file with "
                  f"start_line={last + 1} to read more.]")
    if start > 1 or end < n:
        text += ("" if text.endswith("\n") else "\n") + f"[lines {start}-{end} of {n}]"
    return text


def check(args: dict, ctx: ToolContext) -> None:
    resolve(ctx.workspace, args["path"])


TOOL = Tool(
    name="read_file",
    description="Read a text file in the workspace. Optional start_line and end_line "
                "(1-based, inclusive) read a range; long files are cut and say how to read on.",
    parameters={
        "type": "object",
        "properties": {
            "path": {"type": "string", "description": "Path relative to the workspace."},
            "start_line": {"type": "integer", "description": "First line to read (from 1)."},
            "end_line": {"type": "integer", "description": "Last line to read (inclusive)."},
        },
        "required": ["path"],
    },
    kind="read",
    run=run,
    check=check,
)
