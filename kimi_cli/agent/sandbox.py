"""What confines the `shell` tool: bubblewrap on Linux, sandbox-exec on macOS, else nothing.

Both show commands the workspace (read-write), the system read-only, an empty private home and
/tmp, the paths `--sandbox-allow` adds, and no network unless `--allow-network`.
"""

from __future__ import annotations

import functools
import os
import shutil
import stat
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from .. import config
from .safety import PROTECTED_DIRS, PROTECTED_NAMES, SECRETS, STARTUP_FILES, homes

BWRAP_INSTALL = "install bubblewrap (`apt install bubblewrap` or `dnf install bubblewrap`)"
# The uid commands have inside the Linux sandbox when kimi runs as root: nobody.
NOBODY = 65534


@dataclass(frozen=True)
class Grant:
    """A path `--sandbox-allow` shows inside the sandbox, read-only unless `writable`."""

    path: Path
    writable: bool = False


@dataclass(frozen=True)
class Sandbox:
    kind: str  # "bubblewrap" | "sandbox-exec" | "none"
    allow_network: bool = False
    grants: tuple[Grant, ...] = ()
    # --env: NAME (kimi's value) or NAME=VALUE, added to what commands get of the environment.
    env: tuple[str, ...] = ()
    bypass: bool = False  # --dangerously-bypass-approvals-and-sandbox

    def describe(self) -> str:
        if self.bypass:
            return ("NONE: --dangerously-bypass-approvals-and-sandbox (commands run unasked "
                    "and unconfined)")
        if self.kind == "none":
            return "none (commands run unsandboxed; approval is the only protection)"
        net = "network allowed" if self.allow_network else "no network"
        extra = f", {len(self.grants)} allowed path(s)" if self.grants else ""
        return f"{self.kind} (sees only the workspace and the system, {net}{extra})"

    def wrap(self, argv: list[str], workspace: Path, seccomp_fd: int | None = None) -> list[str]:
        """`argv` as run inside this sandbox, with `workspace` writable; on Linux
        `seccomp_fd` is a descriptor kimi passes, holding seccomp.program()."""
        if self.kind == "bubblewrap":
            return bwrap_argv(argv, workspace, self.allow_network, self.grants, seccomp_fd)
        if self.kind == "sandbox-exec":
            profile = seatbelt_profile(workspace, self.allow_network, self.grants)
            return ["sandbox-exec", "-p", profile, *argv]
        return argv


def choose(allow_network: bool, grants: tuple[Grant, ...] = (), env: tuple[str, ...] = (),
           platform: str | None = None, disabled: bool = False, bypass: bool = False) -> Sandbox:
    """The best sandbox this machine has (none when `disabled`, i.e. --no-sandbox)."""
    platform = platform or sys.platform
    kind = "none"
    if not disabled:
        if platform == "darwin" and shutil.which("sandbox-exec"):
            kind = "sandbox-exec"
        elif platform.startswith("linux") and bwrap_works():
            kind = "bubblewrap"
    return Sandbox(kind, allow_network, grants, env, bypass)


def why_none(platform: str | None = None) -> str:
    """Why there is no sandbox here, and what to do about it."""
    platform = platform or sys.platform
    if platform == "darwin":
        return "sandbox-exec is missing (it ships with macOS: is /usr/bin on PATH?)"
    if platform.startswith("linux"):
        if shutil.which("bwrap") is None:
            return f"bubblewrap is not installed: {BWRAP_INSTALL}"
        return ("bubblewrap cannot create its namespaces here (a container without user "
                "namespaces?)")
    return f"kimi has no sandbox for {platform}"


def parse_grant(spec: str) -> Grant:
    """`PATH`, `PATH:ro` or `PATH:rw` (a --sandbox-allow value) as an existing real path."""
    raw, writable = spec, False
    for suffix, rw in ((":ro", False), (":rw", True)):
        if spec.endswith(suffix):
            raw, writable = spec[: -len(suffix)], rw
    path = Path(os.path.realpath(os.path.expanduser(raw)))
    if not raw or not path.exists():
        raise ValueError(f"{raw or spec!r}: no such file or directory")
    for home in homes():
        if _within(home, path):
            raise ValueError(f"{raw}: that is (or contains) the home directory {home}; allow "
                             "only the directories commands need, e.g. ~/.local:ro")
    return Grant(path, writable)


