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
from .clihelp import KimiGroup, usage_message
from .errors import KimiError, UsageError

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
    if prompt == "-" or prompt is None:
        if not piped:
            raise UsageError("`-` reads the prompt from stdin, but stdin is a terminal"
                             if prompt else
                             'no prompt: give one (kimi run "...") or pipe it on stdin')
        text = stdin.read().rstrip("\r\n")  # the newline that ends the input is not prompt
        if not text.strip():
            raise UsageError("the prompt read from stdin is empty")
        return text
    if not prompt.strip():
        raise UsageError('the prompt is empty: give one (kimi run "...") or pipe it on stdin')
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


def model_dir(spec: str, quiet: bool, tokens_note: bool = False):
    """A local directory for --model: `demo` (built once), a directory or a cached Hub id.
    `tokens_note`: say that the demo stops at DEMO_MAX_TOKENS (no -n was given)."""
    from .checkpoint.demo import DEMO_NAME, ensure_demo_model
    from .checkpoint.reader import resolve_model_path

    if spec == DEMO_NAME:
        if not quiet:
            stop = (f"; it stops after {config.DEMO_MAX_TOKENS} tokens unless -n says otherwise"
                    if tokens_note else "")
            _err("kimi: using the built-in demo model: random weights, so the text is gibberish "
                 f"(it shows the whole pipeline working without the 594 GB download){stop}")
        return ensure_demo_model(progress=None if quiet else _err)
    return resolve_model_path(spec)


# Options shared by several commands (one definition, one help text).
SystemOpt = Annotated[str | None, typer.Option("--system", "-s", help="System prompt.")]
ExpertCacheOpt = Annotated[str | None, typer.Option(
        "--expert-cache", help="Hold this much of the routed experts in memory and stream the "
        "rest from the download (or an expert pack): a size (40GB), a share of machine memory "
        "(25%), a share of the experts (25%experts), off (all resident) or auto (default: "
        "stream only when the model would not fit).")]
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
SandboxAllowOpt = Annotated[list[str] | None, typer.Option(
        "--sandbox-allow", metavar="PATH[:ro|:rw]", help="Agent: let commands also see this path "
        "(read-only unless :rw), e.g. ~/.local:ro for tools installed there. Repeatable.")]
EnvOpt = Annotated[list[str] | None, typer.Option(
        "--env", metavar="NAME[=VALUE]", help="Agent: pass this variable (kimi's value, or "
        "VALUE) to commands, which otherwise get only PATH, HOME, locale, TERM, TZ and a few "
        "more. Repeatable.")]
NoSandboxOpt = Annotated[bool, typer.Option(
        "--no-sandbox", help="Agent: run commands unsandboxed (approval is then the only "
        "protection; not with --approval yolo).")]
BypassOpt = Annotated[bool, typer.Option(
        "--dangerously-bypass-approvals-and-sandbox", help="Agent: run every command without "
        "asking and without a sandbox, with all your files, keys and network. For throwaway "
        "machines only.")]
MaxCommandTimeoutOpt = Annotated[float | None, typer.Option(
        "--max-command-timeout", metavar="SECONDS", help=f"Agent: the longest a command may "
        f"run (default {config.AGENT_SHELL_MAX_TIMEOUT:g} s).")]
DebugOpt = Annotated[bool, typer.Option("--debug", help="Tracebacks on errors.")]
# Sampling flags of run and chat (chat's defaults come from the resumed session, if any).
TEMPERATURE_HELP = "Sampling temperature; 0 always picks the most likely token (greedy)."
TOP_P_HELP = ("Nucleus sampling: sample from the most likely tokens whose probabilities add up "
              "to P (1 disables it).")
MIN_P_HELP = "Drop tokens less likely than MIN_P times the most likely one (0 disables it)."
TOP_K_HELP = "Sample from the K most likely tokens only (0 disables it)."
MAX_TOKENS_HELP = "Most tokens to generate: reasoning, answer and tool calls together."
SEED_HELP = ("Random seed (0 to 2^64-1): the same seed, prompt and flags give the same "
             "text.")
