"""What every command needs: one-line errors, the prompt from argv/stdin, the model
resolved and loaded with a spinner, and the exit-code contract (`_errors`).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import typer

from .. import config
from ..errors import KimiError, UsageError
from .app import EXIT_INTERRUPTED
from .options import Color, Think


def _err(msg: str) -> None:
    sys.stderr.write(msg + "\n")
    sys.stderr.flush()


def read_prompt(prompt: str | None, stdin=None) -> str:
    """PROMPT argument, `-` for stdin, or piped stdin (prepended as context to a PROMPT)."""
    stdin = stdin or sys.stdin
    piped = stdin is not None and not stdin.isatty()
    if prompt == "-" or prompt is None:
        if not piped:
            raise UsageError("`-` reads the prompt from stdin, but stdin is a terminal"
                             if prompt else
                             'no prompt: give one (kimi run "...") or pipe it on stdin')
        text = _read_stdin(stdin).rstrip("\r\n")  # the newline ending the input is not prompt
        if not text.strip():
            raise UsageError("the prompt read from stdin is empty")
        return text
    if not prompt.strip():
        raise UsageError('the prompt is empty: give one (kimi run "...") or pipe it on stdin')
    if piped and _context_waiting(stdin):
        context = _read_stdin(stdin)
        if context.strip():
            return f"{context.rstrip()}\n\n{prompt}"
    return prompt


def _read_stdin(stdin) -> str:
    """All of stdin; under mlx.launch, whose pipe to each rank never closes, what arrives
    until it has been quiet for STDIN_CONTEXT_WAIT (there is no EOF to wait for)."""
    import select

    from ..distributed.group import launched

    if not launched():
        return stdin.read()
    fd, chunks = stdin.fileno(), []
    while select.select([fd], [], [], config.STDIN_CONTEXT_WAIT)[0]:
        chunk = os.read(fd, 1 << 16)
        if not chunk:
            break
        chunks.append(chunk)
    return b"".join(chunks).decode("utf-8", errors="replace")


def _context_waiting(stdin) -> bool:
    """Whether a non-terminal stdin next to a PROMPT is context to read: a regular file always;
    a pipe, socket or device only if it delivers data or EOF within STDIN_CONTEXT_WAIT, so a
    pipe nobody writes to (`sleep 30 | kimi run hi`, every rank under mlx.launch) is ignored."""
    import select
    import stat

    try:
        fd = stdin.fileno()
        if stat.S_ISREG(os.fstat(fd).st_mode):
            return True
        ready, _, _ = select.select([fd], [], [], config.STDIN_CONTEXT_WAIT)
    except (AttributeError, OSError, ValueError):  # no descriptor (a test's StringIO): read it
        return True
    return bool(ready)


def resolve_model(spec: str | None) -> str:
    """The model to use: --model, $KIMI_MODEL, the release in the HF cache, or a clear error."""
    spec = spec or os.environ.get("KIMI_MODEL")
    if spec:
        return spec
    from ..checkpoint.reader import hf_cache_snapshot

    if hf_cache_snapshot(config.DEFAULT_REPO) is not None:
        return config.DEFAULT_REPO
    raise KimiError(
        f"no model found: {config.DEFAULT_REPO} is not in the Hugging Face cache. "
        f"Download it with `kimi download` (594 GB), pass --model DIR, "
        f'or try the built-in demo: kimi run --model demo "Hello"'
    )


def model_dir(spec: str, quiet: bool, tokens_note: bool = False):
    """A local directory for --model: `demo` (built once), a directory or a cached Hub id.
    `tokens_note`: say that the demo stops at DEMO_MAX_TOKENS (no -n was given)."""
    from ..checkpoint.demo import DEMO_NAME, ensure_demo_model
    from ..checkpoint.reader import resolve_model_path

    if spec == DEMO_NAME:
        if not quiet:
            stop = (f"; it stops after {config.DEMO_MAX_TOKENS} tokens unless -n says otherwise"
                    if tokens_note else "")
            _err("kimi: using the built-in demo model: random weights, so the text is gibberish "
                 f"(it shows the whole pipeline working without the 594 GB download){stop}")
        return ensure_demo_model(progress=None if quiet else _err)
    return resolve_model_path(spec)


def _distributed(hostfile: Path | None, split: str | None) -> None:
    """--hostfile: this command again on every host, through mlx.launch (exits with rank 0's
    code). --split: how the ranks of the group share the layers (KIMI_SPLIT for the loader)."""
    if hostfile is not None:
        from ..distributed.launch import relaunch

        raise typer.Exit(relaunch(hostfile))
    if split is not None:
        import re

        from ..distributed.group import launched

        if not launched():
            raise UsageError("--split needs several machines: give --hostfile, or start kimi "
                             "with mlx.launch")
        if not re.fullmatch(r"\s*(auto|\d+(\s*,\s*\d+)*)\s*", split, re.IGNORECASE):
            raise UsageError(f"--split: expected auto or layers per rank (e.g. 30,31), got "
                             f"{split!r}")
        os.environ["KIMI_SPLIT"] = split


def _check_expert_cache(value: str | None) -> None:
    """A malformed --expert-cache value is a usage error, found before any model loads."""
    from ..experts.cache import parse_cache_spec

    parse_cache_spec(value)


def _think_mode(think: Think | None, hide_reasoning: bool) -> str:
    """--think, --hide-reasoning (its old spelling), the mode remembered by /think, or show."""
    if hide_reasoning:
        if think not in (None, Think.hide):
            raise UsageError(f"--hide-reasoning and --think {think.value} contradict each other")
        return Think.hide.value
    if think is not None:
        return think.value
    from ..ui.prefs import read_prefs

    remembered = read_prefs().get("think")
    return remembered if remembered in [m.value for m in Think] else Think.show.value


def _print_prompt(text: str) -> None:
    """The rendered prompt, ending in a newline like any text output."""
    sys.stdout.write(text if text.endswith("\n") else text + "\n")
    sys.stdout.flush()


def _read_profile(path: Path) -> dict[int, list[int]]:
    try:
        data = json.loads(path.read_text())
        return {int(k): [int(e) for e in v] for k, v in data.items()}
    except FileNotFoundError:
        raise UsageError(f"--pin-experts: {path}: no such file") from None
    except (ValueError, TypeError, AttributeError):
        raise UsageError(f"--pin-experts: {path}: expected a JSON object "
                         '{"layer": [expert, ...]}') from None


class _errors:
    """One-line errors and the documented exit codes; tracebacks only with --debug."""

    def __init__(self, debug: bool):
        self.debug = debug

    def __enter__(self):
        return self

    def __exit__(self, etype, exc, tb):
        if exc is None:
            return False
        if isinstance(exc, BrokenPipeError):
            _quiet_broken_pipe()
            raise typer.Exit(0)
        if isinstance(exc, KeyboardInterrupt):
            if self.debug:
                return False
            _err("kimi: interrupted")
            raise typer.Exit(EXIT_INTERRUPTED)
        if isinstance(exc, (typer.Exit, typer.Abort, SystemExit)):
            return False
        if self.debug:
            return False
        from mlx_kernels.dispatch import KernelsUnavailable

        if isinstance(exc, KernelsUnavailable):  # KIMI_KERNELS asks for what cannot run here
            exc = UsageError(str(exc))
        if isinstance(exc, KimiError):
            _err(f"kimi: error: {exc}")
            raise typer.Exit(exc.exit_code)
        if isinstance(exc, MemoryError):
            _err("kimi: error: out of memory")
            raise typer.Exit(1)
        if isinstance(exc, OSError) and exc.errno is not None:
            _err(f"kimi: error: {exc.strerror}: {exc.filename or ''}".rstrip(": "))
            raise typer.Exit(1)
        _err(f"kimi: internal error: {type(exc).__name__}: {exc} (rerun with --debug)")
        raise typer.Exit(1)


def _quiet_broken_pipe() -> None:
    # The reader went away (`kimi run ... | head -1`): not an error; silence the final flush.
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except OSError:
        pass


def _duration(seconds: float) -> str:
    s = int(seconds)
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


def _loading(path: Path, quiet: bool, color: Color = Color.auto):
    """A spinner on stderr while the weights load, only when stderr is a terminal."""
    import contextlib

    from ..ui.term import can_go_live, make_console

    if quiet or not can_go_live(sys.stderr):
        return contextlib.nullcontext()
    return make_console(sys.stderr, color.value).status(f"loading {Path(path).name}…",
                                                        spinner="dots")


def _load_model(spec: str, color: Color = Color.auto, expert_cache: str | None = None,
                tokens_note: bool = False):
    """(model, tokenizer, directory) for a --model spec; a spinner while the weights load."""
    from ..model.scripted import PREFIX, load_scripted
    from ..tokenizer import Tokenizer

    if spec.startswith(PREFIX):
        from ..checkpoint.demo import ensure_tokenizer_dir

        tok = Tokenizer.from_dir(ensure_tokenizer_dir())
        return load_scripted(spec, tok), tok, None
    path = model_dir(spec, quiet=False, tokens_note=tokens_note)
    from ..loader import load

    notes: list[str] = []  # printed after the spinner, not through it
    with _loading(path, False, color):
        mdl, tok = load(path, expert_cache=expert_cache, log=notes.append)
    for note in notes:
        _err(note)
    return mdl, tok, path