def workspace_problem(workspace: Path) -> str | None:
    """Why `workspace` (a real path) may not be the agent's workspace: it is a home, contains
    one, or contains or lies in a home's secrets or start-up files; None if it is fine."""
    for home in homes():
        if _within(home, workspace):
            return (f"{workspace} is or contains the home directory {home}, with its keys, "
                    "credentials and shell start-up files: use a project directory")
        for rel in SECRETS + STARTUP_FILES:
            p = home / rel
            if _within(workspace, p):
                return f"{workspace} is inside ~/{rel}, which holds secrets or start-up files"
            if _within(p, workspace) and os.path.lexists(p):
                return (f"{workspace} contains ~/{rel} (secrets or start-up files): use a "
                        "directory without it")
    return None


def _within(path: Path, root: Path) -> bool:
    p, r = str(path), str(root)
    return p == r or p.startswith(r.rstrip("/") + "/")


# Linux: bubblewrap


@functools.lru_cache(maxsize=1)
def bwrap_works() -> bool:
    """bwrap is installed and can create the sandbox's namespaces here (containers may not)."""
    exe = shutil.which("bwrap")
    if exe is None:
        return False
    try:
        probe = subprocess.run(bwrap_argv(["true"], Path(tempfile.gettempdir()), False, ()),
                               capture_output=True, timeout=10, stdin=subprocess.DEVNULL)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return probe.returncode == 0


@functools.lru_cache(maxsize=1)
def _bwrap_has(option: str) -> bool:
    try:
        help_text = subprocess.run(["bwrap", "--help"], capture_output=True, text=True,
                                   timeout=10).stdout
    except (OSError, subprocess.TimeoutExpired):
        return False
    return option in help_text


@functools.lru_cache(maxsize=4)
def unreadable(root: str) -> tuple[tuple[str, bool], ...]:
    """(path, is a directory) for what under `root` other users may not read (/etc/shadow,
    /etc/ssl/private, host keys...): the sandbox hides them even from root."""
    out: list[tuple[str, bool]] = []
    for top, dirs, files in os.walk(root):
        for name in dirs + files:
            path = os.path.join(top, name)
            try:
                st = os.lstat(path)
            except OSError:
                continue
            if stat.S_ISLNK(st.st_mode) or st.st_mode & stat.S_IROTH:
                continue
            out.append((path, stat.S_ISDIR(st.st_mode)))
        hidden = {p for p, _ in out}
        dirs[:] = [d for d in dirs if os.path.join(top, d) not in hidden]
    return tuple(out)


def bwrap_argv(argv: list[str], workspace: Path, allow_network: bool,
               grants: tuple[Grant, ...] = (), seccomp_fd: int | None = None) -> list[str]:
    # A user namespace with no capabilities: root outside is nobody inside and cannot remount,
    # unmount or read root-only files; no nested namespaces to win capabilities back.
    out = ["bwrap", "--unshare-user"]
    if os.geteuid() == 0:
        out += ["--uid", str(NOBODY), "--gid", str(NOBODY)]
    if _bwrap_has("--disable-userns"):
        out.append("--disable-userns")
    out += ["--cap-drop", "ALL", "--new-session", "--die-with-parent", "--unshare-pid",
            "--unshare-ipc", "--unshare-uts", "--unshare-cgroup-try"]
    if not allow_network:
        out.append("--unshare-net")
    for path in config.SANDBOX_SYSTEM_PATHS:
        if os.path.islink(path):
            out += ["--symlink", os.readlink(path), path]
        elif os.path.isdir(path):
            out += ["--ro-bind", path, path]
    for path, is_dir in unreadable("/etc") if os.path.isdir("/etc") else ():
        out += ["--tmpfs", path] if is_dir else ["--ro-bind", "/dev/null", path]
    out += ["--dev", "/dev", "--proc", "/proc", "--tmpfs", "/tmp", "--tmpfs", "/var/tmp"]
    for home in homes():
        out += ["--tmpfs", str(home)]
    # After the tmpfs mounts, so a workspace or an allowed path under /tmp or home is the real one;
    # a grant inside the workspace comes after it, so `--sandbox-allow WS/.git:rw` can reopen it.
    inside = [g for g in grants if _within(g.path, workspace)]
    for g in [g for g in grants if g not in inside]:
        out += ["--bind" if g.writable else "--ro-bind", str(g.path), str(g.path)]
    out += ["--bind", str(workspace), str(workspace)]
    for path in protected_entries(workspace):
        out += ["--ro-bind", path, path]
    for g in inside:
        out += ["--bind" if g.writable else "--ro-bind", str(g.path), str(g.path)]
    if seccomp_fd is not None:
        out += ["--seccomp", str(seccomp_fd)]
    out += ["--chdir", str(workspace)]
    return [*out, "--", *argv]


