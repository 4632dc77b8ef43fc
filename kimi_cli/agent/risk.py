"""Which simple commands a session approval of their program may cover: an allow-list of programs
and the arguments known to only read; everything else is approved by exact command or asked.

`read_only(segment)` is the whole rule; `RULES` is its data (README "Safety model" lists it).
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from pathlib import Path

from .shellparse import Segment

_ASSIGNMENT = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(\[[^]]*\])?\+?=")
# Paths a covered command may name: relative, inside the workspace (the cwd), or /dev/null.
_OUTSIDE = re.compile(r"(^|=|^-[A-Za-z]+)(/|~)|(^|/|=)\.\.(/|$)")


def _no_args(*bad: str) -> Callable[[list[str]], bool]:
    """Any arguments except the options in `bad` (exact, `--opt=…` or a short cluster)."""
    long_opts = tuple(b for b in bad if b.startswith("--"))
    short = "".join(b[1] for b in bad if re.fullmatch(r"-[A-Za-z0-9]", b))

    def ok(args: list[str]) -> bool:
        for a in args:
            if a == "--":
                return True
            # GNU getopt and git take any unambiguous abbreviation: `--outp=F` is `--output=F`.
            name = a.split("=", 1)[0]
            if a.startswith("--") and len(name) > 2 and any(b.startswith(name) or
                                                            a.startswith(b) for b in long_opts):
                return False
            if short and re.fullmatch(rf"-[A-Za-z0-9]*[{short}][A-Za-z0-9]*.*", a) \
                    and not a.startswith("--"):
                return False
        return True
    return ok


def _find(args: list[str]) -> bool:
    # find runs programs (-exec, -ok …), deletes (-delete) and writes files (-fprint*, -fls).
    return not any(a.startswith(("-exec", "-ok", "-delete", "-fprint", "-fls")) for a in args)


_SED_SAFE_SCRIPT = re.compile(r"((\d+|\$)(,(\d+|\$))?|/[^/\\\n]*/)?[pdq=]|"
                              r"s/[^/\\\n]*/[^/\\\n]*/[gpI0-9]*")


def _sed(args: list[str]) -> bool:
    # GNU sed's e command and s///e flag run programs; w/W/r/R and -i write or read other files.
    scripts: list[str] = []
    files = False
    i = 0
    while i < len(args):
        a = args[i]
        if a in ("-n", "--quiet", "--silent", "-E", "-r", "--regexp-extended", "-u", "-z"):
            pass
        elif a in ("-e", "--expression"):
            if i + 1 >= len(args):
                return False
            scripts.append(args[i + 1])
            i += 1
        elif a.startswith("-"):
            return False  # -i, --in-place, -f, -s, clusters: not covered
        elif not scripts and not files:
            scripts.append(a)
        else:
            files = True
        i += 1
    return bool(scripts) and all(
        all(_SED_SAFE_SCRIPT.fullmatch(part.strip()) for part in s.split(";")) for s in scripts)


def _awk(args: list[str]) -> bool:
    # awk runs programs (system, `| cmd`, `cmd | getline`) and writes files (`> f`).
    program = None
    i = 0
    while i < len(args):
        a = args[i]
        if a in ("-F", "-v") and i + 1 < len(args):
            i += 1
        elif re.fullmatch(r"-F.+|-v.+", a):
            pass
        elif a.startswith("-"):
            return False  # -f progfile, -i/-l (gawk extensions), -E
        elif program is None:
            program = a
        i += 1
    return program is not None and not re.search(r"system|getline|[|>]|@load|@include|close|"
                                                 r"fflush|ENVIRON|PROCINFO", program)


GIT_READ = {"status", "log", "diff", "show", "ls-files", "rev-parse", "blame", "describe",
             "shortlog", "ls-tree", "cat-file", "reflog"}
# Options of those that run programs (external diff drivers, text filters, pagers) or write.
_GIT_BAD = _no_args("--output", "--ext-diff", "--textconv", "--open-files-in-pager", "-O",
                    "--exec", "--upload-pack", "--filters")


def _git(args: list[str]) -> bool:
    # Global options (-c, -C, --git-dir, --exec-path …) come before the subcommand: none covered.
    return bool(args) and args[0] in GIT_READ and _GIT_BAD(args[1:]) and \
        not (args[0] == "reflog" and len(args) > 1 and args[1] not in ("show", "--all"))


def _one_file(args: list[str]) -> bool:
    """uniq IN OUT writes OUT: at most one operand."""
    return len([a for a in args if not a.startswith("-")]) <= 1


_ANY = _no_args()
# Program → the arguments with which it only reads (files, the workspace, its output).
RULES: dict[str, Callable[[list[str]], bool]] = {
    **{p: _ANY for p in (
        "ls", "cat", "head", "tail", "wc", "pwd", "echo", "printf", "true", "false", "date",
        "whoami", "id", "uname", "stat", "du", "df", "which", "basename", "dirname",
        "realpath", "readlink", "diff", "cmp", "cut", "tr", "nl", "rev", "column", "md5sum",
        "sha1sum", "sha256sum", "grep", "egrep", "fgrep", "test", "[", "jq", "seq",
        "comm", "paste", "fold", "expand", "od", "hexdump", "strings")},
    "cd": lambda args: len(args) == 1 and args[0] != "-",  # bare `cd` goes home
    "date": _no_args("-s", "--set"),
    "file": _no_args("-C", "--compile"),
    "sort": _no_args("-o", "--output", "--compress-program", "--files0-from"),
    "uniq": _one_file,
    "tree": _no_args("-o"),
    "rg": _no_args("--pre", "--pre-glob", "-z", "--search-zip", "--hostname-bin"),
    "find": _find,
    "sed": _sed,
    "awk": _awk, "gawk": _awk, "mawk": _awk,
    "git": _git,
}


def prefix(words: list[str]) -> tuple[str, ...]:
    """What a session approval of a read-only command remembers: the program, and for git its
    subcommand (`git status` does not approve `git log`)."""
    if words[0] == "git" and len(words) >= 2:
        return tuple(words[:2])
    return tuple(words[:1])


def read_only(seg: Segment) -> bool:
    """True if `seg` may run under a session approval of its program: a literal command of an
    allow-listed program with read-only arguments, naming nothing outside the workspace and
    writing nothing (a redirection to /dev/null or to another fd aside)."""
    if seg.opaque or not seg.words or _ASSIGNMENT.match(seg.words[0]):
        return False
    if any(t != "/dev/null" for t in seg.writes()):
        return False
    if any(_OUTSIDE.search(t) and t != "/dev/null" for _, t in seg.redirects
           if not t.startswith("&")):
        return False
    rule = RULES.get(seg.words[0])
    args = seg.words[1:]
    if rule is None or any(_OUTSIDE.search(a) for a in args):
        return False
    return rule(args)


def inside(seg: Segment, cwd: Path, workspace: Path) -> bool:
    """Every word of `seg` read as a path from `cwd` stays in `workspace` once symlinks are
    followed: `cat docs/x` is not a read-only use when docs links to / (a cloned repo's link)."""
    for word in seg.words[1:] + [t for _, t in seg.redirects if not t.startswith("&")]:
        for part in {word, word.split("=", 1)[-1]}:
            if part and not part.startswith("-"):
                real = os.path.realpath(cwd / part)
                if real != str(workspace) and not real.startswith(str(workspace) + os.sep):
                    return False
    return True
