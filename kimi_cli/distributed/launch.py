"""`kimi run/chat/bench --hostfile hosts.json`: start the same command on every host through
mlx.launch (MLX's own launcher), and exit with rank 0's exit code."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

from ..errors import UsageError

# mlx.launch always exits 0; it reports each rank's end on stderr as below (mlx 0.32).
_NODE_END = re.compile(r"Node with rank (\d+) (?:exited with code (-?\d+)|was killed)")
_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_RANK = re.compile(r"(?<=^kimi: error: )rank \d+: ")


def check_hostfile(path: Path) -> list:
    """The hostfile mlx.launch reads: a JSON list of hosts ({"ssh": ..., "ips": [...]})."""
    try:
        hosts = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise UsageError(f"--hostfile: {path}: no such file") from None
    except (OSError, ValueError) as e:
        raise UsageError(f"--hostfile: {path}: not a JSON hostfile ({e})") from None
    if isinstance(hosts, dict):  # mlx.distributed_config's newer shape: {"hosts": [...], ...}
        hosts = hosts.get("hosts")
    if not isinstance(hosts, list) or len(hosts) < 2 or not all(
            isinstance(h, dict) and h.get("ssh") for h in hosts):
        raise UsageError(f"--hostfile: {path}: expected a list of at least two hosts, each "
                         '{"ssh": "host", "ips": ["10.0.0.1"]} (mlx.distributed_config writes '
                         "one)")
    return hosts


def launcher() -> str:
    found = Path(sys.executable).parent / "mlx.launch"
    if found.exists():
        return str(found)
    which = shutil.which("mlx.launch")
    if which is None:
        raise UsageError("--hostfile needs mlx.launch (it comes with mlx); it is not on PATH")
    return which


def strip_hostfile(argv: list[str]) -> list[str]:
    """The command line without its --hostfile option (each rank is one of the hosts)."""
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a == "--hostfile":
            skip = True
        elif not a.startswith("--hostfile="):
            out.append(a)
    return out


def relaunch(hostfile: Path, argv: list[str] | None = None) -> int:
    """Run this kimi command on every host of `hostfile` with mlx.launch; rank 0's exit code
    (1 when another rank failed and rank 0 reported nothing)."""
    check_hostfile(hostfile)
    argv = strip_hostfile(sys.argv[1:] if argv is None else argv)
    kimi = shutil.which(sys.argv[0]) or sys.argv[0]
    cmd = [launcher(), "--hostfile", str(hostfile), "--", str(Path(kimi).resolve()), *argv]
    codes: dict[int, int] = {}
    said: set[str] = set()
    # Its own process group: mlx.launch leaves the ranks behind when it is ended, so the group
    # is how Ctrl-C reaches all of them (as from a terminal) and how none outlives this call.
    p = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True, errors="replace",
                         start_new_session=True)
    interrupted = False
    try:
        while True:
            try:
                for line in p.stderr:
                    m = _NODE_END.search(_ANSI.sub("", line))
                    if m:  # the launcher's own note; kimi's ranks said what went wrong
                        codes[int(m.group(1))] = int(m.group(2)) if m.group(2) else 1
                        continue
                    same = _RANK.sub("", line)
                    if same.startswith("kimi: ") and same in said:
                        continue  # every rank hit the same error (a path missing on all hosts)
                    said.add(same)
                    sys.stderr.write(line)
                    sys.stderr.flush()
                break
            except KeyboardInterrupt:  # Ctrl-C is rank 0's to act on (stop a reply, or exit)
                if interrupted:  # a second one: end them all now
                    _end_group(p.pid, signal.SIGKILL)
                    break
                interrupted = True
                _interrupt_ranks(p.pid)
        p.wait()
    finally:
        _reap_group(p.pid, grace=5.0)  # whatever mlx.launch left running
    if interrupted and 0 not in codes:
        return 130
    if 0 in codes:
        return codes[0] if codes[0] >= 0 else 1
    return 1 if any(codes.values()) else 0


def _end_group(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def _reap_group(pgid: int, grace: float) -> None:
    """Give the group's processes `grace` seconds to end by themselves, then kill the rest."""
    import time

    deadline = time.monotonic() + grace
    while time.monotonic() < deadline:
        try:
            os.killpg(pgid, 0)
        except (ProcessLookupError, PermissionError):
            return
        time.sleep(0.1)
    _end_group(pgid, signal.SIGKILL)


def _interrupt_ranks(pgid: int) -> None:
    """Ctrl-C as a terminal would send it, to the group's processes but mlx.launch itself
    (which would die of it with a traceback and leave the ranks behind)."""
    out = subprocess.run(["ps", "-A", "-o", "pid=,pgid="], capture_output=True, text=True)
    for line in out.stdout.splitlines():
        pid, _, group = line.strip().partition(" ")
        if group.strip() == str(pgid) and pid != str(pgid):
            try:
                os.kill(int(pid), signal.SIGINT)
            except (ProcessLookupError, PermissionError, ValueError):
                pass
