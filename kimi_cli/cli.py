"""The `kimi` command line: parse flags, then call the library (thin by design).

Exit codes: 0 ok, 1 runtime failure, 2 usage error, 130 interrupted. Errors are one line on
stderr; `--debug` shows the traceback.
"""

from __future__ import annotations

import json
import os
import sys
from enum import Enum
from pathlib import Path
from typing import Annotated

import typer

from . import config
from .errors import KimiError, UsageError

app = typer.Typer(
    name="kimi",
    help="Run Moonshot's Kimi-K2-Thinking locally with MLX.",
    add_completion=False,
    pretty_exceptions_enable=False,
    no_args_is_help=True,
    context_settings={"help_option_names": ["-h", "--help"]},
)

EXIT_INTERRUPTED = 130


def _version(value: bool) -> None:
    if value:
        from . import __version__

        typer.echo(f"kimi-mlx {__version__}")
        raise typer.Exit()


@app.callback()
def _main(
    version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True,
                                          help="Show the version and exit.")] = False,
) -> None:
    """Run Moonshot's Kimi-K2-Thinking locally with MLX."""


class Format(str, Enum):
    text = "text"
    json = "json"
    jsonl = "jsonl"


def _err(msg: str) -> None:
    sys.stderr.write(msg + "\n")
    sys.stderr.flush()


def _stderr_style() -> tuple[str, str]:
    """ANSI dim on/off for reasoning on stderr, honouring NO_COLOR, FORCE_COLOR and TERM=dumb."""
    if os.environ.get("NO_COLOR"):
        return "", ""
    if os.environ.get("FORCE_COLOR") or (sys.stderr.isatty() and os.environ.get("TERM") != "dumb"):
        return "\x1b[2m", "\x1b[0m"
    return "", ""


def read_prompt(prompt: str | None, stdin=None) -> str:
    """PROMPT argument, `-` for stdin, or piped stdin (prepended as context to a PROMPT)."""
    stdin = stdin or sys.stdin
    piped = stdin is not None and not stdin.isatty()
    if prompt == "-":
        if not piped:
            raise UsageError("`-` reads the prompt from stdin, but stdin is a terminal")
        return stdin.read()
    if prompt is None:
        if not piped:
            raise UsageError('no prompt: give one (kimi run "...") or pipe it on stdin')
        text = stdin.read()
        if not text.strip():
            raise UsageError("the prompt read from stdin is empty")
        return text
    if piped:
        context = stdin.read()
        if context.strip():
            return f"{context.rstrip()}\n\n{prompt}"
    return prompt


def resolve_model(spec: str | None) -> str:
    """The model to use: --model, $KIMI_MODEL, the release in the HF cache, or a clear error."""
    spec = spec or os.environ.get("KIMI_MODEL")
    if spec:
        return spec
    from .checkpoint.reader import hf_cache_snapshot

    if hf_cache_snapshot(config.DEFAULT_REPO) is not None:
        return config.DEFAULT_REPO
    raise KimiError(
        f"no model found: {config.DEFAULT_REPO} is not in the Hugging Face cache. "
        f"Download it with `kimi download` (594 GB), pass --model DIR, "
        f'or try the built-in demo: kimi run --model demo "Hello"'
    )


def model_dir(spec: str, quiet: bool):
    """A local directory for --model: `demo` (built once), a directory or a cached Hub id."""
    from .checkpoint.demo import DEMO_NAME, ensure_demo_model
    from .checkpoint.reader import resolve_model_path

    if spec == DEMO_NAME:
        if not quiet:
            _err("kimi: using the built-in demo model: random weights, so the text is gibberish "
                 "(it shows the whole pipeline working without the 594 GB download)")
        return ensure_demo_model(progress=None if quiet else _err)
    return resolve_model_path(spec)