THINK_HELP = ("Reasoning display: show, collapse or hide (default: the last one chosen with "
              "/think in kimi chat, else show).")


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
    temperature: Annotated[float, typer.Option(
        "--temperature", "-t", help=TEMPERATURE_HELP)] = config.DEFAULT_TEMPERATURE,
    top_p: Annotated[float, typer.Option("--top-p", help=TOP_P_HELP)] = config.DEFAULT_TOP_P,
    min_p: Annotated[float, typer.Option("--min-p", help=MIN_P_HELP)] = config.DEFAULT_MIN_P,
    top_k: Annotated[int, typer.Option("--top-k", help=TOP_K_HELP)] = config.DEFAULT_TOP_K,
    max_tokens: Annotated[int | None, typer.Option(
        "--max-tokens", "-n", help=MAX_TOKENS_HELP,
        show_default=f"{config.DEFAULT_MAX_TOKENS}; {config.DEMO_MAX_TOKENS} with --model demo",
    )] = None,
    seed: Annotated[int | None, typer.Option(
        "--seed", help=SEED_HELP, show_default="random")] = None,
    fmt: Annotated[Format, typer.Option(
        "--format", "-f", help="text, json (one document) or jsonl (one event per line).")] = (
        Format.text),
    print_prompt: Annotated[bool, typer.Option(
        "--print-prompt", help="Print the rendered prompt and exit.")] = False,
    think: Annotated[Think | None, typer.Option("--think", help=THINK_HELP)] = None,
    hide_reasoning: Annotated[bool, typer.Option(
        "--hide-reasoning", help="Same as --think hide.")] = False,
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
    sandbox_allow: SandboxAllowOpt = None,
    env: EnvOpt = None,
    no_sandbox: NoSandboxOpt = False,
    dangerously_bypass_approvals_and_sandbox: BypassOpt = False,
    max_command_timeout: MaxCommandTimeoutOpt = None,
    context_limit: Annotated[int | None, typer.Option(
        "--context-limit", help="Agent: context tokens; near it, old tool results are elided "
        f"(default {config.CONTEXT_LENGTH}).")] = None,
    heavy: Annotated[bool, typer.Option(
        "--heavy", help="Heavy mode: several trajectories of the prompt decoded as one batch "
        "(each with its own seed), then an aggregation turn that reads their answers.")] = False,
    trajectories: Annotated[int | None, typer.Option(
        "--trajectories", help=f"Heavy mode: how many trajectories (default "
        f"{config.HEAVY_TRAJECTORIES}); implies --heavy.")] = None,
    debug: DebugOpt = False,
) -> None:
    """Answer one prompt: the answer on stdout, reasoning and stats on stderr."""
    from .checkpoint.demo import DEMO_NAME
    from .engine import SamplingSettings

    settings = SamplingSettings(temperature=temperature, top_p=top_p, min_p=min_p,
                                top_k=top_k, max_tokens=max_tokens or config.DEFAULT_MAX_TOKENS,
                                seed=seed)
    agent_flags = dict(max_steps=max_steps, tools=tools, workspace=workspace,
                       approval=approval, allow_network=allow_network,
                       context_limit=context_limit, sandbox_allow=sandbox_allow, env=env,
                       no_sandbox=no_sandbox, max_command_timeout=max_command_timeout,
                       dangerously_bypass_approvals_and_sandbox=(
                           dangerously_bypass_approvals_and_sandbox))
    with _errors(debug):
        settings.validate()
        _check_expert_cache(expert_cache)
        agent_opts = _agent_options(agent, raw, **agent_flags)
        n_heavy = _heavy_count(heavy, trajectories, agent, raw)
        text = read_prompt(prompt)
        think_mode = _think_mode(think, hide_reasoning)
        spec = resolve_model(model)
        if spec == DEMO_NAME and max_tokens is None:
            settings.max_tokens = config.DEMO_MAX_TOKENS
        from .model.scripted import PREFIX, load_scripted

        scripted = spec.startswith(PREFIX)
        if scripted:
            from .checkpoint.demo import ensure_tokenizer_dir

            path = ensure_tokenizer_dir()
        else:
            path = model_dir(spec, quiet or fmt != Format.text or print_prompt,
                             tokens_note=max_tokens is None)
        if print_prompt or scripted:  # only the tokenizer and the chat template
            from .tokenizer import Tokenizer

            mdl, tok = None, Tokenizer.from_dir(path)
            if scripted:
                mdl = load_scripted(spec, tok)
        else:
            from .loader import load

            pinned = _read_profile(pin_experts) if pin_experts else None
            notes: list[str] = []  # printed after the spinner, not through it
            with _loading(path, quiet or fmt != Format.text, color):
                mdl, tok = load(path, expert_cache=expert_cache, prefetch=not no_prefetch,
                                pinned=pinned, log=notes.append, kv_sequences=max(1, n_heavy))
            for note in notes if not quiet else []:
                _err(note)
        if agent_opts is not None:
            _run_agent(mdl, tok, text, system, settings, fmt, print_prompt, quiet,
                       think_mode, agent_opts, color.value)
            return
        if raw:
            prompt_text = text
        else:
            from .chat.template import render

            messages = ([{"role": "system", "content": system}] if system else [])
            messages.append({"role": "user", "content": text})
            prompt_text = render(messages, template=tok.chat_template)
        if print_prompt:
            _print_prompt(prompt_text)
            return
        if n_heavy:
            from .heavy_cli import run_heavy_command

            run_heavy_command(mdl, tok, text, system, settings, n_heavy, fmt.value, spec,
                              think_mode, quiet, color.value)
            return
        ids = tok.encode(prompt_text)
        _generate(mdl, tok, ids, settings, fmt, spec, raw=raw, think=think_mode, quiet=quiet,
                  color=color)
        if save_expert_profile is not None:
            if mdl.expert_cache is None:
                raise UsageError("--save-expert-profile needs the expert cache (--expert-cache)")
            save_expert_profile.write_text(json.dumps(
                {str(k): v for k, v in mdl.expert_cache.profile().items()}, indent=1))


