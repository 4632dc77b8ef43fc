"""The rules no approval mode overrides (the workspace boundary, secrets, shell start-up files,
recursive deletion of `/`, a home or the workspace) and the protected files that always ask.

File tools call `resolve`; the shell tool calls `check_command` before anything else.
"""

from __future__ import annotations

import functools
import glob
import itertools
import os
import pwd
import re
import stat
from pathlib import Path

from .risk import GIT_READ
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
    # Our own download token, git's credential store, and histories that hold typed passwords.
    ".cache/huggingface/token", ".huggingface/token", ".config/git/credentials",
    ".bash_history", ".zsh_history", ".python_history", ".psql_history", ".mysql_history",
    ".sqlite_history", ".node_repl_history",
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
             "xargs", "stdbuf", "timeout", "ionice", "setsid", "chrt", "taskset", "busybox",
             "toybox", "flock", "unshare", "nsenter", "chroot", "strace", "ltrace", "unbuffer",
             "caffeinate", "firejail", "systemd-run", "runuser", "su", "sg", "pkexec", "numactl",
             "prlimit", "faketime", "torsocks", "proxychains", "proxychains4", "fakeroot",
             "eatmydata", "valgrind", "catchsegv", "dbus-run-session", "xvfb-run", "watch",
             "script", "parallel", "setpriv", "sshpass", "cgexec", "chpst", "tini", "dumb-init"}
# Of those, the ones that run a command string: `su -c STR`, `script -qc STR`, `watch STR...`.
_SHELLS = {"bash", "sh", "zsh", "dash", "ksh", "mksh", "ash", "yash", "rbash", "fish", "csh",
           "tcsh", "eval"}
_STRING_WRAPPERS = {"su", "runuser", "script", "flock", "sg", "watch", "sudo", "doas"}
# Harmless write targets outside the workspace.
_DEVICES = ("/dev/null", "/dev/stdout", "/dev/stderr", "/dev/tty", "/dev/fd/")
# Workspace files that run code with nobody running a command of the project: git's config,
# hooks and attributes (on `git status`), direnv's (on `cd`), editors' tasks and settings (on
# opening the folder), pre-commit's, husky's, mercurial's and other agents' hooks, mise's (on
# `cd`), shell start-up files. Changing them
# always asks, in every mode, and is refused without a terminal. Makefiles, package.json,
# conftest.py and the like are not here: they run only when someone runs the project's tools.
PROTECTED_DIRS = (".git", ".hg", ".vscode", ".idea", ".devcontainer", ".husky", ".claude",
                  ".codex")
PROTECTED_NAMES = (".envrc", ".env", ".gitattributes", ".gitmodules", ".pre-commit-config.yaml",
                   ".mise.toml", "mise.toml",
                   *(name for name in STARTUP_FILES if "/" not in name))


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


def workspace_protected(path: Path, workspace: Path) -> str | None:
    """Why writing `path` (resolved, in the workspace) always needs the user's yes, or None."""
    if not _within(path, workspace) or path == workspace:
        return None
    # Casefolded: on macOS's (and Windows') file systems `.GIT/config` is `.git/config`.
    parts = path.relative_to(workspace).parts
    dirs = {d.casefold() for d in PROTECTED_DIRS}
    names = dirs | {n.casefold() for n in PROTECTED_NAMES}
    hit = next((p for p in parts[:-1] if p.casefold() in dirs), None) or (
        parts[-1] if parts[-1].casefold() in names else None)
    if hit is None:
        return None
    return f"{path.relative_to(workspace)} is protected: {hit} can run code outside any approval"


def _protected_inode(st: os.stat_result) -> str | None:
    """For a file with several hard links: the secret or start-up file it is, if any."""
    for home in homes():
        for rel in SECRETS + STARTUP_FILES:
            root = home / rel
            candidates = [root] if not root.is_dir() else \
                [Path(d) / f for d, _, fs in itertools.islice(os.walk(root), 50) for f in fs]
            for c in candidates[:500]:
                try:
                    other = os.stat(c)
                except OSError:
                    continue
                if (other.st_dev, other.st_ino) == (st.st_dev, st.st_ino):
                    return f"it is a hard link to {c}, which " + (
                        "holds secrets" if rel in SECRETS else "is a shell start-up file")
    return None