@app.command()
def run(
    prompt: Annotated[str | None, typer.Argument(
        help="The prompt; `-` reads it from stdin. Piped stdin with a PROMPT is context.")] = None,
    model: Annotated[str | None, typer.Option(
        "--model", "-m", help="Checkpoint directory or expert pack, Hub repo id in the HF "
        "cache, `demo` (random weights) or `scripted:FILE[@RATE]` (replays FILE's outputs).",
        envvar="KIMI_MODEL")] = None,
    system: Annotated[str | None, typer.Option("--system", "-s", help="System prompt.")] = None,
    raw: Annotated[bool, typer.Option(
        "--raw", help="No chat template: the prompt is the text to continue.")] = False,
    temperature: Annotated[float, typer.Option("--temperature", "-t")] = (
        config.DEFAULT_TEMPERATURE),
    top_p: Annotated[float, typer.Option("--top-p")] = config.DEFAULT_TOP_P,
    min_p: Annotated[float, typer.Option("--min-p")] = config.DEFAULT_MIN_P,
    top_k: Annotated[int, typer.Option("--top-k")] = config.DEFAULT_TOP_K,
    max_tokens: Annotated[int, typer.Option("--max-tokens", "-n")] = config.DEFAULT_MAX_TOKENS,
    seed: Annotated[int | None, typer.Option("--seed")] = None,
    fmt: Annotated[Format, typer.Option("--format", "-f", help="text, json or jsonl.")] = (
        Format.text),
    print_prompt: Annotated[bool, typer.Option(
        "--print-prompt", help="Print the rendered prompt and exit.")] = False,
    hide_reasoning: Annotated[bool, typer.Option(
        "--hide-reasoning", help="Do not show the reasoning on stderr.")] = False,
    quiet: Annotated[bool, typer.Option(
        "--quiet", "-q", help="Only the answer: no reasoning, notes or stats.")] = False,
    expert_cache: Annotated[str | None, typer.Option(
        "--expert-cache", help="Stream routed experts from an expert pack through a cache of "
        "this size (e.g. 40GB, 25%, auto).")] = None,
    no_prefetch: Annotated[bool, typer.Option(
        "--no-prefetch", help="Expert cache: do not prefetch the next layer's experts.")] = False,
    pin_experts: Annotated[Path | None, typer.Option(
        "--pin-experts", help="Expert cache: keep the experts listed in this profile resident "
        "(a JSON file written by --save-expert-profile).")] = None,
    save_expert_profile: Annotated[Path | None, typer.Option(
        "--save-expert-profile", help="Expert cache: write the most used experts per layer "
        "to this JSON file after the run.")] = None,
    debug: Annotated[bool, typer.Option("--debug", help="Tracebacks on errors.")] = False,
) -> None:
    """Answer one prompt: the answer on stdout, reasoning and stats on stderr."""
    from .engine import SamplingSettings

    settings = SamplingSettings(temperature=temperature, top_p=top_p, min_p=min_p,
                                top_k=top_k, max_tokens=max_tokens, seed=seed)
    with _errors(debug):
        settings.validate()
        text = read_prompt(prompt)
        spec = resolve_model(model)
        from .model.scripted import PREFIX, load_scripted

        scripted = spec.startswith(PREFIX)
        if scripted:
            from .checkpoint.demo import ensure_tokenizer_dir

            path = ensure_tokenizer_dir()
        else:
            path = model_dir(spec, quiet or fmt != Format.text or print_prompt)
        if print_prompt or scripted:  # only the tokenizer and the chat template
            from .tokenizer import Tokenizer

            mdl, tok = None, Tokenizer.from_dir(path)
            if scripted:
                mdl = load_scripted(spec, tok)
        else:
            from .loader import load

            pinned = _read_profile(pin_experts) if pin_experts else None
            mdl, tok = load(path, expert_cache=expert_cache, prefetch=not no_prefetch,
                            pinned=pinned)
        if raw:
            prompt_text = text
        else:
            from .chat.template import render

            messages = ([{"role": "system", "content": system}] if system else [])
            messages.append({"role": "user", "content": text})
            prompt_text = render(messages, template=tok.chat_template)
        if print_prompt:
            sys.stdout.write(prompt_text)
            sys.stdout.flush()
            return
        ids = tok.encode(prompt_text)
        _generate(mdl, tok, ids, settings, fmt, spec, raw=raw,
                  show_reasoning=not (hide_reasoning or quiet), quiet=quiet)
        if save_expert_profile is not None:
            if mdl.expert_cache is None:
                raise UsageError("--save-expert-profile needs the expert cache (--expert-cache)")
            save_expert_profile.write_text(json.dumps(
                {str(k): v for k, v in mdl.expert_cache.profile().items()}, indent=1))


