"""`kimi chat`: flags and sessions resolved, then the REPL (`ui.repl.ChatApp`) started.
Sampling flags left unset come from the resumed session.
"""

from __future__ import annotations

import sys
from typing import Annotated

import typer

from .. import config
from ..errors import UsageError
from .agent import _agent_options, _warn_bypass
from .app import app
from .common import _check_expert_cache, _distributed, _err, _errors, _load_model, resolve_model
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
    HostfileOpt,
    MaxCommandTimeoutOpt,
    NoSandboxOpt,
    SandboxAllowOpt,
    SplitOpt,
    SystemOpt,
    Think,
    ToolsOpt,
    WorkspaceOpt,
)


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
    split: SplitOpt = None,
    hostfile: HostfileOpt = None,
    debug: DebugOpt = False,
) -> None:
    """Chat in the terminal: reasoning and answer in separate live panels, sessions saved."""
    with _errors(debug):
        _distributed(hostfile, split)
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

    from ..engine import SamplingSettings
    from ..sessions import Session, find_session, latest_session
    from ..ui.agent_mode import AgentMode
    from ..ui.events import ThinkMode
    from ..ui.prefs import read_prefs
    from ..ui.repl import ChatApp, make_reader, pick_session
    from ..ui.term import make_console

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
    from ..checkpoint.demo import DEMO_NAME

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
