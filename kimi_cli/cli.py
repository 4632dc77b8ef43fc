"""The `kimi` command line: parse flags, then call the library (thin by design).

Exit codes: 0 ok, 1 runtime failure, 2 usage error, 130 interrupted; agent runs also 3 (step
limit) and 4 (repeated tool calls). Errors are one line on stderr; `--debug` shows the traceback.
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


class Think(str, Enum):
    show = "show"
    collapse = "collapse"
    hide = "hide"


class Color(str, Enum):
    auto = "auto"
    always = "always"
    never = "never"


class Approval(str, Enum):
    ask = "ask"
    auto_edit = "auto-edit"
    yolo = "yolo"


def _err(msg: str) -> None:
    sys.stderr.write(msg + "\n")
    sys.stderr.flush()


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


# Options shared by several commands (one definition, one help text).
SystemOpt = Annotated[str | None, typer.Option("--system", "-s", help="System prompt.")]
ExpertCacheOpt = Annotated[str | None, typer.Option(
        "--expert-cache", help="Stream routed experts from an expert pack through a cache of "
        "this size (e.g. 40GB, 25%, auto).")]
ToolsOpt = Annotated[str | None, typer.Option(
        "--tools", help="Agent: comma-separated tools (read_file, list_files, grep, "
        "write_file, edit_file, shell), `all` (default) or `read-only`.")]
WorkspaceOpt = Annotated[Path | None, typer.Option(
        "--workspace", "-w", help="Agent: the directory the tools work in (default: the "
        "current one).")]
ApprovalOpt = Annotated[Approval | None, typer.Option(
        "--approval", help="Agent: ask (default; without a terminal, edits and commands are "
        "denied), auto-edit (file edits run, commands ask) or yolo.")]
AllowNetworkOpt = Annotated[bool, typer.Option(
        "--allow-network", help="Agent: let sandboxed shell commands use the network.")]
DebugOpt = Annotated[bool, typer.Option("--debug", help="Tracebacks on errors.")]


@app.command()
def run(
    prompt: Annotated[str | None, typer.Argument(
        help="The prompt; `-` reads it from stdin. Piped stdin with a PROMPT is context.")] = None,
    model: Annotated[str | None, typer.Option(
        "--model", "-m", help="Checkpoint directory or expert pack, Hub repo id in the HF "
        "cache, `demo` (random weights) or `scripted:FILE[@RATE]` (replays FILE's outputs).",
        envvar="KIMI_MODEL")] = None,
    system: SystemOpt = None,
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
    color: Annotated[Color, typer.Option(
        "--color", help="Colour on stderr (and live panels on a terminal): auto (NO_COLOR, "
        "FORCE_COLOR, TERM=dumb, or whether it is a terminal), always or never.")] = Color.auto,
    expert_cache: ExpertCacheOpt = None,
    no_prefetch: Annotated[bool, typer.Option(
        "--no-prefetch", help="Expert cache: do not prefetch the next layer's experts.")] = False,
    pin_experts: Annotated[Path | None, typer.Option(
        "--pin-experts", help="Expert cache: keep the experts listed in this profile resident "
        "(a JSON file written by --save-expert-profile).")] = None,
    save_expert_profile: Annotated[Path | None, typer.Option(
        "--save-expert-profile", help="Expert cache: write the most used experts per layer "
        "to this JSON file after the run.")] = None,
    agent: Annotated[bool, typer.Option(
        "--agent", help="Agent run: the model calls tools (files, shell) in the workspace "
        "until it answers.")] = False,
    max_steps: Annotated[int | None, typer.Option(
        "--max-steps", help=f"Agent: model calls before it stops unanswered (default "
        f"{config.AGENT_MAX_STEPS}; exit code {config.EXIT_AGENT_STEP_LIMIT}).")] = None,
    tools: ToolsOpt = None,
    workspace: WorkspaceOpt = None,
    approval: ApprovalOpt = None,
    allow_network: AllowNetworkOpt = False,
    context_limit: Annotated[int | None, typer.Option(
        "--context-limit", help="Agent: context tokens; near it, old tool results are elided "
        f"(default {config.CONTEXT_LENGTH}).")] = None,
    debug: DebugOpt = False,
) -> None:
    """Answer one prompt: the answer on stdout, reasoning and stats on stderr."""
    from .engine import SamplingSettings

    settings = SamplingSettings(temperature=temperature, top_p=top_p, min_p=min_p,
                                top_k=top_k, max_tokens=max_tokens, seed=seed)
    agent_flags = dict(max_steps=max_steps, tools=tools, workspace=workspace,
                       approval=approval, allow_network=allow_network,
                       context_limit=context_limit)
    with _errors(debug):
        settings.validate()
        agent_opts = _agent_options(agent, raw, **agent_flags)
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
            with _loading(path, quiet or fmt != Format.text, color):
                mdl, tok = load(path, expert_cache=expert_cache, prefetch=not no_prefetch,
                                pinned=pinned)
        if agent_opts is not None:
            _run_agent(mdl, tok, text, system, settings, fmt, print_prompt, quiet,
                       "hide" if hide_reasoning else "show", agent_opts, color.value)
            return
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
                  show_reasoning=not (hide_reasoning or quiet), quiet=quiet, color=color)
        if save_expert_profile is not None:
            if mdl.expert_cache is None:
                raise UsageError("--save-expert-profile needs the expert cache (--expert-cache)")
            save_expert_profile.write_text(json.dumps(
                {str(k): v for k, v in mdl.expert_cache.profile().items()}, indent=1))


def _agent_options(agent: bool, raw: bool, **flags) -> dict | None:
    """The agent flags, checked before any model loads; None without --agent."""
    if not agent:
        given = [k for k, v in flags.items() if v not in (None, False)]
        if given:
            raise UsageError(f"--{given[0].replace('_', '-')} needs --agent")
        return None
    if raw:
        raise UsageError("--raw and --agent do not go together: agent runs need the chat "
                         "template")
    from .agent.tools import select

    opts = dict(flags)
    opts["tools"] = select(flags["tools"])
    ws = flags["workspace"] or Path.cwd()
    if not ws.is_dir():
        raise UsageError(f"--workspace: {ws}: not a directory")
    opts["workspace"] = ws.resolve()
    for name in ("max_steps", "context_limit"):
        if flags[name] is not None and flags[name] < 1:
            raise UsageError(f"--{name.replace('_', '-')} must be at least 1")
    return opts


def _run_agent(mdl, tok, task: str, system: str | None, settings, fmt: Format,
               print_prompt: bool, quiet: bool, think: str, opts: dict,
               color: str = "auto") -> None:
    from .agent import frontend
    from .agent.approval import Mode, Policy, StreamApprover
    from .agent.loop import Agent, AgentConfig
    from .agent.sandbox import choose
    from .agent.tools import ToolContext
    from .engine import Engine

    cfg = AgentConfig(system_prompt=system)
    if opts["max_steps"] is not None:
        cfg.max_steps = opts["max_steps"]
    if opts["context_limit"] is not None:
        cfg.context_limit = opts["context_limit"]
    ctx = ToolContext(opts["workspace"], choose(opts["allow_network"]))
    terminal = sys.stdin.isatty() and sys.stderr.isatty()
    policy = Policy(Mode((opts["approval"] or Approval.ask).value),
                    StreamApprover() if terminal else None)
    agent = Agent(Engine(mdl, tok) if mdl is not None else None, opts["tools"], ctx, policy,
                  settings, cfg, tokenizer=tok)
    if print_prompt:
        agent.messages.append({"role": "user", "content": task})
        sys.stdout.write(tok.decode(agent.prompt_ids()))
        sys.stdout.flush()
        return
    done = frontend.run(agent, task, fmt.value, quiet=quiet, think=think, color=color)
    frontend.check_done(done)


def _generate(mdl, tok, ids, settings, fmt: Format, model_name: str, raw: bool,
              show_reasoning: bool, quiet: bool, color: Color = Color.auto) -> None:
    from .chat.parser import ReasoningDelta, TextDelta, ToolCall
    from .chat.reply import generate_reply
    from .engine import Engine, PrefillProgress

    out = sys.stdout
    renderer = None
    if fmt == Format.text:
        # Live panels on a terminal, plain streams in pipes (the answer alone on stdout).
        from .ui.events import ThinkMode
        from .ui.render import make_renderer
        from .ui.term import make_console

        renderer = make_renderer(make_console(sys.stdout, color.value),
                                 make_console(sys.stderr, color.value),
                                 think=ThinkMode.show if show_reasoning else ThinkMode.hide,
                                 quiet=quiet)

    def emit(obj: dict) -> None:
        out.write(json.dumps(obj, ensure_ascii=False) + "\n")
        out.flush()

    def on_event(ev) -> None:
        if renderer is not None:
            if isinstance(ev, PrefillProgress):
                renderer.progress(ev.processed, ev.total)
            else:
                renderer.feed(ev)
        elif fmt == Format.jsonl:
            if isinstance(ev, ReasoningDelta):
                emit({"type": "reasoning", "text": ev.text})
            elif isinstance(ev, TextDelta):
                emit({"type": "text", "text": ev.text})
            elif isinstance(ev, ToolCall):
                emit({"type": "tool_call", **_call_dict(ev)})

    if renderer is not None:
        renderer.waiting("thinking…")
    try:
        reply = generate_reply(Engine(mdl, tok), tok, ids, settings, on_event, raw=raw)
    except BaseException:
        if renderer is not None:
            renderer.finish("error")
        raise
    if renderer is not None:
        renderer.finish(reply.finish_reason)
    if reply.finish_reason == "interrupted":
        raise KeyboardInterrupt
    st = reply.stats
    result = {
        "model": model_name,
        "text": reply.content,
        "reasoning": reply.reasoning,
        "tool_calls": [_call_dict(c) for c in reply.tool_calls],
        "finish_reason": reply.finish_reason,
        "prompt_token_ids": ids,
        "token_ids": reply.token_ids,
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
        emit({"type": "done", "finish_reason": reply.finish_reason})
        return
    if not quiet:
        _err(f"[{st.prompt_tokens} prompt tokens ({st.reused_tokens} reused), "
             f"{st.prompt_tps:.1f} tok/s | {st.generation_tokens} generated, "
             f"{st.generation_tps:.1f} tok/s | peak {st.peak_memory_gb:.2f} GB | "
             f"{reply.finish_reason}]")
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
    debug: DebugOpt = False,
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


@app.command()
def chat(
    session_ref: Annotated[str | None, typer.Argument(
        metavar="ID", help="With -r: the session to resume (id, id prefix or name).")] = None,
    model: Annotated[str | None, typer.Option(
        "--model", "-m", help="As for `kimi run` (a directory, Hub id, `demo`, "
        "`scripted:FILE` or `scripted:FILE@RATE`); default: the resumed session's model.",
        envvar="KIMI_MODEL")] = None,
    system: SystemOpt = None,
    temperature: Annotated[float | None, typer.Option("--temperature", "-t")] = None,
    top_p: Annotated[float | None, typer.Option("--top-p")] = None,
    min_p: Annotated[float | None, typer.Option("--min-p")] = None,
    top_k: Annotated[int | None, typer.Option("--top-k")] = None,
    max_tokens: Annotated[int | None, typer.Option("--max-tokens", "-n")] = None,
    seed: Annotated[int | None, typer.Option("--seed")] = None,
    think: Annotated[Think | None, typer.Option(
        "--think", help="Reasoning display: show, collapse or hide (default: the last one "
        "chosen with /think, else show).")] = None,
    cont: Annotated[bool, typer.Option(
        "--continue", "-c", help="Continue the most recent session.")] = False,
    resume: Annotated[bool, typer.Option(
        "--resume", "-r", help="Resume a session: -r ID, or -r alone to pick one.")] = False,
    expert_cache: ExpertCacheOpt = None,
    color: Annotated[Color, typer.Option("--color", help="auto, always or never.")] = Color.auto,
    agent: Annotated[bool, typer.Option(
        "--agent", help="Agent mode from the start (/agent on|off toggles it): each turn the "
        "model may call tools (files, shell) in the workspace until it answers.")] = False,
    max_steps: Annotated[int | None, typer.Option(
        "--max-steps", help=f"Agent: model calls per turn before it stops unanswered (default "
        f"{config.AGENT_MAX_STEPS}).")] = None,
    tools: ToolsOpt = None,
    workspace: WorkspaceOpt = None,
    approval: ApprovalOpt = None,
    allow_network: AllowNetworkOpt = False,
    debug: DebugOpt = False,
) -> None:
    """Chat in the terminal: reasoning and answer in separate live panels, sessions saved."""
    with _errors(debug):
        agent_opts = _agent_options(agent, False, max_steps=max_steps, tools=tools,
                                    workspace=workspace, approval=approval,
                                    allow_network=allow_network, context_limit=None)
        code = _chat(session_ref, model, system, dict(
            temperature=temperature, top_p=top_p, min_p=min_p, top_k=top_k,
            max_tokens=max_tokens, seed=seed), think, cont, resume, expert_cache, color, debug,
            agent_opts)
    raise typer.Exit(code)


def _chat(session_ref, model, system, flags: dict, think, cont: bool, resume: bool,
          expert_cache, color, debug: bool, agent_opts: dict | None = None) -> int:
    from dataclasses import fields

    from .engine import SamplingSettings
    from .sessions import Session, find_session, latest_session
    from .ui.agent_turn import AgentMode
    from .ui.events import ThinkMode
    from .ui.prefs import read_prefs
    from .ui.repl import ChatApp, make_reader, pick_session
    from .ui.term import make_console

    if session_ref is not None and not resume:
        raise UsageError(f"to resume session {session_ref!r}, use: kimi chat -r {session_ref}")
    if cont and resume:
        raise UsageError("use either -c (the last session) or -r (a chosen one)")
    console = make_console(sys.stdout, color.value)
    session = None
    if cont:
        path = latest_session()
        if path is None:
            _err("kimi: no saved session yet; starting a new one")
        else:
            session = Session.load(path)
    elif resume:
        if session_ref is None:
            if not (sys.stdin.isatty() and sys.stdout.isatty()):
                raise UsageError("-r without an id needs a terminal to pick from; "
                                 "give one: kimi chat -r ID")
            path = pick_session(console)
            if path is None:
                _err("kimi: no session chosen (none saved yet?)")
                return 1
        else:
            path = find_session(session_ref)
        session = Session.load(path)

    known = {f.name for f in fields(SamplingSettings)}
    saved = {k: v for k, v in (session.header.get("settings") or {}).items() if k in known} \
        if session else {}
    settings = SamplingSettings(**{**saved, **{k: v for k, v in flags.items() if v is not None}})
    settings.validate()
    remembered = read_prefs().get("think")
    if think is not None:
        think_mode = ThinkMode(think.value)
    elif remembered in [m.value for m in ThinkMode]:
        think_mode = ThinkMode(remembered)
    else:
        think_mode = ThinkMode.show

    spec = resolve_model(model or (session.header.get("model") if session else None))
    mdl, tok, path = _load_model(spec, color, expert_cache=expert_cache)
    if session is None:
        session = Session.create(spec, {}, system)
    elif system is not None:
        session.update_header(system=system)
    app = ChatApp(mdl, tok, console, spec=spec, session=session, settings=settings,
                  think=think_mode, model_path=path, debug=debug,
                  err_console=make_console(sys.stderr, color.value),
                  agent=AgentMode.from_options(agent_opts, on=True) if agent_opts else None)
    if session.header.get("settings") != app.settings_dict():
        session.update_header(settings=app.settings_dict())
    return app.run(make_reader())


def _loading(path: Path, quiet: bool, color: Color = Color.auto):
    """A spinner on stderr while the weights load, only when stderr is a terminal."""
    import contextlib

    from .ui.term import can_go_live, make_console

    if quiet or not can_go_live(sys.stderr):
        return contextlib.nullcontext()
    return make_console(sys.stderr, color.value).status(f"loading {Path(path).name}…",
                                                        spinner="dots")


def _load_model(spec: str, color: Color = Color.auto, expert_cache: str | None = None):
    """(model, tokenizer, directory) for a --model spec; a spinner while the weights load."""
    from .model.scripted import PREFIX, load_scripted
    from .tokenizer import Tokenizer

    if spec.startswith(PREFIX):
        from .checkpoint.demo import ensure_tokenizer_dir

        tok = Tokenizer.from_dir(ensure_tokenizer_dir())
        return load_scripted(spec, tok), tok, None
    path = model_dir(spec, quiet=False)
    from .loader import load

    with _loading(path, False, color):
        mdl, tok = load(path, expert_cache=expert_cache)
    return mdl, tok, path


class ReasoningField(str, Enum):
    reasoning_content = "reasoning_content"
    reasoning = "reasoning"
    both = "both"


@app.command()
def serve(
    model: Annotated[str | None, typer.Option(
        "--model", "-m", help="As for `kimi run` (a directory, Hub id, `demo` or "
        "`scripted:FILE[@RATE]`).", envvar="KIMI_MODEL")] = None,
    host: Annotated[str, typer.Option(
        "--host", help="Address to listen on (loopback by default; 0.0.0.0 exposes it to the "
        "network).")] = config.SERVE_HOST,
    port: Annotated[int, typer.Option(
        "--port", "-p", help="Port (0: any free one; the URL is printed).")] = config.SERVE_PORT,
    api_key: Annotated[str | None, typer.Option(
        "--api-key", help="Require this key (`Authorization: Bearer KEY` or `x-api-key`); "
        "other requests get 401.", envvar="KIMI_API_KEY")] = None,
    reasoning_field: Annotated[ReasoningField, typer.Option(
        "--reasoning-field", help="OpenAI field for the reasoning: reasoning_content "
        "(Moonshot, llama-server), reasoning (vLLM, ollama, mlx-lm) or both.")] = (
        ReasoningField.reasoning_content),
    model_name: Annotated[str, typer.Option(
        "--model-name", help="The model id clients send and /v1/models lists.")] = (
        config.SERVE_MODEL_NAME),
    context_limit: Annotated[int, typer.Option(
        "--context-limit", help="Prompt plus completion tokens per request; longer requests "
        "get 400.")] = config.CONTEXT_LENGTH,
    max_queue: Annotated[int, typer.Option(
        "--max-queue", help="Requests that may wait for the model; one more gets 503.")] = (
        config.SERVE_MAX_QUEUE),
    expert_cache: ExpertCacheOpt = None,
    no_prefetch: Annotated[bool, typer.Option(
        "--no-prefetch", help="Expert cache: do not prefetch the next layer's experts.")] = False,
    pin_experts: Annotated[Path | None, typer.Option(
        "--pin-experts", help="Expert cache: keep the experts listed in this profile resident "
        "(a JSON file written by --save-expert-profile).")] = None,
    debug: DebugOpt = False,
) -> None:
    """Serve the model over HTTP: OpenAI (/v1/chat/completions) and Anthropic (/v1/messages)."""
    with _errors(debug):
        if not 0 <= port <= 65535:
            raise UsageError("--port must be in 0-65535")
        for name, value in (("--context-limit", context_limit), ("--max-queue", max_queue)):
            if value < 1:
                raise UsageError(f"{name} must be at least 1")
        if not model_name.strip():
            raise UsageError("--model-name must not be empty")
        pinned = _read_profile(pin_experts) if pin_experts else None
        spec = resolve_model(model)
        from .engine import Engine
        from .model.scripted import PREFIX, load_scripted
        from .serve.plan import Served
        from .serve.server import serve as run_server
        from .tokenizer import Tokenizer

        if spec.startswith(PREFIX):
            from .checkpoint.demo import ensure_tokenizer_dir

            tok = Tokenizer.from_dir(ensure_tokenizer_dir())
            mdl = load_scripted(spec, tok)
        else:
            from .loader import load

            path = model_dir(spec, quiet=False)
            with _loading(path, False):
                mdl, tok = load(path, expert_cache=expert_cache, prefetch=not no_prefetch,
                                pinned=pinned)
        if host not in ("127.0.0.1", "localhost", "::1") and api_key is None:
            _err(f"kimi: warning: listening on {host} without --api-key: anyone who can reach "
                 "this port can use the model")
        served = Served(tok, model_name, {spec, Path(spec).name}, context_limit,
                        reasoning_field.value)
        run_server(served, Engine(mdl, tok), host, port, api_key, max_queue)


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
    fmt: Annotated[BenchFormat, typer.Option(
        "--format", "-o", help="table, json, jsonl, csv or md.")] = BenchFormat.table,
    compare: Annotated[str | None, typer.Option(
        "--compare", help="Also run `mlx-lm` on the same checkpoint and print the ratio "
        "per test.")] = None,
    expert_cache: Annotated[str | None, typer.Option(
        "--expert-cache", help="Stream routed experts from an expert pack through a cache of "
        "this size (e.g. 40GB, 25%, auto); its stats are reported per test.")] = None,
    no_prefetch: Annotated[bool, typer.Option(
        "--no-prefetch", help="Expert cache: do not prefetch the next layer's experts.")] = False,
    seed: Annotated[int, typer.Option("--seed", help="Seed of the random prompt tokens.")] = 0,
    chunk: Annotated[int, typer.Option(
        "--prefill-chunk", help="Tokens per forward pass in prefill.")] = config.PREFILL_CHUNK,
    bandwidth: Annotated[float | None, typer.Option(
        "--bandwidth", help="Memory bandwidth in GB/s for the floor, instead of measuring "
        "it.")] = None,
    quiet: Annotated[bool, typer.Option(
        "--quiet", "-q", help="No progress on stderr.")] = False,
    debug: DebugOpt = False,
) -> None:
    """Measure prefill and decode speed (llama-bench style), memory and the bandwidth floor."""
    with _errors(debug):
        from . import bench as kbench

        opts = kbench.BenchOptions(
            prompts=kbench.parse_counts(n_prompt, "-p/--n-prompt"),
            gens=kbench.parse_counts(n_gen, "-n/--n-gen"),
            depths=kbench.parse_counts(n_depth, "-d/--n-depth"), repeats=repetitions,
            seed=seed, chunk=chunk, expert_cache=expert_cache, prefetch=not no_prefetch,
            compare=compare)
        opts.validate()
        kbench.plan_tests(opts.prompts, opts.gens, opts.depths)
        spec = resolve_model(model)
        from .model.scripted import PREFIX

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
    verify: Annotated[bool, typer.Option(
        "--verify", help="Also re-hash files downloaded by earlier runs.")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress on stderr.")] = False,
    debug: DebugOpt = False,
) -> None:
    """Download the model's files (only those it needs) into the Hugging Face cache."""
    with _errors(debug):
        from .download import Progress
        from .download import download as fetch

        progress = Progress(sys.stderr, quiet=quiet)
        result = fetch(repo, revision, local_dir, layers=layers, rank=rank, verify_all=verify,
                       progress=progress)
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
        "--expert-cache", help="Expert cache budget to plan for (e.g. 40GB, 25%); default: "
        "auto, from this machine's memory.")] = None,
    bandwidth: Annotated[float | None, typer.Option(
        "--bandwidth", help="Memory bandwidth in GB/s to assume instead of measuring it.")] = None,
    ssd_gbps: Annotated[float | None, typer.Option(
        "--ssd-gbps", help="SSD read speed in GB/s to assume (default: measured on a large "
        "expert pack, else 5).")] = None,
    fmt: Annotated[InfoFormat, typer.Option("--format", "-f", help="text or json.")] = (
        InfoFormat.text),
    debug: DebugOpt = False,
) -> None:
    """What a model is, which files are here, and whether it fits this machine."""
    with _errors(debug):
        from .checkpoint.demo import DEMO_NAME
        from .info import info as model_info
        from .info import render_json, render_text

        spec = str(model_dir(model, quiet=True)) if model == DEMO_NAME else model
        report = model_info(spec, context=context, expert_cache=expert_cache,
                            bandwidth_gbps=bandwidth, ssd_gbps=ssd_gbps)
        (render_json if fmt == InfoFormat.json else render_text)(report, sys.stdout)
        sys.stdout.flush()


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

