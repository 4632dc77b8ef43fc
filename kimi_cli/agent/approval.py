"""When a tool call needs the user's yes: the approval modes, session approvals (by program for
read-only commands, risk.py; else by exact command), and the `Approver` front ends implement.

Only the user's replies change approval state; tool output never does.
"""

from __future__ import annotations

import os
import re
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import IO

from .escape import visible
from .risk import inside, prefix, read_only
from .shellparse import Unparsable, split_command


class Mode(str, Enum):
    ask = "ask"  # file edits and commands ask
    auto_edit = "auto-edit"  # file edits in the workspace run; commands ask
    yolo = "yolo"  # everything runs (the hard-deny list, protected files and the sandbox apply)


class Choice(str, Enum):
    once = "once"  # yes, this call
    session = "session"  # yes, and the same program (read-only use), exact command or any file
    # edit for the rest of the session
    deny = "deny"
    deny_with_message = "deny_with_message"  # no, and tell the model why


@dataclass
class Request:
    call_id: str
    tool: str
    kind: str  # "edit" | "exec"
    title: str  # one line: the full command, or "write_file path"
    preview: str  # the full command with its sandbox, or a diff
    prefixes: list[tuple[str, ...]] | None = None  # exec: what "for this session" approves
    protected: str | None = None  # why this call always asks (a file that runs code), or None


@dataclass
class Reply:
    choice: Choice
    message: str = ""


Approver = Callable[[Request], Reply]


@dataclass
class Decision:
    allowed: bool
    by: str  # "mode" | "user" | "session" | "no-terminal"
    reason: str = ""
    message: str = ""


NO_TERMINAL = ("approval needed but there is no terminal to ask: rerun with --approval "
               "auto-edit (file edits) or --approval yolo (file edits and commands)")


def command_prefixes(command: str) -> list[tuple[str, ...]] | None:
    """The prefixes a session approval of `command` remembers: only when every simple command in
    it is a read-only use of its program (risk.py); None otherwise (then: the exact command)."""
    try:
        segments = split_command(command)
    except Unparsable:
        return None
    if not segments or not all(read_only(s) for s in segments):
        return None
    return list(dict.fromkeys(prefix(s.words) for s in segments))


def exact_approvable(command: str) -> bool:
    """Whether "for this session" may remember `command` itself: only what the parser follows."""
    try:
        return bool(split_command(command))
    except Unparsable:
        return False


@dataclass
class Policy:
    mode: Mode = Mode.ask
    approver: Approver | None = None  # None: no terminal, nobody to ask
    prefixes: set[tuple[str, ...]] = field(default_factory=set)  # of read-only commands
    commands: set[str] = field(default_factory=set)  # exact commands approved for the session
    edits_approved: bool = False  # "for this session" on a file edit
    workspace: Path | None = None  # where session-approved commands must stay (the Agent's)

    def decide(self, request: Request, command: str | None = None) -> Decision:
        if request.protected and request.kind != "read":
            return self._ask_protected(request)
        if request.kind == "read" or self.mode is Mode.yolo:
            return Decision(True, "mode")
        if request.kind == "edit" and (self.mode is Mode.auto_edit or self.edits_approved):
            return Decision(True, "mode" if self.mode is Mode.auto_edit else "session")
        if request.kind == "exec" and command is not None and self._session_allows(command):
            return Decision(True, "session")
        if self.approver is None:
            return Decision(False, "no-terminal", NO_TERMINAL)
        reply = self.approver(request)
        if reply.choice is Choice.session:
            if request.kind == "edit":
                self.edits_approved = True
            elif request.prefixes:
                self.prefixes.update(request.prefixes)
            elif command is not None and exact_approvable(command):
                self.commands.add(command)
            return Decision(True, "user", "approved for this session")
        if reply.choice is Choice.once:
            return Decision(True, "user")
        return Decision(False, "user", "denied by the user", reply.message.strip())

    def _ask_protected(self, request: Request) -> Decision:
        """Files that run code (protected): no mode or earlier approval covers them."""
        if self.approver is None:
            return Decision(False, "protected", f"{request.protected}; it needs the user's "
                            "approval at a terminal, every time")
        reply = self.approver(request)
        if reply.choice in (Choice.once, Choice.session):  # never remembered
            return Decision(True, "user", "approved once (protected)")
        return Decision(False, "user", "denied by the user", reply.message.strip())

    def _session_allows(self, command: str) -> bool:
        """The exact command was approved, or every segment is a read-only use (risk.py) of an
        approved program."""
        if command in self.commands:
            return True
        if not self.prefixes:
            return False
        try:
            segments = split_command(command)
        except Unparsable:
            return False
        if not segments:
            return False
        cwd = self.workspace
        for seg in segments:
            if not read_only(seg):
                return False
            if cwd is not None and not inside(seg, cwd, self.workspace):
                return False
            if not any(tuple(seg.words[:len(p)]) == p for p in self.prefixes):
                return False
            if cwd is not None and seg.words[0] == "cd":
                cwd = Path(os.path.realpath(cwd / seg.words[1]))
        return True


