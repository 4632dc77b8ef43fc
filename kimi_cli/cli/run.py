"""`kimi run`: one prompt answered on stdout, reasoning and stats on stderr, or a json/jsonl
document; heavy mode and agent runs branch off here.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated

import typer

from .. import config
from ..errors import UsageError
from .agent import _agent_options, _run_agent
from .app import app
from .common import (
    _check_expert_cache,
    _distributed,
    _err,
    _errors,
    _loading,
    _print_prompt,
    _read_profile,
    _think_mode,
    model_dir,
    read_prompt,
    resolve_model,
)
from .options import (
    MAX_TOKENS_HELP,
    MIN_P_HELP,
    SEED_HELP,
    TEMPERATURE_HELP,
    THINK_HELP,
    TOP_K_HELP,
    TOP_P_HELP,
    AllowNetworkOpt,
    ApprovalOpt,
    BypassOpt,
    Color,
    DebugOpt,
    EnvOpt,
    ExpertCacheOpt,
    Format,
    HostfileOpt,
    MaxCommandTimeoutOpt,
    NoPrefetchOpt,
    NoSandboxOpt,
    PinExpertsOpt,
    SandboxAllowOpt,
    SplitOpt,
    SystemOpt,
    Think,
    ToolsOpt,
    WorkspaceOpt,
)


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
    no_prefetch: NoPrefetchOpt = False,
    pin_experts: PinExpertsOpt = None,
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
    split: SplitOpt = None,
    hostfile: HostfileOpt = None,
    debug: DebugOpt = False,
) -> None:
    """Answer one prompt: the answer on stdout, reasoning and stats on stderr."""
    from ..checkpoint.demo import DEMO_NAME
    from ..engine import SamplingSettings

    with _errors(debug):
        _distributed(hostfile, split)

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
        from ..distributed.group import is_follower, launched

        if n_heavy and launched():
            raise UsageError("--heavy runs on one machine for now: batched decoding through a "
                             "pipeline of several is not built yet")

        text = "" if is_follower() else read_prompt(prompt)  # ranks > 0 never read stdin
        think_mode = _think_mode(think, hide_reasoning)
        spec = resolve_model(model)
        if spec == DEMO_NAME and max_tokens is None:
            settings.max_tokens = config.DEMO_MAX_TOKENS
        from ..model.scripted import PREFIX, load_scripted

        scripted = spec.startswith(PREFIX)
        if scripted:
            from ..checkpoint.demo import ensure_tokenizer_dir

            path = ensure_tokenizer_dir()
        else:
            path = model_dir(spec, quiet or fmt != Format.text or print_prompt,
                             tokens_note=max_tokens is None)
        if print_prompt or scripted:  # only the tokenizer and the chat template
            from ..tokenizer import Tokenizer

            mdl, tok = None, Tokenizer.from_dir(path)
            if scripted:
                mdl = load_scripted(spec, tok)
        else:
            from ..loader import load

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
            from ..chat.template import render

            messages = ([{"role": "system", "content": system}] if system else [])
            messages.append({"role": "user", "content": text})
            prompt_text = render(messages, template=tok.chat_template)
        if print_prompt:
            _print_prompt(prompt_text)
            return
        if n_heavy:
            from ..heavy_cli import run_heavy_command

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


def _generate(mdl, tok, ids, settings, fmt: Format, model_name: str, raw: bool,
              think: str, quiet: bool, color: Color = Color.auto) -> None:
    import contextlib

    from ..chat.parser import ReasoningDelta, TextDelta, ToolCall
    from ..chat.reply import generate_reply
    from ..engine import Engine, PrefillProgress

    out = sys.stdout
    renderer = None
    if fmt == Format.text:
        # Live panels on a terminal, plain streams in pipes (the answer alone on stdout).
        from ..ui.events import ThinkMode
        from ..ui.render import make_renderer
        from ..ui.term import make_console

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
    from ..ui.term import is_tty, no_echo

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
    if hasattr(mdl, "distributed_stats"):  # pipelined over several ranks
        result["distributed"] = mdl.distributed_stats()
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
        from ..ui.term import wait_for_reader

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


def _call_dict(c) -> dict:
    d = {"id": c.id, "name": c.name, "index": c.index, "arguments": c.arguments,
         "raw_arguments": c.raw_arguments}
    if c.error:
        d["error"] = c.error
    return d
