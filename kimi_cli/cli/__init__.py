"""The `kimi` command line: parse flags, then call the library (thin by design).

Exit codes: 0 ok, 1 runtime failure, 2 usage error, 130 interrupted; agent runs also 3 (step
limit) and 4 (repeated tool calls). Errors are one line on stderr; `--debug` shows the traceback.
"""

from __future__ import annotations

import sys

from ..clihelp import usage_message

# The commands register themselves on `app` when imported (the help orders them as a workflow).
from . import bench, chat, convert, download, info, run, serve  # noqa: F401
from .agent import _agent_options  # noqa: F401  (tests build agent options directly)
from .app import EXIT_INTERRUPTED, app
from .common import _err, _quiet_broken_pipe


def main() -> None:
    from typer._click.exceptions import ClickException

    from ..distributed.group import quiet_if_follower

    quiet_if_follower()  # under mlx.launch only rank 0 talks to the user

    try:
        code = app(standalone_mode=False)
    except ClickException as e:  # usage errors: one kimi-style line, not click's box
        ctx = getattr(e, "ctx", None)
        message = usage_message(e, ctx.command_path if ctx else "kimi")
        if message:
            _err(f"kimi: error: {message}")
        sys.exit(e.exit_code)
    except KeyboardInterrupt:
        _err("kimi: interrupted")
        sys.exit(EXIT_INTERRUPTED)
    except BrokenPipeError:
        _quiet_broken_pipe()
        sys.exit(0)
    sys.exit(code if isinstance(code, int) else 0)
