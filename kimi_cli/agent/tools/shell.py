"""shell{command, timeout?}: run a command with bash in the workspace, inside the sandbox.

Safety: the hard-deny list (safety.check_command) first; then a new session without the terminal
(stdin /dev/null), an allow-listed environment, and every process it started killed when it ends.
"""

from __future__ import annotations

import ctypes
import functools
import os
import shutil
import signal
import subprocess
import sys
import threading
from collections import deque

from ... import config
from .. import seccomp
from ..safety import check_command
from ..sandbox import Sandbox, block_new, present
from .base import Tool, ToolContext, ToolError

PR_SET_CHILD_SUBREAPER = 36  # linux/prctl.h


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


def environment(sandbox: Sandbox, source: dict[str, str] | None = None) -> dict[str, str]:
    """What a command gets of kimi's environment: the allow-list, LC_*, and what --env names."""
    source = os.environ if source is None else source
    env = {k: v for k, v in source.items()
           if k in config.AGENT_ENV_ALLOW or k.startswith("LC_")}
    if sandbox.kind == "bubblewrap":
        env["TMPDIR"] = "/tmp"  # the sandbox's own; the user's may not be visible inside
    for spec in sandbox.env:
        name, eq, value = spec.partition("=")
        if eq:
            env[name] = value
        elif name in source:
            env[name] = source[name]
    env.update(PAGER="cat", GIT_PAGER="cat", NO_COLOR="1", TERM="dumb")
    return env


@functools.lru_cache(maxsize=1)
def _adopt_orphans() -> bool:
    """Make this process the subreaper of its descendants (Linux): a command's daemons
    (`setsid cmd &`) then become our children when their parent exits, and we can end them."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


def _children() -> set[int]:
    """This process's children (Linux /proc); empty where it cannot be known."""
    me, out = os.getpid(), set()
    try:
        names = os.listdir("/proc")
    except OSError:
        return out
    for name in names:
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat", "rb") as f:
                fields = f.read().rsplit(b")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if int(fields[1]) == me:
            out.add(int(name))
    return out


def _kill(proc: subprocess.Popen, before: set[int]) -> None:
    """End the command's process group, then every process it left behind that came to us
    (children present `before` the call are not its own)."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    proc.wait()
    if not _adopt_orphans():
        return
    for _ in range(1000):  # each kill hands us that process's children; a fork loop ends too
        left = _children() - before
        if not left:
            return
        for pid in left:
            for kill, target in ((os.killpg, pid), (os.kill, pid)):
                try:
                    kill(target, signal.SIGKILL)
                except (ProcessLookupError, PermissionError):
                    pass
            try:
                os.waitpid(pid, 0)
            except ChildProcessError:
                pass


def _seccomp_fds(sandbox: Sandbox) -> tuple[int, ...]:
    """bubblewrap's seccomp filter (seccomp.py) in a pipe bwrap reads; () elsewhere."""
    if sandbox.kind != "bubblewrap" or not seccomp.supported():
        return ()
    prog = seccomp.program(unix_sockets=not sandbox.allow_network)
    r, w = os.pipe()  # a few hundred bytes: far below a pipe's buffer
    os.write(w, prog)
    os.close(w)
    return (r,)


def run(args: dict, ctx: ToolContext) -> str:
    command = args["command"]
    timeout = args.get("timeout", ctx.shell_timeout)
    if not 0 < timeout <= ctx.shell_max_timeout:
        raise ToolError(f"timeout must be between 0 and {ctx.shell_max_timeout:g} seconds (the "
                        "user can raise the limit with --max-command-timeout)")
    bash = shutil.which("bash") or "/bin/sh"
    fds = _seccomp_fds(ctx.sandbox)
    argv = ctx.sandbox.wrap([bash, "-c", command], ctx.workspace, fds[0] if fds else None)
    adopting = _adopt_orphans()
    before = _children() if adopting else set()
    env = environment(ctx.sandbox)
    env["PWD"] = str(ctx.workspace)
    # In the sandbox .git, .envrc... are read-only; ones it creates are renamed away after it.
    sandboxed = ctx.sandbox.kind == "bubblewrap"
    existing = present(ctx.workspace) if sandboxed else set()
    # A new session has no controlling terminal: nothing can type into the user's (TIOCSTI) or
    # read it; stdin is /dev/null and no other descriptor is inherited.
    try:
        proc = subprocess.Popen(argv, cwd=ctx.workspace, stdin=subprocess.DEVNULL,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env,
                                start_new_session=True, close_fds=True, pass_fds=fds)
    finally:
        for fd in fds:
            os.close(fd)
    capture = _Capture(proc.stdout, ctx.output_cap)
    capture.start()
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        _kill(proc, before)
        capture.join(5)
        blocked = block_new(ctx.workspace, existing) if sandboxed else ""
        raise ToolError(f"the command timed out after {timeout:g} s and was killed (pass a "
                        f"larger timeout if it needs longer). Its output so far:\n"
                        + capture.text(ctx.output_cap) + blocked) from None
    except BaseException:  # Ctrl-C: the command dies with the step, not after it
        _kill(proc, before)
        if sandboxed:
            block_new(ctx.workspace, existing)
        raise
    # What it started in the background ends with it (and lets go of the output pipe).
    _kill(proc, before)
    capture.join(5)
    output = capture.text(ctx.output_cap)
    if output and not output.endswith("\n"):
        output += "\n"
    blocked = block_new(ctx.workspace, existing) if sandboxed else ""
    return (output or "(no output)\n") + f"[exit code {proc.returncode}]" + blocked


def check(args: dict, ctx: ToolContext) -> None:
    check_command(args["command"], ctx.workspace)


def preview(args: dict, ctx: ToolContext) -> str:
    return f"$ {args['command']}\n(in {ctx.workspace}; sandbox: {ctx.sandbox.describe()})"


TOOL = Tool(
    name="shell",
    description="Run a shell command (bash) in the workspace directory and return its output "
                "(stdout and stderr) and exit code. No stdin; background processes end with the "
                f"command. Optional timeout in seconds (default {config.AGENT_SHELL_TIMEOUT:g}).",
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