def _heavy_count(heavy: bool, trajectories: int | None, agent: bool, raw: bool) -> int:
    """Trajectories of a heavy run (0: not one). `--heavy` is a flag and the count its own
    option, since an optional value would swallow the PROMPT after it."""
    if trajectories is None and not heavy:
        return 0
    n = config.HEAVY_TRAJECTORIES if trajectories is None else trajectories
    if n < 1:
        raise UsageError("--trajectories must be >= 1")
    if agent:
        raise UsageError("--heavy does not combine with --agent")
    if raw:
        raise UsageError("--heavy needs the chat template (drop --raw)")
    return n


def _check_expert_cache(value: str | None) -> None:
    """A malformed --expert-cache value is a usage error, found before any model loads."""
    from .experts.cache import parse_cache_spec

    parse_cache_spec(value)


def _think_mode(think: Think | None, hide_reasoning: bool) -> str:
    """--think, --hide-reasoning (its old spelling), the mode remembered by /think, or show."""
    if hide_reasoning:
        if think not in (None, Think.hide):
            raise UsageError(f"--hide-reasoning and --think {think.value} contradict each other")
        return Think.hide.value
    if think is not None:
        return think.value
    from .ui.prefs import read_prefs

    remembered = read_prefs().get("think")
    return remembered if remembered in [m.value for m in Think] else Think.show.value


def _print_prompt(text: str) -> None:
    """The rendered prompt, ending in a newline like any text output."""
    sys.stdout.write(text if text.endswith("\n") else text + "\n")
    sys.stdout.flush()


def _agent_options(agent: bool, raw: bool, **flags) -> dict | None:
    """The agent flags, checked before any model loads; None without --agent."""
    if not agent:
        given = [k for k, v in flags.items() if v not in (None, False, [], ())]
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
    opts["sandbox"] = _sandbox_options(opts)
    return opts