def resolve(workspace: Path, raw: str, write: bool = False) -> Path:
    """`raw` (relative to the workspace, absolute or `~/...`) as a real path inside it.

    Symlinks are followed before the check, so a link pointing out of the workspace is refused;
    so is a hard link to a secret or start-up file.
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
    try:
        st = os.stat(real)
    except OSError:
        return real
    if not (stat.S_ISREG(st.st_mode) or stat.S_ISDIR(st.st_mode)):
        # Opening a FIFO blocks for ever, a device reads for ever: never opened, not even for
        # the preview of a call that will be denied.
        raise Refused(f"{raw} is a {_kind(st.st_mode)}, not a regular file")
    if st.st_nlink > 1 and stat.S_ISREG(st.st_mode):
        why = _protected_inode(st)
        if why:
            raise Refused(f"{raw}: {why}")
    return real


def _kind(mode: int) -> str:
    return ("FIFO (named pipe)" if stat.S_ISFIFO(mode) else "socket" if stat.S_ISSOCK(mode)
            else "device" if stat.S_ISCHR(mode) or stat.S_ISBLK(mode) else "special file")


def command_protected(command: str, workspace: Path) -> str | None:
    """Why a command always asks: it writes a protected workspace file (or `git config`), or
    names one at all (`python3 -c "open('.git/config', 'w')"`: the parser cannot tell)."""
    try:
        segments = split_command(command)
    except Unparsable:
        segments = []
    cwd: Path | None = workspace
    for seg in segments:
        for words in _programs(_brace_words(seg)) or [[]]:
            name = os.path.basename(words[0]) if words else ""
            if name == "git" and _git_writes_config(words[1:]):
                return "`git config` and `git -c` change what git runs: protected"
            for target in seg.writes() + _writer_targets(name, words):
                p = _expand(target, cwd)
                why = p is not None and workspace_protected(p, workspace)
                if why:
                    return why
        if seg.words and seg.words[0] in ("cd", "pushd"):
            cwd = _cd(seg.words[1:], cwd)
    m = _MENTION.search(command)
    return f"the command names {m.group(2)}, a protected file that can run code" if m else None


_MENTION = re.compile(r"(^|[\s/'\"=<>;|&(`])(" + "|".join(
    re.escape(n) for n in PROTECTED_DIRS + PROTECTED_NAMES) + r")(/|[\s'\";|&)`]|$)",
    re.IGNORECASE)


def _git_writes_config(args: list[str]) -> bool:
    i = 0
    while i < len(args) and args[i].startswith("-"):
        if args[i] == "-c" or args[i].startswith("--config-env"):
            return True
        i += 2 if args[i] in ("-C", "--git-dir", "--work-tree", "--namespace") else 1
    if i >= len(args) or args[i] != "config":
        return False
    rest = args[i + 1:]
    return not any(a in ("--get", "--get-all", "--get-regexp", "-l", "--list", "get", "list")
                   for a in rest)


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
    known: dict[str, str] = {}  # NAME=literal assignments earlier in the command (`d=/; rm -r $d`)
    for seg in segments:
        seg = _substituted(seg, known)
        _check_segment(seg, cwd, workspace)
        if len(seg.words) == 1 and re.fullmatch(r"[A-Za-z_]\w*=.*", seg.words[0]):
            name, value = seg.words[0].split("=", 1)
            known[name] = value
        if seg.words and seg.words[0] in ("cd", "pushd"):
            cwd = _cd(seg.words[1:], cwd)


def _substituted(seg: Segment, known: dict[str, str]) -> Segment:
    if not known:
        return seg

    def sub(word: str) -> str:
        return re.sub(r"\$\{?([A-Za-z_]\w*)\}?",
                      lambda m: known.get(m.group(1), m.group(0)), word)
    return Segment([sub(w) for w in seg.words], [(op, sub(t)) for op, t in seg.redirects],
                   [sub(w) for w in seg.raw], seg.opaque)


def _brace_words(seg: Segment) -> list[str]:
    """The words with bash's brace expansion done where the source is unquoted (`{*,}`)."""
    out: list[str] = []
    for i, word in enumerate(seg.words):
        raw = seg.raw[i] if i < len(seg.raw) else word
        if "{" in raw and not re.search(r"[\\'\"$`]", raw):
            out += [w for w in _braces(raw)[:256] if w]
        else:
            out.append(word)
    return out


