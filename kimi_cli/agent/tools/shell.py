"""shell{command, timeout?}: run a command with bash in the workspace, inside the sandbox.

Safety: the hard-deny list (safety.check_command) first; stdin is closed, the output is capped,
the whole process group is killed on timeout or Ctrl-C, and secret-looking environment
variables are not passed on.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import threading
from collections import deque

from ..safety import check_command
from .base import Tool, ToolContext, ToolError

_SECRET_ENV = re.compile(r"TOKEN|SECRET|PASSWORD|PASSWD|API_KEY|ACCESS_KEY|CREDENTIAL|PRIVATE_KEY",
                         re.IGNORECASE)


class _Capture(threading.Thread):
    """Reads a pipe to the end, keeping its head and tail (a command may print gigabytes)."""

    def __init__(self, pipe, keep: int) -> None:
        super().__init__(daemon=True)
        self.pipe = pipe
        self.keep = keep
        self.head = bytearray()
        self.tail: deque[bytes] = deque()
        self.tail_size = 0
        self.total = 0

    def run(self) -> None:
        while True:
            chunk = self.pipe.read1(65536) if hasattr(self.pipe, "read1") else self.pipe.read(65536)
            if not chunk:
                return
            self.total += len(chunk)
            room = self.keep - len(self.head)
            if room > 0:
                self.head += chunk[:room]
                chunk = chunk[room:]
            if chunk:
                self.tail.append(chunk)
                self.tail_size += len(chunk)
                while self.tail_size - len(self.tail[0]) >= self.keep:
                    self.tail_size -= len(self.tail.popleft())

    def text(self, cap: int) -> str:
        head = self.head.decode("utf-8", errors="replace")
        tail = b"".join(self.tail)
        if self.total <= len(self.head) + len(tail) and len(head) + len(tail) <= cap:
            return head + tail.decode("utf-8", errors="replace")
        tail_text = tail.decode("utf-8", errors="replace")[-(cap // 2):]
        head = head[: cap // 2]
        skipped = self.total - len(head.encode()) - len(tail_text.encode())
        return (head + f"\n[... {skipped} bytes of output not shown. To see all of it, redirect "
                "the output to a file in the workspace and read it with read_file(path, "
                "start_line=...) ...]\n" + tail_text)


def _environment() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not _SECRET_ENV.search(k)}
    env.update(PAGER="cat", GIT_PAGER="cat", NO_COLOR="1", TERM="dumb")
    return env


def _kill(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    proc.wait()


def run(args: dict, ctx: ToolContext) -> str:
    command = args["command"]
    timeout = args.get("timeout", ctx.shell_timeout)
    if not 0 < timeout <= ctx.shell_max_timeout:
        raise ToolError(f"timeout must be between 0 and {ctx.shell_max_timeout:g} seconds")
    bash = shutil.which("bash") or "/bin/sh"
    argv = ctx.sandbox.wrap([bash, "-c", command], ctx.workspace)
    proc = subprocess.Popen(argv, cwd=ctx.workspace, stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            env=_environment(), start_new_session=True)
    capture = _Capture(proc.stdout, ctx.output_cap)
    capture.start()
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        _kill(proc)
        capture.join(5)
        raise ToolError(f"the command timed out after {timeout:g} s and was killed (pass a "
                        f"larger timeout if it needs longer). Its output so far:\n"
                        + capture.text(ctx.output_cap)) from None
    except BaseException:  # Ctrl-C: the command dies with the step, not after it
        _kill(proc)
        raise
    capture.join(5)
    output = capture.text(ctx.output_cap)
    if output and not output.endswith("\n"):
        output += "\n"
    return (output or "(no output)\n") + f"[exit code {proc.returncode}]"


def check(args: dict, ctx: ToolContext) -> None:
    check_command(args["command"], ctx.workspace)


def preview(args: dict, ctx: ToolContext) -> str:
    return f"$ {args['command']}\n(in {ctx.workspace}; sandbox: {ctx.sandbox.describe()})"


TOOL = Tool(
    name="shell",
    description="Run a shell command (bash) in the workspace directory and return its output "
                "(stdout and stderr) and exit code. No stdin. Optional timeout in seconds "
                "(default 120).",
    parameters={
        "type": "object",
        "properties": {
            "command": {"type": "string", "description": "The command line."},
            "timeout": {"type": "number", "description": "Seconds before it is killed."},
        },
        "required": ["command"],
    },
    kind="exec",
    run=run,
    check=check,
    preview=preview,
)