def _sandbox_options(opts: dict):
    """The sandbox the agent's commands run in; yolo without one needs the alarming flag."""
    import re

    from .agent import sandbox

    problem = sandbox.workspace_problem(opts["workspace"])
    if problem:
        raise UsageError(f"--workspace: {problem}")
    grants = []
    for spec in opts["sandbox_allow"] or ():
        try:
            grants.append(sandbox.parse_grant(spec))
        except ValueError as e:
            raise UsageError(f"--sandbox-allow: {e}") from None
    for spec in opts["env"] or ():
        if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*(=.*)?", spec, re.DOTALL):
            raise UsageError(f"--env: {spec!r} is not NAME or NAME=VALUE")
    limit = opts["max_command_timeout"]
    if limit is not None and not limit > 0:
        raise UsageError("--max-command-timeout must be more than 0 seconds")
    bypass = opts["dangerously_bypass_approvals_and_sandbox"]
    if bypass:
        if opts["approval"] not in (None, Approval.yolo):
            raise UsageError("--dangerously-bypass-approvals-and-sandbox means --approval yolo "
                             f"without a sandbox; it does not go with --approval "
                             f"{opts['approval'].value}")
        opts["approval"] = Approval.yolo
    chosen = sandbox.choose(opts["allow_network"], tuple(grants), tuple(opts["env"] or ()),
                            disabled=bypass or opts["no_sandbox"], bypass=bypass)
    if opts["approval"] == Approval.yolo and chosen.kind == "none" and not bypass:
        why = "--no-sandbox was given" if opts["no_sandbox"] else sandbox.why_none()
        raise UsageError(
            f"--approval yolo runs every command unasked, so it needs a sandbox, and there is "
            f"none: {why}. Use --approval auto-edit or ask, or, on a machine you can lose, "
            "--dangerously-bypass-approvals-and-sandbox")
    return chosen


def _run_agent(mdl, tok, task: str, system: str | None, settings, fmt: Format,
               print_prompt: bool, quiet: bool, think: str, opts: dict,
               color: str = "auto") -> None:
    from .agent import frontend
    from .agent.approval import Mode, Policy, StreamApprover
    from .agent.loop import Agent, AgentConfig
    from .agent.tools import ToolContext
    from .engine import Engine

    cfg = AgentConfig(system_prompt=system)
    if opts["max_steps"] is not None:
        cfg.max_steps = opts["max_steps"]
    if opts["context_limit"] is not None:
        cfg.context_limit = opts["context_limit"]
    ctx = ToolContext(opts["workspace"], opts["sandbox"],
                      shell_max_timeout=opts["max_command_timeout"] or config.AGENT_SHELL_MAX_TIMEOUT)
    _warn_bypass(opts)
    terminal = sys.stdin.isatty() and sys.stderr.isatty()
    policy = Policy(Mode((opts["approval"] or Approval.ask).value),
                    _typed_after_the_question(StreamApprover()) if terminal else None)
    agent = Agent(Engine(mdl, tok) if mdl is not None else None, opts["tools"], ctx, policy,
                  settings, cfg, tokenizer=tok)
    if print_prompt:
        agent.messages.append({"role": "user", "content": task})
        _print_prompt(tok.decode(agent.prompt_ids()))
        return
    renderer, live = None, False
    if fmt == Format.text:  # the agent draws on the chat UI's renderer; it does not know it
        from .ui.events import ThinkMode
        from .ui.render import LiveRenderer, make_renderer
        from .ui.term import make_console

        renderer = make_renderer(make_console(sys.stdout, color), make_console(sys.stderr, color),
                                 think=ThinkMode(think), quiet=quiet)
        live = isinstance(renderer, LiveRenderer)
    import contextlib

    from .ui.term import no_echo, wait_for_reader

    # Keys typed while panels stream would be echoed into them and tear them: they wait.
    with no_echo() if terminal else contextlib.nullcontext():
        done = frontend.run(agent, task, fmt.value, renderer=renderer, live=live, quiet=quiet,
                            settle=lambda: wait_for_reader(sys.stdout))
    frontend.check_done(done)


def _typed_after_the_question(ask):
    """The approval question reads a line typed after it appears (keys typed ahead are
    dropped, so they cannot answer it), with echo and line editing on."""
    from .ui.term import line_input

    def approver(request):
        with line_input():
            return ask(request)
    return approver


def _warn_bypass(opts: dict) -> None:
    if opts["sandbox"].bypass:
        _err("kimi: WARNING: --dangerously-bypass-approvals-and-sandbox: the model's commands "
             "run unasked and unconfined, with your files, keys and network")


