"""grep{pattern, path?}: lines matching a regular expression in the workspace's text files.

Safety: `path` must resolve inside the workspace; secrets, non-regular files and files that
symlinks lead outside it are skipped; matching runs in a worker killed after a time limit.
"""

from __future__ import annotations

import json
import os
import re
import stat
import subprocess
import sys
from pathlib import Path

from ..safety import protected, resolve
from .base import Tool, ToolContext, ToolError
from .list_files import SKIP

MAX_MATCHES = 200
MAX_LINE = 300
MAX_FILE = 8 << 20


WORKER = Path(__file__).with_name("grep_worker.py")


def _regular(p: Path) -> bool:
    try:
        return stat.S_ISREG(os.stat(p).st_mode)
    except OSError:
        return False


def _files(root: Path, workspace: Path):
    if root.is_file():
        yield root
        return
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in SKIP)
        for name in sorted(filenames):
            p = Path(dirpath) / name
            real = Path(os.path.realpath(p))
            if (workspace in real.parents) and not protected(real, write=False) and _regular(p):
                yield p


def _search(pattern: str, files: list[tuple[str, str]], timeout: float) -> tuple[str, bool]:
    """The worker's output (JSON lines), and whether it ran out of time and was killed."""
    job = json.dumps({"pattern": pattern, "files": files, "max_line": MAX_LINE,
                      "max_file": MAX_FILE})
    # -I -S: no site-packages, no environment: the worker needs only the standard library.
    proc = subprocess.Popen([sys.executable, "-I", "-S", str(WORKER)], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                            encoding="utf-8")
    try:
        out, _ = proc.communicate(job, timeout=timeout)
        return out, False
    except subprocess.TimeoutExpired:
        proc.kill()
        out, _ = proc.communicate()
        return out, True
    except BaseException:
        proc.kill()
        proc.wait()
        raise


def run(args: dict, ctx: ToolContext) -> str:
    try:
        re.compile(args["pattern"])  # a bad pattern is a clear error before the worker starts
    except re.error as e:
        raise ToolError(f"bad regular expression {args['pattern']!r}: {e}") from None
    root = resolve(ctx.workspace, args.get("path") or ".")
    if not root.exists():
        raise ToolError(f"{args.get('path')}: no such file or directory")
    files = [(str(p), p.relative_to(ctx.workspace).as_posix())
             for p in _files(root, ctx.workspace)]
    found, timed_out = _search(args["pattern"], files, ctx.grep_timeout)
    out: list[str] = []
    size = 0
    more = False
    for line in found.splitlines():
        try:
            rel, n, text = json.loads(line)
        except ValueError:  # the last line, cut when the worker was killed
            continue
        if len(out) >= MAX_MATCHES or size > ctx.output_cap:
            more = True
            break
        if len(text) > MAX_LINE:
            text = text[:MAX_LINE] + "…"
        out.append(f"{rel}:{n}:{text}")
        size += len(out[-1]) + 1
    if timed_out:
        out.append(f"[grep stopped after {ctx.grep_timeout:g} s: the pattern is too slow (nested "
                   "repetition like (a+)+ backtracks exponentially); simplify it or narrow the "
                   "path]")
        return "\n".join(out)
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
