"""`kimi bench`: llama-bench style prompt/decode tests, optionally against mlx-lm.
The measuring lives in `kimi_cli.bench`; this is flags and output formats.
"""

from __future__ import annotations

import sys
from enum import Enum
from typing import Annotated

import typer

from .. import config
from ..errors import UsageError
from .app import app
from .common import _distributed, _err, _errors, model_dir, resolve_model
from .options import DebugOpt, HostfileOpt, NoPrefetchOpt, SplitOpt


class BenchFormat(str, Enum):
    table = "table"
    json = "json"
    jsonl = "jsonl"
    csv = "csv"
    md = "md"


@app.command()
def bench(
    model: Annotated[str | None, typer.Option(
        "--model", "-m", help="Checkpoint directory or expert pack, Hub repo id in the HF "
        "cache, or `demo`.", envvar="KIMI_MODEL")] = None,
    n_prompt: Annotated[str, typer.Option(
        "--n-prompt", "-p", help="Prompt lengths for pp tests, comma-separated (0: none).")] = "512",
    n_gen: Annotated[str, typer.Option(
        "--n-gen", "-n", help="Generated tokens for tg tests, comma-separated (0: none).")] = "128",
    n_depth: Annotated[str, typer.Option(
        "--n-depth", "-d", help="Context depths: each test runs after a prefill of this many "
        "tokens (e.g. 0,4096 adds tg128@d4096).")] = "0",
    repetitions: Annotated[int, typer.Option(
        "--repetitions", "-r", help="Timed runs per test, after one warm-up.")] = 5,
    batch: Annotated[str, typer.Option(
        "--batch", "-b", help="Sequences decoded together in tg tests, comma-separated "
        "(e.g. 1,2,4,8: aggregate tok/s of each against 1).")] = "1",
    fmt: Annotated[BenchFormat, typer.Option(
        "--format", "-o", help="table, json, jsonl, csv or md.")] = BenchFormat.table,
    compare: Annotated[str | None, typer.Option(
        "--compare", help="Also run `mlx-lm` on the same checkpoint and print the ratio "
        "per test.")] = None,
    expert_cache: Annotated[str | None, typer.Option(
        "--expert-cache", help="Expert cache size as for `kimi run` (40GB, 25%, 25%experts, "
        "off, auto); its stats are reported per test.")] = None,
    no_prefetch: NoPrefetchOpt = False,
    seed: Annotated[int, typer.Option("--seed", help="Seed of the random prompt tokens.")] = 0,
    chunk: Annotated[int, typer.Option(
        "--prefill-chunk", help="Tokens per forward pass in prefill.")] = config.PREFILL_CHUNK,
    bandwidth: Annotated[float | None, typer.Option(
        "--bandwidth", help="Memory bandwidth in GB/s for the floor, instead of measuring "
        "it.")] = None,
    quiet: Annotated[bool, typer.Option(
        "--quiet", "-q", help="No progress on stderr.")] = False,
    split: SplitOpt = None,
    hostfile: HostfileOpt = None,
    debug: DebugOpt = False,
) -> None:
    """Measure prefill and decode speed (llama-bench style), memory and the bandwidth floor."""
    with _errors(debug):
        _distributed(hostfile, split)
        from .. import bench as kbench

        opts = kbench.BenchOptions(
            prompts=kbench.parse_counts(n_prompt, "-p/--n-prompt"),
            gens=kbench.parse_counts(n_gen, "-n/--n-gen"),
            depths=kbench.parse_counts(n_depth, "-d/--n-depth"), repeats=repetitions,
            seed=seed, chunk=chunk, expert_cache=expert_cache, prefetch=not no_prefetch,
            compare=compare, batches=kbench.parse_counts(batch, "-b/--batch"))
        opts.validate()
        from ..experts.cache import parse_cache_spec

        parse_cache_spec(expert_cache)  # before any measuring
        kbench.plan_tests(opts.prompts, opts.gens, opts.depths, opts.batches)
        spec = resolve_model(model)
        from ..model.scripted import PREFIX

        if spec.startswith(PREFIX):
            raise UsageError("kimi bench measures a checkpoint; a scripted model has no weights")
        path = model_dir(spec, quiet)
        hint = kbench.cpu_hint(opts)
        if hint and not quiet:
            _err(hint)
        out = sys.stdout

        def on_result(row: dict) -> None:
            if fmt == BenchFormat.jsonl:
                out.write(kbench.jsonl_line(row, "result"))
                out.flush()

        if bandwidth is not None and bandwidth <= 0:
            raise UsageError("--bandwidth must be positive (GB/s)")
        report = kbench.run_bench(path, spec, opts, log=(lambda s: None) if quiet else _err,
                                  on_result=on_result,
                                  bandwidth=kbench.given_bandwidth(bandwidth))
        if fmt == BenchFormat.jsonl:
            out.write(kbench.jsonl_line({k: v for k, v in report.items() if k != "results"},
                                        "summary"))
        elif fmt == BenchFormat.json:
            kbench.render_json(report, out)
        elif fmt == BenchFormat.csv:
            kbench.render_csv(report, out)
        elif fmt == BenchFormat.md:
            kbench.render_md(report, out)
        else:
            kbench.render_table(report, out)
        out.flush()