def _generate(mdl, tok, ids, settings, fmt: Format, model_name: str, raw: bool,
              think: str, quiet: bool, color: Color = Color.auto) -> None:
    import contextlib

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
                                 think=ThinkMode(think), quiet=quiet)

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
    from .ui.term import is_tty, no_echo

    try:
        # Keys typed on the terminal while panels stream would be echoed into them: they wait.
        with no_echo() if renderer is not None and is_tty(sys.stdin) else contextlib.nullcontext():
            reply = generate_reply(Engine(mdl, tok), tok, ids, settings, on_event, raw=raw)
    except BaseException:
        if renderer is not None:
            renderer.finish("error")
        raise
    if renderer is not None:
        renderer.finish(reply.finish_reason)
    if reply.finish_reason == "interrupted" and fmt == Format.text:
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
    plan = getattr(mdl, "expert_plan", None)
    if cache is not None or (plan is not None and plan.explicit):
        result["expert_cache"] = {**(plan.to_dict() if plan is not None else {}),
                                  **(cache.stats.to_dict() if cache is not None else {})}
    if fmt == Format.json:
        out.write(json.dumps(result, ensure_ascii=False) + "\n")
        out.flush()
    elif fmt == Format.jsonl:
        emit({"type": "stats", **st.to_dict(),
              **({"expert_cache": result["expert_cache"]} if "expert_cache" in result else {})})
        emit({"type": "done", "finish_reason": reply.finish_reason})
    if reply.finish_reason == "interrupted":  # the document is out; still exit 130
        raise KeyboardInterrupt
    if fmt != Format.text:
        return
    if not quiet:
        from .ui.term import wait_for_reader

        wait_for_reader(out)  # `kimi run ... | cat` on a terminal: the answer's end comes first
        # One token has no decode rate: the first token's time is prefill (time to first token).
        decode = f"{st.generation_tps:.1f} tok/s" if st.generation_tokens > 1 else "— tok/s"
        _err(f"[{st.prompt_tokens} prompt tokens ({st.reused_tokens} reused), "
             f"{st.prompt_tps:.1f} tok/s | {st.generation_tokens} generated, "
             f"{decode} | peak {st.peak_memory_gb:.2f} GB | {reply.finish_reason}]")
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
        from .checkpoint.demo import DEMO_NAME

        if src == DEMO_NAME and not verify:  # as every other command accepts it
            src = str(model_dir(src, quiet=True))
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
    temperature: Annotated[float | None, typer.Option(
        "--temperature", "-t", help=TEMPERATURE_HELP,
        show_default=f"{config.DEFAULT_TEMPERATURE}, or the resumed session's")] = None,
    top_p: Annotated[float | None, typer.Option(
        "--top-p", help=TOP_P_HELP,
        show_default=f"{config.DEFAULT_TOP_P}, or the resumed session's")] = None,
    min_p: Annotated[float | None, typer.Option(
        "--min-p", help=MIN_P_HELP,
        show_default=f"{config.DEFAULT_MIN_P}, or the resumed session's")] = None,
    top_k: Annotated[int | None, typer.Option(
        "--top-k", help=TOP_K_HELP,
        show_default=f"{config.DEFAULT_TOP_K}, or the resumed session's")] = None,
    max_tokens: Annotated[int | None, typer.Option(
        "--max-tokens", "-n", help=MAX_TOKENS_HELP,
        show_default=f"{config.DEFAULT_MAX_TOKENS}, or the resumed session's")] = None,
    seed: Annotated[int | None, typer.Option(
        "--seed", help=SEED_HELP, show_default="random")] = None,
    think: Annotated[Think | None, typer.Option("--think", help=THINK_HELP)] = None,
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
    sandbox_allow: SandboxAllowOpt = None,
    env: EnvOpt = None,
    no_sandbox: NoSandboxOpt = False,
    dangerously_bypass_approvals_and_sandbox: BypassOpt = False,
    max_command_timeout: MaxCommandTimeoutOpt = None,
    debug: DebugOpt = False,
) -> None:
    """Chat in the terminal: reasoning and answer in separate live panels, sessions saved."""
    with _errors(debug):
        _check_expert_cache(expert_cache)
        agent_opts = _agent_options(agent, False, max_steps=max_steps, tools=tools,
                                    workspace=workspace, approval=approval,
                                    allow_network=allow_network, context_limit=None,
                                    sandbox_allow=sandbox_allow, env=env, no_sandbox=no_sandbox,
                                    max_command_timeout=max_command_timeout,
                                    dangerously_bypass_approvals_and_sandbox=(
                                        dangerously_bypass_approvals_and_sandbox))
        if agent_opts is not None:
            _warn_bypass(agent_opts)
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
    from .ui.agent_mode import AgentMode
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
    from .checkpoint.demo import DEMO_NAME

    demo_length = spec == DEMO_NAME and flags["max_tokens"] is None and "max_tokens" not in saved
    if demo_length:
        settings.max_tokens = config.DEMO_MAX_TOKENS
    mdl, tok, path = _load_model(spec, color, expert_cache=expert_cache, tokens_note=demo_length)
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