def _braces(word: str) -> list[str]:
    """`a{b,c}d` → [abd, acd]; `{1..3}` → [1, 2, 3]; nested groups too."""
    depth, start = 0, -1
    for i, c in enumerate(word):
        if c == "{":
            if depth == 0:
                start = i
            depth += 1
        elif c == "}" and depth:
            depth -= 1
            if depth == 0:
                inner, head, tail = word[start + 1:i], word[:start], word[i + 1:]
                parts, d, last = [], 0, 0
                for j, ch in enumerate(inner):
                    d += ch == "{"
                    d -= ch == "}"
                    if ch == "," and d == 0:
                        parts.append(inner[last:j])
                        last = j + 1
                parts.append(inner[last:])
                m = re.fullmatch(r"(-?\d+)\.\.(-?\d+)", inner)
                if m:
                    a, b = int(m.group(1)), int(m.group(2))
                    parts = [str(n) for n in range(a, b + (1 if b >= a else -1),
                                                   1 if b >= a else -1)][:256]
                elif len(parts) < 2:
                    return [head + "{" + inner + "}" + w for w in _braces(tail)]
                return [w for p in parts for w in _braces(head + p + tail)][:256]
    return [word]


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
    elif word.startswith("~"):
        user = _user_home(word)
        if user is None:
            return None
        word = user + word[len(word.split("/", 1)[0]):]
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


def _user_home(word: str) -> str | None:
    """`~name/...`: name's home directory, or None."""
    name = word[1:].split("/", 1)[0]
    try:
        return pwd.getpwnam(name).pw_dir
    except (KeyError, OSError):
        return None


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


def _programs(words: list[str]) -> list[list[str]]:
    """Every reading of `words` as PROGRAM ARGS: past the assignments and wrappers, and, as a
    wrapper's options may take values (`sudo -u root`, `flock FILE`, `exec -a NAME`), from each
    word after a wrapper too."""
    first = _program(words)
    out = [first] if first else []
    wrapped = False
    for i, w in enumerate(words):
        wrapped |= os.path.basename(w) in _WRAPPERS
        if wrapped and words[i:] != first:
            out.append(words[i:])
    return out


def _wrapped_string(name: str, args: list[str]) -> str | None:
    """The command string `su -c STR`, `script -qc STR`, `flock F -c STR`, `watch STR`,
    `sudo -i STR` run."""
    if name == "watch" or (name in ("sudo", "doas") and any(
            re.fullmatch(r"-[A-Za-z]*[is][A-Za-z]*|--login|--shell", a) for a in args)):
        # watch and `sudo -i|-s` join their arguments into a command string for a shell.
        rest = list(itertools.dropwhile(lambda a: a.startswith("-") or a.isdigit(), args))
        return " ".join(rest) or None
    for i, a in enumerate(args):
        if a.startswith("--command="):
            return a.split("=", 1)[1]
        if (a == "--command" or re.fullmatch(r"-[A-Za-z]*c", a)) and i + 1 < len(args):
            return args[i + 1]
    return None


def _check_segment(seg: Segment, cwd: Path | None, workspace: Path) -> None:
    all_words = _brace_words(seg)
    for word in all_words + [t for _, t in seg.redirects]:
        _check_mention(word, cwd)
    for words in _programs(all_words) or [[]]:
        _check_program(seg, words, cwd, workspace)


def _check_program(seg: Segment, words: list[str], cwd: Path | None, workspace: Path) -> None:
    name = os.path.basename(words[0]) if words else ""
    if name in _STRING_WRAPPERS:
        inner = _wrapped_string(name, words[1:])
        if inner:
            _check_command(inner, cwd, workspace)
    if tuple(words[:2]) in CREDENTIAL_COMMANDS:
        raise Refused(f"`{' '.join(words[:2])}` reads a credential store")
    if name in _SHELLS and len(words) > 1:
        inner = _shell_command(words[1:]) if name != "eval" else " ".join(words[1:])
        if inner:
            _check_command(inner, cwd, workspace)
    if name == "rm" and _recursive(words[1:]):
        for target in (w for w in words[1:] if not w.startswith("-")):
            _check_deletion(target, cwd, workspace)
    if name == "find":
        _check_find(words[1:], cwd, workspace)
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


