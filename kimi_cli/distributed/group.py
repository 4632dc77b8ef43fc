"""The process group mlx.launch started: whether there is one, its backend, joining it with a
bounded wait, and keeping the ranks other than 0 silent (only rank 0 talks to the user)."""

from __future__ import annotations

import faulthandler
import os
import signal
import subprocess
import sys

from .. import config
from ..errors import KimiError


class PeerLost(KimiError):
    """Another rank of the group stopped or cannot be reached: this run cannot go on."""

    def __init__(self, *args) -> None:
        super().__init__(*args)
        global _ending
        _ending = True  # one message: mlx.launch's SIGTERM must not interrupt this one


_ending = False


def env_rank() -> int:
    """This process's rank as mlx.launch set it (0 when not launched)."""
    try:
        return int(os.environ.get("MLX_RANK", "0"))
    except ValueError:
        return 0


def backend() -> str | None:
    """The backend mlx.launch prepared: jaccl (RDMA over Thunderbolt 5) or ring (TCP)."""
    if os.environ.get("MLX_IBV_DEVICES") or os.environ.get("MLX_JACCL_COORDINATOR"):
        return "jaccl"
    hostfile = os.environ.get("MLX_HOSTFILE")
    if hostfile and os.path.isfile(hostfile) and os.path.getsize(hostfile) > 2:
        return "ring"  # `mlx.launch -n 1` writes an empty hostfile: no group
    return None


def launched() -> bool:
    """Whether this process is one rank of a group of several (started by mlx.launch)."""
    return "MLX_RANK" in os.environ and backend() is not None


def is_follower() -> bool:
    return launched() and env_rank() != 0


class Watchdog:
    """Ends this process with `message` and exit 1 when armed for more than `seconds`. MLX
    blocks in connect, send and recv holding the GIL, so no Python thread could notice: the
    timer is faulthandler's (C), its dump goes into a pipe, and a tiny child process turns it
    into the message (and exits with this process otherwise)."""

    def __init__(self, seconds: float, message: str):
        self.seconds = seconds
        read_end, write_end = os.pipe()
        self.reporter = subprocess.Popen(
            [sys.executable, "-S", "-c", "import os,signal,sys\n"
             "signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the rank's, not ours\n"
             "if os.read(0, 1): os.write(2, sys.argv[1].encode())", message], stdin=read_end, stderr=sys.__stderr__,
            stdout=subprocess.DEVNULL, close_fds=True)
        os.close(read_end)
        self.pipe = os.fdopen(write_end, "w")

    def arm(self) -> None:
        faulthandler.dump_traceback_later(self.seconds, exit=True, file=self.pipe)

    def disarm(self) -> None:
        faulthandler.cancel_dump_traceback_later()

    def close(self) -> None:
        self.disarm()
        self.pipe.close()
        self.reporter.wait()


def _timeout(var: str, default: float) -> float:
    try:
        return float(os.environ.get(var) or default)
    except ValueError:
        return default


def step_watchdog() -> Watchdog:
    """Rank 0's guard on each pipeline step: a peer that stops answering (a link down, a
    machine stuck) ends the run after DIST_STEP_TIMEOUT seconds."""
    seconds = _timeout("KIMI_DIST_STEP_TIMEOUT", config.DIST_STEP_TIMEOUT)
    return Watchdog(seconds, f"kimi: error: the other ranks stopped answering (no reply within "
                             f"{seconds:.0f} s: a link down or a machine stuck?); this run "
                             "cannot go on\n")


def init_group():
    """Join the group; a peer that never answers ends this rank with one message and exit 1
    after DIST_CONNECT_TIMEOUT seconds."""
    import mlx.core as mx

    name = backend()
    rank = env_rank()
    seconds = _timeout("KIMI_DIST_CONNECT_TIMEOUT", config.DIST_CONNECT_TIMEOUT)
    where = os.environ.get("MLX_HOSTFILE") or os.environ.get("MLX_JACCL_COORDINATOR") or ""
    watch = Watchdog(seconds, (
        f"kimi: error: rank {rank}: the other ranks did not answer within {seconds:.0f} s "
        f"({name} backend{', ' + _peers(where) if name == 'ring' else ''}); check that every "
        "host runs the same command and can reach the others\n"))
    watch.arm()
    try:
        group = mx.distributed.init(strict=True, backend=name)
    except RuntimeError as e:
        raise PeerLost(f"rank {rank}: cannot join the group ({name} backend): {e}") from None
    finally:
        watch.close()
    return group