def present(workspace: Path) -> set[str]:
    """The protected names (safety.PROTECTED_*) at the top of the workspace now."""
    return {n for n in PROTECTED_DIRS + PROTECTED_NAMES if os.path.lexists(workspace / n)}


def block_new(workspace: Path, before: set[str]) -> str:
    """Rename the protected entries a sandboxed command created (a new `.git` with hooks, an
    `.envrc`: they would run outside it) to NAME.kimi-blocked; a note saying so, or ""."""
    moved = []
    for name in sorted(present(workspace) - before):
        target = workspace / f"{name}.kimi-blocked"
        n = 1
        while os.path.lexists(target):
            n += 1
            target = workspace / f"{name}.kimi-blocked-{n}"
        try:
            os.rename(workspace / name, target)
        except OSError as e:
            moved.append(f"{name} (could not rename it: {e.strerror})")
            continue
        moved.append(f"{name} → {target.name}")
    if not moved:
        return ""
    return ("\n[kimi: the command created " + ", ".join(moved) + ": files that run code outside "
            "the sandbox (on `git status`, `cd`, opening the folder) are not made from inside "
            "it; the user can create them, or rename them back]")


def protected_entries(workspace: Path) -> list[str]:
    """The workspace's files that run code outside the sandbox (`.git`: on your next `git
    status`; `.envrc`, `.vscode`...): read-only inside it, a mount point it cannot rename."""
    out = []
    for name in PROTECTED_DIRS + PROTECTED_NAMES:
        path = workspace / name
        if os.path.lexists(path) and _within(Path(os.path.realpath(path)), workspace):
            out.append(str(path))
    return out


# macOS: sandbox-exec (Seatbelt). More specific rules win, so each allow below carves a hole in
# the broader deny before it.


def seatbelt_profile(workspace: Path, allow_network: bool,
                     grants: tuple[Grant, ...] = ()) -> str:
    """A Seatbelt profile with the Linux sandbox's policy, as far as Seatbelt can say it."""

    def q(p: Path | str) -> str:
        return '"' + str(p).replace("\\", "\\\\").replace('"', '\\"') + '"'

    readable = [workspace, *(g.path for g in grants)]
    writable = [workspace, *(g.path for g in grants if g.writable)]
    lines = ["(version 1)", "(allow default)",
             # The home and other users' homes: nothing but the workspace and allowed paths.
             "(deny file-read* file-write* (subpath \"/Users\"))",
             *(f"(deny file-read* file-write* (subpath {q(h)}))" for h in homes()),
             "(allow file-read* " + " ".join(f"(subpath {q(p)})" for p in readable) + ")",
             # Their parents may be looked at (getcwd, realpath), not listed or read.
             "(allow file-read-metadata " + " ".join(
                 f"(literal {q(a)})" for a in sorted({str(a) for p in readable
                                                     for a in p.parents})) + ")",
             "(deny file-write*)",
             "(allow file-write* " + " ".join(f"(subpath {q(p)})" for p in writable),
             '    (subpath "/private/tmp") (subpath "/private/var/folders")',
             '    (literal "/dev/null") (subpath "/dev/fd"))',
             *(f"(deny file-read* file-write* (subpath {q(p)}))"
               for p in ("/etc/sudoers", "/etc/sudoers.d", "/etc/master.passwd",
                         "/private/etc/sudoers", "/private/etc/sudoers.d",
                         "/private/etc/master.passwd", "/private/var/db/sudo"))]
    if allow_network:
        # Network yes, but no host Unix sockets (ssh-agent, docker...) except DNS's.
        lines += ["(deny network-outbound (remote unix-socket))",
                  "(allow network-outbound (remote unix-socket (path-literal "
                  '"/private/var/run/mDNSResponder")))']
    else:
        lines.append("(deny network*)")
    return "\n".join(lines)
