"""grep{pattern, path?}: lines matching a regular expression in the workspace's text files.

Safety: `path` must resolve inside the workspace; files that are secrets or that symlinks lead
outside it are skipped.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from ..safety import protected, resolve
from .base import Tool, ToolContext, ToolError
from .list_files import SKIP

MAX_MATCHES = 200
MAX_LINE = 300
MAX_FILE = 8 << 20


def _files(root: Path, workspace: Path):
    if root.is_file():
        yield root
        return
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in SKIP)
        for name in sorted(filenames):
            p = Path(dirpath) / name
            real = Path(os.path.realpath(p))
            if (workspace in real.parents) and not protected(real, write=False):
                yield p


def run(args: dict, ctx: ToolContext) -> str:
    try:
        regex = re.compile(args["pattern"])
    except re.error as e:
        raise ToolError(f"bad regular expression {args['pattern']!r}: {e}") from None
    root = resolve(ctx.workspace, args.get("path") or ".")
    if not root.exists():
        raise ToolError(f"{args.get('path')}: no such file or directory")
    out: list[str] = []
    size = 0
    more = False
    for p in _files(root, ctx.workspace):
        try:
            if p.stat().st_size > MAX_FILE:
                continue
            data = p.read_bytes()
        except OSError:
            continue
        if b"\0" in data[:8192]:
            continue
        rel = p.relative_to(ctx.workspace).as_posix()
        for n, line in enumerate(data.decode("utf-8", errors="replace").splitlines(), 1):
            if regex.search(line):
                if len(out) >= MAX_MATCHES or size > ctx.output_cap:
                    more = True
                    break
                if len(line) > MAX_LINE:
                    line = line[:MAX_LINE] + "…"
                out.append(f"{rel}:{n}:{line}")
                size += len(out[-1]) + 1
        if more:
            break
    if not out:
        return f"no matches for {args['pattern']!r}"
    if more:
        out.append(f"[more matches not shown: narrow the pattern or the path (showing {len(out)})]")
    return "\n".join(out)


def check(args: dict, ctx: ToolContext) -> None:
    resolve(ctx.workspace, args.get("path") or ".")


TOOL = Tool(
    name="grep",
    description="Search the workspace's text files for a regular expression (Python syntax). "
                "Prints path:line:text for each match. Optional path: a file or directory.",
    parameters={
        "type": "object",
        "properties": {
            "pattern": {"type": "string", "description": "Regular expression."},
            "path": {"type": "string", "description": "File or directory (default: all)."},
        },
        "required": ["pattern"],
    },
    kind="read",
    run=run,
    check=check,
)
