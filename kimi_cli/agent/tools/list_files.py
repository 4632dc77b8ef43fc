"""list_files{pattern?}: the workspace's files matching a glob (`**` recurses), sorted.

Safety: patterns are relative to the workspace; matches reached through symlinks that leave it
are not listed.
"""

from __future__ import annotations

import os
from pathlib import Path, PurePosixPath

from ..safety import Refused, protected
from .base import Tool, ToolContext

MAX_ENTRIES = 1000
SKIP = {".git", ".hg", ".svn", "__pycache__", "node_modules", ".venv"}


def check(args: dict, ctx: ToolContext) -> None:
    pattern = args.get("pattern") or "**/*"
    pure = PurePosixPath(pattern)
    if pure.is_absolute() or pattern.startswith("~") or ".." in pure.parts:
        raise Refused(f"pattern {pattern!r} leaves the workspace: patterns are relative to it "
                      "and may not use '..'")


def run(args: dict, ctx: ToolContext) -> str:
    check(args, ctx)
    pattern = args.get("pattern") or "**/*"
    explicit = set(PurePosixPath(pattern).parts)
    found: list[str] = []
    more = 0
    for p in ctx.workspace.glob(pattern):
        rel = p.relative_to(ctx.workspace)
        if any(part in SKIP and part not in explicit for part in rel.parts):
            continue
        real = Path(os.path.realpath(p))
        if not (real == ctx.workspace or ctx.workspace in real.parents):
            continue
        if protected(real, write=False):
            continue
        if len(found) >= MAX_ENTRIES:
            more += 1
            continue
        found.append(rel.as_posix() + ("/" if p.is_dir() else ""))
    if not found:
        return f"no files match {pattern!r}"
    found.sort()
    text = "\n".join(found)
    if more:
        text += f"\n[{more} more entries not shown: use a narrower pattern]"
    return text


TOOL = Tool(
    name="list_files",
    description="List files in the workspace matching a glob pattern relative to it "
                "(default '**/*', everything; '*.py' is the top level only, '**/*.py' recurses). "
                "Directories end with '/'.",
    parameters={
        "type": "object",
        "properties": {"pattern": {"type": "string", "description": "Glob, e.g. 'src/**/*.py'."}},
    },
    kind="read",
    run=run,
    check=check,
)