# Before a question on a terminal: undo what model text printed raw earlier may have set up to
# hide or mangle it: a scroll region (the cursor kept), no autowrap, insert mode, a hidden
# cursor, another character set, attributes, colours and palette. (Not the alternate screen or
# origin mode: leaving them moves the cursor, and the question would overwrite the screen.)
TERMINAL_SANE = ("\x0f\x1b(B\x1b[0m\x1b[4l\x1b[?7h\x1b[?25h\x1b7\x1b[r\x1b8"
                 "\x1b]104\x07\x1b]110\x07\x1b]111\x07")
TALL_PREVIEW = 12  # lines: more, and the start of the command may have scrolled away
_PADDING = re.compile(r"[ \t]{16,}")


def shown_preview(preview: str) -> list[str]:
    """A command's preview as shown: escapes visible, long runs of blanks and of empty lines
    counted instead of drawn, so padding cannot push the real command off the screen."""
    out: list[str] = []
    empty = 0
    for line in [*preview.splitlines(), "\x00end"]:
        if not line.strip() and line != "\x00end":
            empty += 1
            continue
        if empty:
            out += [""] * empty if empty <= 2 else [f"[... {empty} empty lines ...]"]
            empty = 0
        if line != "\x00end":
            out.append(_PADDING.sub(lambda m: f"[... {len(m.group(0))} blanks ...]",
                                    visible(line)))
    return out


class StreamApprover:
    """Asks on a text stream (stderr) and reads one line of answer (stdin)."""

    def __init__(self, input: IO | None = None, output: IO | None = None) -> None:
        self.input = input or sys.stdin
        self.output = output or sys.stderr

    def __call__(self, request: Request) -> Reply:
        out = self.output
        what = "run a command" if request.kind == "exec" else "change a file"
        if getattr(out, "isatty", lambda: False)():
            out.write(TERMINAL_SANE)
        # Everything shown here may come from the model: control characters are made visible.
        out.write(f"\nkimi: the agent wants to {what} ({visible(request.tool)}, "
                  f"{visible(request.call_id)}):\n")
        shown = shown_preview(request.preview) if request.kind == "exec" else \
            [visible(line) for line in request.preview.splitlines()]
        out.write("".join("    " + line + "\n" for line in shown))
        if request.kind == "exec" and len(shown) > TALL_PREVIEW:
            start = (request.title.strip().splitlines() or [""])[0][:60]
            out.write(f"  ^ the command above is {len(request.title.splitlines())} lines: read "
                      f"all of it; it starts `{visible(start)}`\n")
        if request.protected:
            out.write(f"  protected: {visible(request.protected)}; this answer covers this "
                      "call only\n")
            session = None
        elif request.kind == "exec":
            if request.prefixes:
                session = ("[a] yes, and don't ask again this session for "
                           + ", ".join("`" + visible(" ".join(p)) + "`"
                                       for p in request.prefixes))
            elif exact_approvable(request.title):
                session = "[a] yes, and don't ask again this session for this exact command"
            else:
                session = None
        else:
            session = "[a] yes, and allow all file edits this session"
        options = ["[y] yes", *([session] if session else []), "[n] no",
                   "[m] no, and tell the model why"]
        while True:
            out.write("  " + "   ".join(options) + "\n  > ")
            out.flush()
            line = self.input.readline()
            if not line:  # end of input: nobody is there
                return Reply(Choice.deny, "")
            answer = line.strip().lower()
            if answer in ("y", "yes"):
                return Reply(Choice.once)
            if answer == "a" and session:
                return Reply(Choice.session)
            if answer in ("n", "no"):
                return Reply(Choice.deny)
            if answer == "m":
                out.write("  message to the model: ")
                out.flush()
                return Reply(Choice.deny_with_message, self.input.readline().strip())
