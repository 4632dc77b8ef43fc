"""The Typer application every `kimi` command registers on, and its global options.
Kept apart so command modules and `main` share one app without importing each other.
"""

from __future__ import annotations

from typing import Annotated

import typer

from ..clihelp import KimiGroup

app = typer.Typer(
    name="kimi",
    cls=KimiGroup,
    help="Run Moonshot's Kimi-K2-Thinking locally with MLX.",
    add_completion=False,
    pretty_exceptions_enable=False,
    no_args_is_help=True,
    context_settings={"help_option_names": ["-h", "--help"]},
)

EXIT_INTERRUPTED = 130


def _version(value: bool) -> None:
    if value:
        from .. import __version__

        typer.echo(f"kimi-mlx {__version__}")
        raise typer.Exit()


@app.callback()
def _main(
    version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True,
                                          help="Show the version and exit.")] = False,
) -> None:
    """Run Moonshot's Kimi-K2-Thinking locally with MLX."""