def _shell_command(args: list[str]) -> str | None:
    """The command string of `bash -c CMD` (also `-lc`, `-ec`, `-e -c`, `-o x -c`)."""
    i, has_c = 0, False
    while i < len(args) and args[i].startswith(("-", "+")) and args[i] not in ("-", "--"):
        if args[i] in ("-o", "+o", "-O", "+O"):
            i += 1
        elif not args[i].startswith("--") and "c" in args[i][1:]:
            has_c = True
        i += 1
    if i < len(args) and args[i] == "--":
        i += 1
    return args[i] if has_c and i < len(args) else None


def _check_find(args: list[str], cwd: Path | None, workspace: Path) -> None:
    """find's start points: `-delete` deletes them, `-exec CMD {} +` runs CMD on them."""
    starts = []
    for a in args:
        if a.startswith("-") or a in ("(", "!", ")"):
            break
        starts.append(a)
    starts = starts or ["."]
    if "-delete" in args:
        for start in starts:
            _check_deletion(start, cwd, workspace)
    for i, a in enumerate(args):
        if a in ("-exec", "-execdir", "-ok", "-okdir"):
            inner = list(itertools.takewhile(lambda w: w not in (";", "+"), args[i + 1:]))
            for start in starts:
                words = [w.replace("{}", start) for w in inner]
                _check_segment(Segment(words, [], words), cwd, workspace)


def _writer_targets(name: str, words: list[str]) -> list[str]:
    """Files well-known writers write: tee's, touch's, cp/mv's destination (or -t), dd's of=,
    sed -i's files and `w` commands, tar's -C directory, git's -C directory."""
    args = [w for w in words[1:] if not w.startswith("-")]
    if name in ("tee", "touch", "mkdir", "truncate", "rm", "rmdir", "shred", "chmod", "chown"):
        return args[1:] if name in ("chmod", "chown") else args
    if name in ("cp", "mv", "ln", "install", "rsync"):
        return _option_values(words[1:], ("-t",), ("--target-directory",)) + (
            [args[-1]] if len(args) >= 2 else [])
    if name == "dd":
        return [w[3:] for w in words[1:] if w.startswith("of=")]
    if name == "sed":
        out = [m.strip() for w in words[1:] for m in re.findall(r"[wW]\s+([^;\n}]+)", w)]
        if any(re.fullmatch(r"-[a-zA-Z]*i.*|--in-place(=.*)?", w) for w in words[1:]):
            out += args[1:]
        return out
    if name in ("tar", "bsdtar"):
        return _option_values(words[1:], ("-C",), ("--directory",))
    if name == "git":
        i, out = 1, []
        while i < len(words) and words[i].startswith("-"):
            if words[i] in ("-C", "--git-dir", "--work-tree") and i + 1 < len(words):
                out.append(words[i + 1])
                i += 1
            elif words[i].startswith(("--git-dir=", "--work-tree=")):
                out.append(words[i].split("=", 1)[1])
            i += 1
        reads = i < len(words) and words[i] in GIT_READ and "-c" not in words[1:i]
        return [] if reads else out  # `git -C ../other log` only reads
    return []


def _option_values(args: list[str], short: tuple[str, ...], long: tuple[str, ...]) -> list[str]:
    """The values of `-t DIR`, `-tDIR`, `--target-directory=DIR`, `--target-directory DIR`."""
    out = []
    for i, a in enumerate(args):
        nxt = args[i + 1] if i + 1 < len(args) else None
        if (a in short or a in long) and nxt is not None:
            out.append(nxt)
        elif any(a.startswith(o) and len(a) > len(o) and not a.startswith("--") for o in short):
            out.append(a[2:])
        elif any(a.startswith(o + "=") for o in long):
            out.append(a.split("=", 1)[1])
    return out


def _recursive(args: list[str]) -> bool:
    return any(a in ("--recursive", "-r", "-R") or re.fullmatch(r"-[a-zA-Z]*[rR][a-zA-Z]*", a)
               for a in args)


def _check_deletion(target: str, cwd: Path | None, workspace: Path) -> None:
    if re.fullmatch(r"~[A-Za-z_][\w.-]*/?", target) and _user_home(target):
        raise Refused(f"`rm -r {target}` deletes the home directory {_user_home(target)}")
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