def _peers(hostfile: str) -> str:
    try:
        import json

        hosts = json.loads(open(hostfile).read())
        return "peers " + ", ".join(a for h in hosts for a in h)
    except (OSError, ValueError, TypeError):
        return f"hostfile {hostfile}"


class _ErrorsOnly:
    """stderr of a rank other than 0: its own error lines pass, named by rank; with --debug
    everything passes (tracebacks); the rest is dropped."""

    PREFIXES = ("kimi: error: ", "kimi: internal error: ")

    def __init__(self, stream, rank: int, debug: bool):
        self.stream, self.rank, self.debug, self.pending = stream, rank, debug, ""

    def write(self, text: str) -> int:
        self.pending += text
        *lines, self.pending = self.pending.split("\n")
        for line in lines:
            prefix = next((p for p in self.PREFIXES if line.startswith(p)), None)
            if prefix and not line.startswith(f"{prefix}rank "):
                line = f"{prefix}rank {self.rank}: {line[len(prefix):]}"
            if prefix or self.debug:
                self.stream.write(line + "\n")
        self.stream.flush()
        return len(text)

    def flush(self) -> None:
        self.stream.flush()

    def isatty(self) -> bool:
        return False

    def fileno(self) -> int:
        return self.stream.fileno()


def quiet_if_follower() -> None:
    """Ranks other than 0 print nothing for the user (rank 0 does), except their own errors;
    their stdin is never read (mlx.launch's pipe to every rank never closes)."""
    if not is_follower():
        return
    devnull = open(os.devnull, "w")
    sys.stdout = devnull
    sys.stderr = _ErrorsOnly(sys.__stderr__, env_rank(), "--debug" in sys.argv)
    sys.stdin = open(os.devnull)


def stop_on_sigterm() -> None:
    """mlx.launch ends the surviving ranks with SIGTERM when one exits with an error: rank 0
    says so (one line, exit 1) instead of vanishing; the others leave quietly (rank 0 or the
    rank that failed has said what went wrong)."""

    message = "kimi: error: another rank of the group stopped, and mlx.launch ended this run"

    def handler(signum, frame):
        if _ending:  # this rank is already saying why it stops, and exiting
            return
        if env_rank() != 0:
            os._exit(1)
        raise PeerLost(message.removeprefix("kimi: error: "))

    signal.signal(signal.SIGTERM, handler)
    _sigterm_backstop(message + "\n" if env_rank() == 0 else "", config.DIST_SIGTERM_GRACE)


# The backstop's child: after faulthandler's SIGTERM dump arrives, wait `grace` seconds for the
# pipe to close (this process ended through its Python handler), else say the message and kill.
_BACKSTOP = """import os, select, signal, sys, time
signal.signal(signal.SIGINT, signal.SIG_IGN)
if os.read(0, 1):
    end = time.monotonic() + float(sys.argv[2])
    while (left := end - time.monotonic()) > 0:
        if select.select([0], [], [], left)[0] and not os.read(0, 65536):
            sys.exit(0)
    os.write(2, sys.argv[1].encode())
    os.kill(int(sys.argv[3]), signal.SIGKILL)
"""


def _sigterm_backstop(message: str, grace: float) -> None:
    """SIGTERM while MLX blocks in C (a recv from a peer that died can wait forever, holding
    the GIL) never reaches the Python handler. faulthandler's C handler still runs: it writes
    into a pipe, then chains to the Python handler; a tiny child process (its own session, so
    mlx.launch's signals spare it) gives that handler `grace` seconds, then says `message` and
    kills this process, so no rank outlives its run."""
    read_end, write_end = os.pipe()
    subprocess.Popen([sys.executable, "-S", "-c", _BACKSTOP, message, str(grace),
                      str(os.getpid())], stdin=read_end, stderr=sys.__stderr__,
                     stdout=subprocess.DEVNULL, close_fds=True, start_new_session=True)
    os.close(read_end)
    global _backstop_pipe
    _backstop_pipe = os.fdopen(write_end, "w")  # faulthandler needs it open for the run
    faulthandler.register(signal.SIGTERM, file=_backstop_pipe, all_threads=False, chain=True)


_backstop_pipe = None
