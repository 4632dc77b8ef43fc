"""Option types and help texts shared by several commands (sampling, agent, output).
One declaration per flag, so `run`, `chat` and `serve` spell and explain it alike.
"""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Annotated

import typer

from .. import config


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
NoPrefetchOpt = Annotated[bool, typer.Option(
    "--no-prefetch", help="Expert cache: do not prefetch the next layer's experts.")]
PinExpertsOpt = Annotated[Path | None, typer.Option(
    "--pin-experts", help="Expert cache: keep the experts listed in this profile resident "
    "(a JSON file written by --save-expert-profile).")]
DebugOpt = Annotated[bool, typer.Option("--debug", help="Tracebacks on errors.")]
# Several machines (kimi_cli.distributed). `kimi serve` takes the same two options and calls
# _distributed(hostfile, split) first, as run, chat and bench do.
SplitOpt = Annotated[str | None, typer.Option(
        "--split", help="Several machines: layers per rank, `auto` (default: in proportion to "
        "each machine's memory) or explicit, e.g. 30,31.")]
HostfileOpt = Annotated[Path | None, typer.Option(
        "--hostfile", help="Several machines: run this command on every host of this mlx.launch "
        "hostfile (see mlx.distributed_config), pipelined by layers.")]
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
