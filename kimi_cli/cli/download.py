"""`kimi download`: only the files a run needs (or a rank's share), resumable, verified.
The transfer lives in `kimi_cli.download`.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer

from .. import config
from ..errors import KimiError
from .app import app
from .common import _duration, _err, _errors
from .options import DebugOpt


@app.command()
def download(
    repo: Annotated[str, typer.Argument(help="Hub repo id.")] = config.DEFAULT_REPO,
    revision: Annotated[str | None, typer.Option(
        "--revision", help="Branch, tag or commit (default: main).")] = None,
    local_dir: Annotated[Path | None, typer.Option(
        "--local-dir", help="Download into this folder instead of the Hugging Face "
        "cache.")] = None,
    layers: Annotated[str | None, typer.Option(
        "--layers", help="Only the shards holding layers A-B (0-based, inclusive); layer 0 "
        "adds the embedding, the last layer the final norm and lm_head.")] = None,
    rank: Annotated[str | None, typer.Option(
        "--rank", help="Only the shards machine I of N needs (I/N, e.g. 0/2): an even, "
        "contiguous split of the layers, rank 0 first.")] = None,
    split: Annotated[str | None, typer.Option(
        "--split", help="With --rank: layers per machine as `kimi run --split` gives them "
        "(e.g. 30,31); default the even split.")] = None,
    verify: Annotated[bool, typer.Option(
        "--verify", help="Also re-hash files downloaded by earlier runs.")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress on stderr.")] = False,
    debug: DebugOpt = False,
) -> None:
    """Download the model's files (only those it needs) into the Hugging Face cache."""
    with _errors(debug):
        from ..download import Progress
        from ..download import download as fetch

        progress = Progress(sys.stderr, quiet=quiet)
        result = fetch(repo, revision, local_dir, layers=layers, rank=rank, verify_all=verify,
                       progress=progress, split=split)
        part = f" ({result.layers})" if result.layers else ""
        if result.failed:
            sample = "; ".join(f"{k}: {v}" for k, v in sorted(result.failed.items())[:3])
            raise KimiError(f"{len(result.failed)} of {len(result.files)} files are missing or "
                            f"failed ({sample}); run the same command again to resume")
        if not quiet:
            if result.offline:
                _err(f"kimi: HF_HUB_OFFLINE is set: all {len(result.files)} files{part} are "
                     f"in {result.path} (not compared with the Hub)")
            else:
                rate = result.bytes_downloaded / result.seconds if result.seconds else 0.0
                _err(f"kimi: {repo}@{result.commit[:12]}{part}: {len(result.files)} files, "
                     f"{result.total_bytes / 1e9:.2f} GB; downloaded {len(result.downloaded)} "
                     f"({result.bytes_downloaded / 1e6:.1f} MB in {_duration(result.seconds)}, "
                     f"{rate / 1e6:.1f} MB/s); sizes match the Hub, "
                     f"{len(result.verified_hash)} checked by hash")
        sys.stdout.write(f"{result.path}\n")
        sys.stdout.flush()
