"""`kimi convert`: a release checkpoint to an expert pack, with progress on stderr.
Optional: the expert cache streams from the release itself.
"""

from __future__ import annotations

import sys
from typing import Annotated

import typer

from .app import app
from .common import _duration, _err, _errors, model_dir
from .options import DebugOpt


@app.command()
def convert(
    src: Annotated[str, typer.Argument(
        help="Release checkpoint directory, Hub repo id in the HF cache or `demo` "
             "(with --verify: the pack to check).")],
    dst: Annotated[str | None, typer.Argument(
        help="Pack directory; default: SRC-pack next to SRC, or "
             "$XDG_CACHE_HOME/kimi-mlx/packs/OWNER--NAME for a Hub id.")] = None,
    force: Annotated[bool, typer.Option(
        "--force", help="Convert again even if DST already holds a pack.")] = False,
    verify: Annotated[bool, typer.Option(
        "--verify", help="Check an existing pack's checksums and exit.")] = False,
    debug: DebugOpt = False,
) -> None:
    """Optional: repack a checkpoint so each expert is one aligned block (one read per miss)."""
    with _errors(debug):
        from ..checkpoint.demo import DEMO_NAME

        if src == DEMO_NAME and not verify:  # as every other command accepts it
            src = str(model_dir(src, quiet=True))
        if verify:
            from ..experts.pack import open_pack

            target = dst or src
            with open_pack(target) as pack:
                pack.verify(progress=_ConvertProgress("verify"))
            _err(f"kimi: {target}: all {sum(e.n_experts for e in pack.layers.values())} "
                 "expert blocks and the resident weights pass their checksums")
            return
        from ..experts.convert import convert as convert_checkpoint
        from ..experts.convert import default_pack_dir

        out = default_pack_dir(src) if dst is None else dst
        show = _ConvertProgress("convert")
        try:
            result = convert_checkpoint(src, out, show, force=force, on_shard=show.shard)
        except KeyboardInterrupt:
            show.finish()
            _err(f"kimi: conversion stopped; rerun `kimi convert {src} {out}` to resume")
            raise
        show.finish()
        skipped = (f", {len(result.shards_skipped)} shards already done"
                   if result.shards_skipped else "")
        _err(f"kimi: converted {result.bytes_written / 1e9:.2f} GB in {result.seconds:.1f} s "
             f"({result.throughput / 1e6:.0f} MB/s{skipped}), peak RSS "
             f"{result.peak_rss / 1e6:.0f} MB")
        sys.stdout.write(f"{result.path}\n")
        sys.stdout.flush()


class _ConvertProgress:
    """Bytes, rate and ETA on stderr: a live `\\r` line on a terminal, else one line per shard."""

    def __init__(self, verb: str):
        self.verb = verb
        self.tty = sys.stderr.isatty()
        self.start: int | None = None  # bytes already done when this run started (resume)
        self.last = (0, 0, 0.0)
        self.shown = 0.0
        self.live = False

    def _line(self) -> str:
        done, total, elapsed = self.last
        rate = (done - (self.start or 0)) / elapsed if elapsed > 0 else 0.0
        eta = (total - done) / rate if rate > 0 else 0.0
        pct = 100 * done / total if total else 100.0
        return (f"{self.verb}: {done / 1e9:.2f}/{total / 1e9:.2f} GB ({pct:.0f}%), "
                f"{rate / 1e6:.0f} MB/s, ETA {_duration(eta)}")

    def __call__(self, done: int, total: int, elapsed: float) -> None:
        if self.start is None:
            self.start = done
        self.last = (done, total, elapsed)
        if self.tty and (elapsed - self.shown >= 0.2 or done == total):
            self.shown = elapsed
            sys.stderr.write("\r\x1b[K" + self._line())
            sys.stderr.flush()
            self.live = True

    def shard(self, name: str, index: int, count: int, skipped: bool) -> None:
        if not self.tty:
            state = "already done" if skipped else self._line()
            _err(f"kimi: shard {index}/{count} {name}: {state}")

    def finish(self) -> None:
        if self.live:
            sys.stderr.write("\r\x1b[K")
            sys.stderr.flush()
            self.live = False
