"""The rules no approval mode overrides: the workspace boundary, secrets, shell start-up files,
and recursive deletion of `/`, home or the workspace.

File tools call `resolve`; the shell tool calls `check_command` before anything else.
"""

from __future__ import annotations

import functools
import glob
import os
import pwd
import re
from pathlib import Path

from .shellparse import SUBSTITUTION, Segment, Unparsable, split_command


class Refused(Exception):
    """A call the safety rules refuse whatever the approval mode; the message goes to the model."""


# Relative to a home directory. Reading or writing any of these is refused.
SECRETS = (
    ".ssh", ".gnupg", ".aws", ".azure", ".kube", ".docker/config.json", ".config/gcloud",
    ".config/gh", ".config/hub", ".netrc", ".git-credentials", ".npmrc", ".pypirc",
    ".password-store", ".vault-token", ".cargo/credentials", ".cargo/credentials.toml",
    ".gem/credentials", ".terraform.d/credentials.tfrc.json", ".local/share/keyrings",
    "Library/Keychains",
)
SYSTEM_SECRETS = ("/etc/shadow", "/etc/gshadow", "/etc/sudoers", "/etc/sudoers.d")
# Shell start-up files: writing them plants commands in every future shell.
STARTUP_FILES = (
    ".bashrc", ".bash_profile", ".bash_login", ".bash_logout", ".profile", ".zshrc", ".zshenv",
    ".zprofile", ".zlogin", ".zlogout", ".kshrc", ".cshrc", ".tcshrc", ".config/fish",
    ".inputrc", ".xprofile", ".xinitrc", ".pam_environment", ".config/environment.d",
    ".config/autostart",
)
SYSTEM_STARTUP_FILES = ("/etc/profile", "/etc/profile.d", "/etc/bash.bashrc", "/etc/zshrc",
                        "/etc/zsh", "/etc/environment")
# Programs that read credential stores.
CREDENTIAL_COMMANDS = {("security", "find-generic-password"), ("security", "find-internet-password"),
                       ("security", "dump-keychain"), ("secret-tool", "lookup"), ("pass", "show")}
# Wrappers whose first non-option argument is the program that actually runs.
_WRAPPERS = {"sudo", "doas", "command", "builtin", "exec", "nice", "nohup", "time", "env",
             "xargs", "stdbuf", "timeout"}
# Harmless write targets outside the workspace.
_DEVICES = ("/dev/null", "/dev/stdout", "/dev/stderr", "/dev/tty", "/dev/fd/")


def homes() -> list[Path]:
    """$HOME and the account's home from the password database (they may differ)."""
    return list(_homes(os.environ.get("HOME", "")))


@functools.lru_cache(maxsize=8)
def _homes(home_env: str) -> tuple[Path, ...]:
    found = [Path(os.path.expanduser("~"))]
    try:
        found.append(Path(pwd.getpwuid(os.getuid()).pw_dir))
    except (KeyError, OSError):
        pass
    out: list[Path] = []
    for h in found:
        real = Path(os.path.realpath(h))
        if real not in out and real != Path("/"):
            out.append(real)
    return tuple(out)


def _within(path: Path, root: Path) -> bool:
    p, r = str(path), str(root)
    return p == r or p.startswith(r.rstrip("/") + "/")


@functools.lru_cache(maxsize=8)
def _rules(home_env: str) -> tuple[tuple[str, str, bool], ...]:
    """(root, reason, write-only) for every protected path under the current homes."""
    rules = []
    for home in _homes(home_env):
        rules += [(str(home / rel), f"holds secrets (~/{rel})", False) for rel in SECRETS]
        rules += [(str(home / rel), "is a shell start-up file", True) for rel in STARTUP_FILES]
    rules += [(p, "holds secrets", False) for p in SYSTEM_SECRETS]
    rules += [(p, "is a shell start-up file", True) for p in SYSTEM_STARTUP_FILES]
    return tuple(rules)


def protected(path: Path, write: bool) -> str | None:
    """Why `path` (already resolved) may not be touched, or None."""
    for root, reason, write_only in _rules(os.environ.get("HOME", "")):
        if (write or not write_only) and _within(path, Path(root)):
            return f"{path} {reason}"
    return None


def resolve(workspace: Path, raw: str, write: bool = False) -> Path:
    """`raw` (relative to the workspace, absolute or `~/...`) as a real path inside it.

    Symlinks are followed before the check, so a link pointing out of the workspace is refused.
    """
    if not raw or "\0" in raw:
        raise Refused(f"invalid path {raw!r}")
    path = Path(os.path.expanduser(raw))
    if not path.is_absolute():
        path = workspace / path
    real = Path(os.path.realpath(path))
    if not _within(real, workspace):
        raise Refused(f"{raw} is outside the workspace {workspace}: file tools only work inside it")
    why = protected(real, write)
    if why:
        raise Refused(why)
    return real


# Shell commands


def check_command(command: str, workspace: Path) -> None:
    """Raise Refused for commands on the hard-deny list; the rest is up to approval and sandbox."""
    _check_command(command, workspace, workspace)


def _check_command(command: str, cwd: Path | None, workspace: Path) -> None:
    try:
        segments = split_command(command)
    except Unparsable:
        _check_text(command, cwd, workspace)
        return
    for seg in segments:
        _check_segment(seg, cwd, workspace)
        if seg.words and seg.words[0] in ("cd", "pushd"):
            cwd = _cd(seg.words[1:], cwd)


def _cd(args: list[str], cwd: Path | None) -> Path | None:
    if not args:
        return homes()[0]
    target = _expand(args[0], cwd)
    return target if target is not None and args[0] != "-" else None