def _generate(mdl, tok, ids, settings, fmt: Format, model_name: str, raw: bool,
              show_reasoning: bool, quiet: bool) -> None:
    from .chat.parser import End, OutputParser, ReasoningDelta, TextDelta, ToolCall
    from .engine import Done, Engine, PrefillProgress, Token

    engine = Engine(mdl, tok)
    parser = OutputParser(tok)
    out = sys.stdout
    dim_on, dim_off = _stderr_style()
    reasoning: list[str] = []
    answer: list[str] = []
    calls: list[ToolCall] = []
    in_reasoning = False
    show_progress = fmt == Format.text and not quiet and sys.stderr.isatty()

    def emit(obj: dict) -> None:
        out.write(json.dumps(obj, ensure_ascii=False) + "\n")
        out.flush()

    def on_event(ev) -> None:
        nonlocal in_reasoning
        if isinstance(ev, ReasoningDelta):
            reasoning.append(ev.text)
            if fmt == Format.jsonl:
                emit({"type": "reasoning", "text": ev.text})
            elif fmt == Format.text and show_reasoning:
                sys.stderr.write(dim_on + ev.text + dim_off)
                sys.stderr.flush()
                in_reasoning = True
        elif isinstance(ev, TextDelta):
            answer.append(ev.text)
            if fmt == Format.jsonl:
                emit({"type": "text", "text": ev.text})
            elif fmt == Format.text:
                if in_reasoning:
                    sys.stderr.write("\n")
                    in_reasoning = False
                out.write(ev.text)
                out.flush()
        elif isinstance(ev, ToolCall):
            calls.append(ev)
            if fmt == Format.jsonl:
                emit({"type": "tool_call", **_call_dict(ev)})
            elif fmt == Format.text and not quiet:
                _err(f"[tool call {ev.id}: {ev.raw_arguments}]")

    done = None
    for ev in engine.generate(ids, settings):
        if isinstance(ev, PrefillProgress):
            if show_progress and ev.total > config.PREFILL_CHUNK:
                sys.stderr.write(f"\rprefill {ev.processed}/{ev.total}")
                if ev.processed == ev.total:
                    sys.stderr.write("\r\x1b[K")
                sys.stderr.flush()
        elif isinstance(ev, Token):
            if raw:
                if ev.text:
                    on_event(TextDelta(ev.text))
            else:
                for pev in parser.feed(ev.id):
                    if not isinstance(pev, End):
                        on_event(pev)
        elif isinstance(ev, Done):
            done = ev
    if not raw:
        for pev in parser.finish(done.finish_reason):
            if not isinstance(pev, End):
                on_event(pev)
    st = done.stats
    result = {
        "model": model_name,
        "text": "".join(answer),
        "reasoning": "".join(reasoning),
        "tool_calls": [_call_dict(c) for c in calls],
        "finish_reason": done.finish_reason,
        "prompt_token_ids": ids,
        "token_ids": done.token_ids,
        **{k: v for k, v in st.to_dict().items()},
    }
    cache = getattr(mdl, "expert_cache", None)
    if cache is not None:
        result["expert_cache"] = cache.stats.to_dict()
    if fmt == Format.json:
        out.write(json.dumps(result, ensure_ascii=False) + "\n")
        out.flush()
        return
    if fmt == Format.jsonl:
        emit({"type": "stats", **st.to_dict(),
              **({"expert_cache": result["expert_cache"]} if "expert_cache" in result else {})})
        emit({"type": "done", "finish_reason": done.finish_reason})
        return
    if in_reasoning:
        sys.stderr.write("\n")
    if answer and not "".join(answer).endswith("\n"):
        out.write("\n")
        out.flush()
    if not quiet:
        _err(f"[{st.prompt_tokens} prompt tokens ({st.reused_tokens} reused), "
             f"{st.prompt_tps:.1f} tok/s | {st.generation_tokens} generated, "
             f"{st.generation_tps:.1f} tok/s | peak {st.peak_memory_gb:.2f} GB | "
             f"{done.finish_reason}]")
        if cache is not None:
            c = result["expert_cache"]
            _err(f"[expert cache: hit rate {c['hit_rate']:.1%}, {c['gb_read_per_token']:.3f} GB "
                 f"read/token, stall {c['stall_ms_per_token']:.1f} ms/token, "
                 f"{c['resident_bytes'] / 1e9:.2f} GB resident]")


def _read_profile(path: Path) -> dict[int, list[int]]:
    try:
        data = json.loads(path.read_text())
        return {int(k): [int(e) for e in v] for k, v in data.items()}
    except FileNotFoundError:
        raise UsageError(f"--pin-experts: {path}: no such file") from None
    except (ValueError, TypeError, AttributeError):
        raise UsageError(f"--pin-experts: {path}: expected a JSON object "
                         '{"layer": [expert, ...]}') from None


def _call_dict(c) -> dict:
    d = {"id": c.id, "name": c.name, "index": c.index, "arguments": c.arguments,
         "raw_arguments": c.raw_arguments}
    if c.error:
        d["error"] = c.error
    return d


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


@app.command()
def convert(
    src: Annotated[str, typer.Argument(
        help="Release checkpoint directory or Hub repo id in the HF cache "
             "(with --verify: the pack to check).")],
    dst: Annotated[str | None, typer.Argument(
        help="Pack directory; default: SRC-pack next to SRC, or "
             "$XDG_CACHE_HOME/kimi-mlx/packs/OWNER--NAME for a Hub id.")] = None,
    force: Annotated[bool, typer.Option(
        "--force", help="Convert again even if DST already holds a pack.")] = False,
    verify: Annotated[bool, typer.Option(
        "--verify", help="Check an existing pack's checksums and exit.")] = False,
    debug: Annotated[bool, typer.Option("--debug", help="Tracebacks on errors.")] = False,
) -> None:
    """Repack a checkpoint so each expert is one aligned block (needed to stream experts)."""
    with _errors(debug):
        if verify:
            from .experts.pack import open_pack

            target = dst or src
            with open_pack(target) as pack:
                pack.verify(progress=_ConvertProgress("verify"))
            _err(f"kimi: {target}: all {sum(e.n_experts for e in pack.layers.values())} "
                 "expert blocks and the resident weights pass their checksums")
            return
        from .experts.convert import convert as convert_checkpoint
        from .experts.convert import default_pack_dir

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


def _duration(seconds: float) -> str:
    s = int(seconds)
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


def main() -> None:
    try:
        app()
    except KeyboardInterrupt:
        _err("kimi: interrupted")
        sys.exit(EXIT_INTERRUPTED)
    except BrokenPipeError:
        _quiet_broken_pipe()
        sys.exit(0)


if __name__ == "__main__":
    main()

