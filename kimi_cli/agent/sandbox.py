"""What confines the `shell` tool: sandbox-exec on macOS, bubblewrap on Linux, else nothing.

Both sandboxes make the file system read-only except the workspace (and a private /tmp), hide
the usual secret directories and cut the network unless `--allow-network`.
"""

from __future__ import annotations

import functools
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from .safety import SECRETS, homes


@dataclass(frozen=True)
class Sandbox:
    kind: str  # "sandbox-exec" | "bubblewrap" | "none"
    allow_network: bool = False

    def describe(self) -> str:
        if self.kind == "none":
            return "none (commands run unsandboxed; approval is the only protection)"
        net = "network allowed" if self.allow_network else "no network"
        return f"{self.kind} (writes only in the workspace, {net})"

    def wrap(self, argv: list[str], workspace: Path) -> list[str]:
        """`argv` as run inside this sandbox, with `workspace` writable."""
        if self.kind == "bubblewrap":
            return bwrap_argv(argv, workspace, self.allow_network)
        if self.kind == "sandbox-exec":
            profile = seatbelt_profile(workspace, self.allow_network)
            return ["sandbox-exec", "-p", profile, *argv]
        return argv


def choose(allow_network: bool, platform: str | None = None) -> Sandbox:
    """The best sandbox this machine has."""
    platform = platform or sys.platform
    if platform == "darwin" and shutil.which("sandbox-exec"):
        return Sandbox("sandbox-exec", allow_network)
    if platform.startswith("linux") and bwrap_works():
        return Sandbox("bubblewrap", allow_network)
    return Sandbox("none", allow_network)


@functools.lru_cache(maxsize=1)
def bwrap_works() -> bool:
    """bwrap is installed and can create its namespaces here (containers may forbid it)."""
    exe = shutil.which("bwrap")
    if exe is None:
        return False
    try:
        probe = subprocess.run(
            [exe, "--ro-bind", "/", "/", "--dev", "/dev", "--unshare-net", "--", "true"],
            capture_output=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return probe.returncode == 0


def _secret_dirs() -> list[Path]:
    return [h / rel for h in homes() for rel in SECRETS if (h / rel).exists()]


def bwrap_argv(argv: list[str], workspace: Path, allow_network: bool) -> list[str]:
    out = ["bwrap", "--ro-bind", "/", "/", "--dev", "/dev", "--proc", "/proc",
           "--tmpfs", "/tmp"]
    for secret in _secret_dirs():
        if secret.is_dir():
            out += ["--tmpfs", str(secret)]
        else:
            out += ["--ro-bind", "/dev/null", str(secret)]
    # After /tmp's tmpfs, so a workspace under /tmp is the real directory, writable.
    out += ["--bind", str(workspace), str(workspace), "--chdir", str(workspace),
            "--unshare-pid", "--die-with-parent"]
    if not allow_network:
        out.append("--unshare-net")
    return [*out, "--", *argv]


def seatbelt_profile(workspace: Path, allow_network: bool) -> str:
    """A sandbox-exec (Seatbelt) profile: everything allowed except writes outside the workspace
    and temp dirs, reading secrets, and (unless allowed) the network."""

    def q(p: Path | str) -> str:
        return '"' + str(p).replace("\\", "\\\\").replace('"', '\\"') + '"'

    lines = ["(version 1)", "(allow default)", "(deny file-write*)",
             f"(allow file-write* (subpath {q(workspace)})",
             '    (subpath "/private/tmp") (subpath "/private/var/folders")',
             '    (literal "/dev/null") (literal "/dev/tty") (subpath "/dev/fd"))']
    for secret in (h / rel for h in homes() for rel in SECRETS):
        lines.append(f"(deny file-read* (subpath {q(secret)}))")
    if not allow_network:
        lines.append("(deny network*)")
    return "\n".join(lines)
