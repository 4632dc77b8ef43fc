"""`kimi info`: what a checkpoint is, what is on disk and whether it fits this machine.
Needs only config.json and the index; the report lives in `kimi_cli.info`.
"""

from __future__ import annotations

import sys
from enum import Enum
from typing import Annotated

import typer

from .. import config
from .app import app
from .common import _check_expert_cache, _errors, model_dir
from .options import DebugOpt


class InfoFormat(str, Enum):
    text = "text"
    json = "json"


@app.command()
def info(
    model: Annotated[str, typer.Argument(
        help="Hub repo id (its config and index are fetched if not cached), release "
        "directory, expert pack or `demo`.")] = config.DEFAULT_REPO,
    context: Annotated[int, typer.Option(
        "--context", help="Context length for the KV cache and the decode estimate.")] = (
        config.FIT_CONTEXT),
    expert_cache: Annotated[str | None, typer.Option(
        "--expert-cache", help="Expert cache budget to plan for (40GB, 25% of memory, "
        "25%experts); default: auto, from this machine's memory.")] = None,
    bandwidth: Annotated[float | None, typer.Option(
        "--bandwidth", help="Memory bandwidth in GB/s to assume instead of measuring it.")] = None,
    ssd_gbps: Annotated[float | None, typer.Option(
        "--ssd-gbps", help="SSD read speed in GB/s to assume (default: measured on a large "
        "expert pack, else 5).")] = None,
    fmt: Annotated[InfoFormat, typer.Option("--format", "-f", help="text or json.")] = (
        InfoFormat.text),
    trajectories: Annotated[int, typer.Option(
        "--trajectories", help="Sequences decoded together (kimi run --heavy) to size the KV "
        "cache for.")] = config.HEAVY_TRAJECTORIES,
    debug: DebugOpt = False,
) -> None:
    """What a model is, which files are here, and whether it fits this machine."""
    with _errors(debug):
        from ..checkpoint.demo import DEMO_NAME
        from ..info import info as model_info
        from ..info import render_json, render_text

        _check_expert_cache(expert_cache)
        spec = str(model_dir(model, quiet=True)) if model == DEMO_NAME else model
        report = model_info(spec, context=context, expert_cache=expert_cache,
                            bandwidth_gbps=bandwidth, ssd_gbps=ssd_gbps,
                            trajectories=trajectories)
        (render_json if fmt == InfoFormat.json else render_text)(report, sys.stdout)
        sys.stdout.flush()