def _expand(word: str, cwd: Path | None) -> Path | None:
    """The path a word names, with ~, $HOME and $PWD expanded; None if it cannot be known."""
    home = str(homes()[0])
    if word == "~" or word.startswith("~/"):
        word = home + word[1:]
    word = re.sub(r"^\$(HOME|\{HOME\})(?=/|$)", lambda _: home, word)
    if cwd is not None:
        word = re.sub(r"^\$(PWD|\{PWD\})(?=/|$)", lambda _: str(cwd), word)
    if "$" in word or SUBSTITUTION in word or "`" in word:
        return None
    path = Path(word)
    if not path.is_absolute():
        if cwd is None:
            return None
        path = cwd / path
    return Path(os.path.realpath(path))


def _paths(word: str, cwd: Path | None) -> list[Path]:
    """Every path a word may name: itself, an `--opt=value` value, and what a glob matches."""
    out: list[Path] = []
    for part in {word, word.split("=", 1)[-1]}:
        p = _expand(part, cwd)
        if p is None:
            continue
        out.append(p)
        if any(ch in part for ch in "*?["):
            out.extend(Path(os.path.realpath(m)) for m in glob.glob(str(p), recursive=False)[:200])
            out.extend(Path(os.path.realpath(m)) for m in glob.glob(str(p) + "/*")[:200])
    return out


def _program(words: list[str]) -> list[str]:
    """The words from the program that actually runs (past sudo, env VAR=x, nice -n 5 ...)."""
    i = 0
    while i < len(words):
        w = words[i]
        if re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*=.*", w) or w.startswith("-"):
            i += 1
        elif os.path.basename(w) in _WRAPPERS:
            i += 1
            # Options of the wrapper with a value (`timeout 5`, `nice -n 5`): skip numbers too.
            while i < len(words) and (words[i].startswith("-") or words[i].isdigit()):
                i += 1
        else:
            return words[i:]
    return []


def _check_segment(seg: Segment, cwd: Path | None, workspace: Path) -> None:
    words = _program(seg.words)
    name = os.path.basename(words[0]) if words else ""
    for word in seg.words + [t for _, t in seg.redirects]:
        _check_mention(word, cwd)
    if tuple(words[:2]) in CREDENTIAL_COMMANDS:
        raise Refused(f"`{' '.join(words[:2])}` reads a credential store")
    if name in ("bash", "sh", "zsh", "dash", "ksh", "eval") and len(words) > 1:
        inner = words[2] if len(words) > 2 and words[1] == "-c" else None
        if name == "eval":
            inner = " ".join(words[1:])
        if inner:
            _check_command(inner, cwd, workspace)
    if name == "rm" and _recursive(words[1:]):
        for target in (w for w in words[1:] if not w.startswith("-")):
            _check_deletion(target, cwd, workspace)
    for target in seg.writes() + _writer_targets(name, words):
        p = _expand(target, cwd)
        if p is None:
            continue
        if str(p).startswith(_DEVICES) or str(p) in _DEVICES:
            continue
        why = protected(p, write=True)
        if why:
            raise Refused(why)
        if not _within(p, workspace):
            raise Refused(f"the command writes {target}, outside the workspace {workspace}")


def _writer_targets(name: str, words: list[str]) -> list[str]:
    """Files well-known writers write: tee's, touch's, cp/mv's destination, dd's of=."""
    args = [w for w in words[1:] if not w.startswith("-")]
    if name in ("tee", "touch", "mkdir", "truncate", "rm", "rmdir", "shred", "chmod", "chown"):
        return args[1:] if name in ("chmod", "chown") else args
    if name in ("cp", "mv", "ln", "install", "rsync") and len(args) >= 2:
        return [args[-1]]
    if name == "dd":
        return [w[3:] for w in words[1:] if w.startswith("of=")]
    if name == "sed" and any(w.startswith("-i") or w == "--in-place" for w in words[1:]):
        return args[1:]
    return []


def _recursive(args: list[str]) -> bool:
    return any(a in ("--recursive", "-r", "-R") or re.fullmatch(r"-[a-zA-Z]*[rR][a-zA-Z]*", a)
               for a in args)


def _check_deletion(target: str, cwd: Path | None, workspace: Path) -> None:
    roots = [Path("/"), *homes(), workspace]
    if cwd is not None and re.fullmatch(r"(\./)?(\*|\.\*|\.|\./)", target) and cwd in roots:
        raise Refused(f"`rm -r {target}` in {cwd} deletes {_root_name(cwd, workspace)}")
    for p in _paths(target, cwd):
        # Deleting any ancestor of home or the workspace deletes them too.
        for root in roots:
            if _within(root, p):
                raise Refused(f"`rm -r {target}` deletes {_root_name(root, workspace)}")


def _root_name(root: Path, workspace: Path) -> str:
    if root == workspace:
        return f"the workspace {workspace}"
    if root == Path("/"):
        return "the whole file system"
    return f"the home directory {root}"


def _check_mention(word: str, cwd: Path | None) -> None:
    """Naming a secret or a start-up file anywhere in a command is enough to refuse it."""
    for p in _paths(word, cwd):
        why = protected(p, write=False)
        if why:
            raise Refused(why)
        if any(_within(p, h / rel) for h in homes() for rel in STARTUP_FILES):
            raise Refused(f"{p} is a shell start-up file")


def _check_text(command: str, cwd: Path | None, workspace: Path) -> None:
    """Unparsable commands: refuse if the text names a secret or a recursive delete of a root."""
    text = command.replace('"', " ").replace("'", " ")
    for word in re.split(r"[\s;&|()<>`]+", text):
        if word:
            _check_mention(word, cwd)
    for m in re.finditer(r"\brm\s+((?:-\S+\s+)*)(\S+)", text):
        if _recursive(m.group(1).split()):
            _check_deletion(m.group(2), cwd, workspace)