def _load_model(spec: str, color: Color = Color.auto, expert_cache: str | None = None,
                tokens_note: bool = False):
    """(model, tokenizer, directory) for a --model spec; a spinner while the weights load."""
    from .model.scripted import PREFIX, load_scripted
    from .tokenizer import Tokenizer

    if spec.startswith(PREFIX):
        from .checkpoint.demo import ensure_tokenizer_dir

        tok = Tokenizer.from_dir(ensure_tokenizer_dir())
        return load_scripted(spec, tok), tok, None
    path = model_dir(spec, quiet=False, tokens_note=tokens_note)
    from .loader import load

    notes: list[str] = []  # printed after the spinner, not through it
    with _loading(path, False, color):
        mdl, tok = load(path, expert_cache=expert_cache, log=notes.append)
    for note in notes:
        _err(note)
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
    parallel: Annotated[int, typer.Option(
        "--parallel", "-np", help="Sequences decoded at once: concurrent requests (and a "
        "request's n choices) share one batch; 1 runs requests one at a time.")] = (
        config.SERVE_PARALLEL),
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
        for name, value in (("--context-limit", context_limit), ("--max-queue", max_queue),
                            ("--parallel", parallel)):
            if value < 1:
                raise UsageError(f"{name} must be at least 1")
        if not model_name.strip():
            raise UsageError("--model-name must not be empty")
        _check_expert_cache(expert_cache)
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
            notes: list[str] = []  # printed after the spinner, not through it
            with _loading(path, False):
                mdl, tok = load(path, expert_cache=expert_cache, prefetch=not no_prefetch,
                                pinned=pinned, log=notes.append)
            for note in notes:
                _err(note)
        if host not in ("127.0.0.1", "localhost", "::1") and api_key is None:
            _err(f"kimi: warning: listening on {host} without --api-key: anyone who can reach "
                 "this port can use the model")
        from .batch import check_batch_fits

        check_batch_fits(mdl, parallel, context_limit, remedy="use a lower --parallel, a "
                         "lower --context-limit or a smaller --expert-cache")
        served = Served(tok, model_name, {spec, Path(spec).name}, context_limit,
                        reasoning_field.value, parallel)
        run_server(served, Engine(mdl, tok), host, port, api_key, max_queue, parallel)


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
            compare=compare, batches=kbench.parse_counts(batch, "-b/--batch"))
        opts.validate()
        from .experts.cache import parse_cache_spec

        parse_cache_spec(expert_cache)  # before any measuring
        kbench.plan_tests(opts.prompts, opts.gens, opts.depths, opts.batches)
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
        from .checkpoint.demo import DEMO_NAME
        from .info import info as model_info
        from .info import render_json, render_text

        _check_expert_cache(expert_cache)
        spec = str(model_dir(model, quiet=True)) if model == DEMO_NAME else model
        report = model_info(spec, context=context, expert_cache=expert_cache,
                            bandwidth_gbps=bandwidth, ssd_gbps=ssd_gbps,
                            trajectories=trajectories)
        (render_json if fmt == InfoFormat.json else render_text)(report, sys.stdout)
        sys.stdout.flush()


def main() -> None:
    from typer._click.exceptions import ClickException

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


if __name__ == "__main__":
    main()

