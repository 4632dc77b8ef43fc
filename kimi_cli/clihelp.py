"""How the `kimi` command line presents itself: commands in workflow order, metavars spelled one
way (no value shown for flags), and click's usage errors turned into one `kimi: error:` line.
"""

from __future__ import annotations

import typer.core

# `kimi --help` lists commands as a workflow; commands not named here come last, by name.
COMMAND_ORDER = ("download", "info", "convert", "run", "chat", "serve", "bench")
# Help panels of `kimi run` and `kimi chat`, by parameter name; the rest stay under "Options".
PANELS = {
    "Generation": ("system", "raw", "temperature", "top_p", "min_p", "top_k", "max_tokens",
                   "seed"),
    "Expert cache": ("expert_cache", "no_prefetch", "pin_experts", "save_expert_profile"),
    "Agent": ("agent", "max_steps", "tools", "workspace", "approval", "allow_network",
              "context_limit", "sandbox_allow", "env", "no_sandbox",
              "dangerously_bypass_approvals_and_sandbox", "max_command_timeout"),
    "Output": ("fmt", "print_prompt", "think", "hide_reasoning", "quiet", "color"),
}
PANELED_COMMANDS = ("run", "chat")


class KimiGroup(typer.core.TyperGroup):
    """The top-level group: orders the commands and tidies each command's parameters."""

    def list_commands(self, ctx) -> list[str]:
        return sorted(super().list_commands(ctx), key=command_rank)

    def get_command(self, ctx, cmd_name: str):
        cmd = super().get_command(ctx, cmd_name)
        if cmd is not None:
            tidy_params(cmd, ctx)
            if cmd_name in PANELED_COMMANDS:
                group_params(cmd)
        return cmd

    def format_help(self, ctx, formatter) -> None:
        tidy_params(self, ctx)
        super().format_help(ctx, formatter)


def command_rank(name: str) -> tuple[int, str]:
    return (COMMAND_ORDER.index(name) if name in COMMAND_ORDER else len(COMMAND_ORDER), name)


def tidy_params(cmd, ctx) -> None:
    """Flags show no metavar (`--quiet`, not `--quiet <bool>`); arguments are spelled in
    capitals everywhere (usage line, panel, errors): PROMPT, SRC, ID."""
    help_option = cmd.get_help_option(ctx)
    for param in [*cmd.params, *([help_option] if help_option is not None else [])]:
        if param.metavar is not None:
            continue
        if getattr(param, "is_flag", False):
            param.metavar = ""
        elif param.param_type_name == "argument":
            param.metavar = param.name.upper()


def group_params(cmd) -> None:
    """Put run's and chat's options in PANELS, shown in PANELS' order after the plain Options
    (help lists panels in the order of their first parameter)."""
    panel_of = {name: panel for panel, names in PANELS.items() for name in names}
    for param in cmd.params:
        if getattr(param, "rich_help_panel", None) is None and param.name in panel_of:
            param.rich_help_panel = panel_of[param.name]
    order = list(PANELS)
    cmd.params.sort(key=lambda p: order.index(p.rich_help_panel)
                    if getattr(p, "rich_help_panel", None) in order else -1)


def usage_message(exc, command: str = "kimi") -> str:
    """One line for a click usage error, in kimi's words (no Usage: block, no pydantic); empty
    when click has already shown the help instead (`kimi` alone)."""
    from typer._click import exceptions as ce

    if isinstance(exc, ce.NoArgsIsHelpError):
        return ""
    param = getattr(exc, "param", None)
    if isinstance(exc, ce.NoSuchOption):
        close = sorted(exc.possibilities or [])
        hint = f"; did you mean {_either(close)}?" if close else ""
        return f"no such option {exc.option_name}{hint} (see {command} --help)"
    if isinstance(exc, ce.MissingParameter) and param is not None:
        return f"missing {_param_name(param)} (see {command} --help)"
    if isinstance(exc, ce.BadParameter) and param is not None:
        name = _param_name(param)
        desc = getattr(param, "type_descriptor", None)
        choices = getattr(desc, "choices", None)
        if choices:
            values = [str(getattr(c, "value", c)) for c in choices]
            return f"{name} must be {_either(values)}"
        annotation = getattr(desc, "annotation", None)
        if annotation is float:
            return f"{name} must be a number"
        if annotation is int:
            return f"{name} must be a whole number"
    text = exc.format_message().strip().rstrip(".")
    text = text[:1].lower() + text[1:]
    return f"{text} (see {command} --help)"


def _param_name(param) -> str:
    if param.param_type_name == "argument":
        return param.metavar or param.name.upper()
    longs = [o for o in param.opts if o.startswith("--")]
    return longs[0] if longs else param.opts[0]


def _either(values: list[str]) -> str:
    return values[0] if len(values) == 1 else ", ".join(values[:-1]) + " or " + values[-1]
