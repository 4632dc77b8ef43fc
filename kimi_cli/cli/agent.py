"""`kimi run --agent`: flags to an agent configuration (tools, approval, sandbox), and the
run itself with its renderer, approvals and exit codes.
"""

from __future__ import annotations

import sys
from pathlib import Path

from .. import config
from ..errors import UsageError
from .common import _err, _print_prompt
from .options import Approval, Format


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
    from ..agent.tools import select

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

    from ..agent import sandbox

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
    from ..agent import frontend
    from ..agent.approval import Mode, Policy, StreamApprover
    from ..agent.loop import Agent, AgentConfig
    from ..agent.tools import ToolContext
    from ..engine import Engine

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
        from ..ui.events import ThinkMode
        from ..ui.render import LiveRenderer, make_renderer
        from ..ui.term import make_console

        renderer = make_renderer(make_console(sys.stdout, color), make_console(sys.stderr, color),
                                 think=ThinkMode(think), quiet=quiet)
        live = isinstance(renderer, LiveRenderer)
    import contextlib

    from ..ui.term import no_echo, wait_for_reader

    # Keys typed while panels stream would be echoed into them and tear them: they wait.
    with no_echo() if terminal else contextlib.nullcontext():
        done = frontend.run(agent, task, fmt.value, renderer=renderer, live=live, quiet=quiet,
                            settle=lambda: wait_for_reader(sys.stdout))
    frontend.check_done(done)


def _typed_after_the_question(ask):
    """The approval question reads a line typed after it appears (keys typed ahead are
    dropped, so they cannot answer it), with echo and line editing on."""
    from ..ui.term import line_input

    def approver(request):
        with line_input():
            return ask(request)
    return approver


def _warn_bypass(opts: dict) -> None:
    if opts["sandbox"].bypass:
        _err("kimi: WARNING: --dangerously-bypass-approvals-and-sandbox: the model's commands "
             "run unasked and unconfined, with your files, keys and network")
