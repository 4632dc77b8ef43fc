"""Slash commands of `kimi chat`: each a small function of the chat and its argument text.

Unknown commands and bad values raise `CommandError`, which the REPL prints as one hint line.
"""

from __future__ import annotations

import difflib
import shlex
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING

from rich.table import Table
from rich.text import Text

from .. import config
from .events import ThinkMode
from .status import kilo

if TYPE_CHECKING:
    from .host import ChatHost


class CommandError(Exception):
    """A mistake in a command line: shown as one hint, the chat goes on."""


class Exit(Exception):
    """/exit."""


@dataclass
class Command:
    name: str
    usage: str
    help: str
    run: Callable[[ChatHost, str], None]


COMMANDS: dict[str, Command] = {}
ALIASES = {"quit": "exit", "q": "exit", "?": "help", "new": "clear", "reset": "clear"}


def command(name: str, usage: str, help: str):
    def register(fn: Callable[[ChatHost, str], None]):
        COMMANDS[name] = Command(name, usage, help, fn)
        return fn
    return register


def dispatch(app: ChatHost, line: str) -> None:
    """Run one `/name args` line; raises Exit for /exit, CommandError for mistakes."""
    name, _, arg = line.strip()[1:].partition(" ")
    name = ALIASES.get(name.lower(), name.lower())
    cmd = COMMANDS.get(name)
    if cmd is None:
        close = difflib.get_close_matches(name, list(COMMANDS), n=1)
        hint = f"did you mean /{close[0]}? " if close else ""
        raise CommandError(f"unknown command /{name or ''}: {hint}/help lists the commands")
    cmd.run(app, arg.strip())


def completions() -> list[str]:
    return [f"/{name}" for name in COMMANDS]


# ---------------------------------------------------------------------------------------------
# Settings


SETTINGS = {
    "temperature": (float, lambda v: v >= 0, "a number >= 0 (0 is greedy)"),
    "top_p": (float, lambda v: 0 < v <= 1, "a number in (0, 1]"),
    "min_p": (float, lambda v: 0 <= v < 1, "a number in [0, 1)"),
    "top_k": (int, lambda v: v >= 0, "a whole number >= 0 (0: off)"),
    "max_tokens": (int, lambda v: 1 <= v <= config.CONTEXT_LENGTH,
                   f"a whole number from 1 to {config.CONTEXT_LENGTH}"),
    "seed": (int, lambda v: v >= 0, "a whole number >= 0, or `none`"),
}


def parse_setting(key: str, raw: str) -> tuple[str, float | int | None]:
    key = key.lower().replace("-", "_")
    if key not in SETTINGS:
        close = difflib.get_close_matches(key, list(SETTINGS), n=1)
        hint = f" (did you mean {close[0]}?)" if close else ""
        raise CommandError(f"/set: unknown setting {key!r}{hint}; one of: {', '.join(SETTINGS)}")
    kind, ok, what = SETTINGS[key]
    if key == "seed" and raw.lower() in ("none", "off", "random"):
        return key, None
    try:
        value = kind(raw)
    except ValueError:
        raise CommandError(f"/set {key}: expected {what}, got {raw!r}") from None
    if not ok(value):
        raise CommandError(f"/set {key}: expected {what}, got {raw!r}")
    return key, value


def settings_text(settings) -> str:
    seed = "none" if settings.seed is None else settings.seed
    return (f"temperature {settings.temperature:g} · top_p {settings.top_p:g} · "
            f"min_p {settings.min_p:g} · top_k {settings.top_k} · "
            f"max_tokens {settings.max_tokens} · seed {seed}")


# ---------------------------------------------------------------------------------------------
# The commands


@command("help", "", "list the commands and keys")
def _help(app: ChatHost, arg: str) -> None:
    table = Table.grid(padding=(0, 2))
    table.add_column(style="bold cyan", no_wrap=True)
    table.add_column()
    for cmd in COMMANDS.values():
        table.add_row(Text(f"/{cmd.name}" + (f" {cmd.usage}" if cmd.usage else "")),
                      Text(cmd.help))
    app.console.print(table)
    app.console.print(Text(
        "Enter sends · Alt-Enter or Ctrl-J: new line · \"\"\" opens a block · "
        "Ctrl-X Ctrl-E: $EDITOR · Ctrl-R: search history · Ctrl-C stops a reply · "
        "Ctrl-D exits", style="dim"))
    if app.agent.on:
        app.console.print(Text(f"agent mode: on · {app.agent.describe()}", style="dim"))
    else:
        app.console.print(Text("agent mode: off (/agent on lets the model use tools)",
                               style="dim"))


@command("exit", "", "save and leave (also Ctrl-D)")
def _exit(app: ChatHost, arg: str) -> None:
    raise Exit


@command("clear", "", "start a new conversation")
def _clear(app: ChatHost, arg: str) -> None:
    app.new_session()
    app.console.rule(Text("new conversation", style="dim"), style="grey50")


@command("system", "[TEXT | -]", "show or set the system prompt (`-`: the default)")
def _system(app: ChatHost, arg: str) -> None:
    if not arg:
        current = app.session.system
        label = "system prompt" + ("" if current else " (default)")
        app.note(f"{label}: {current or config.DEFAULT_SYSTEM_PROMPT}")
        return
    app.session.update_header(system=None if arg == "-" else arg)
    app.note("system prompt " + ("reset to the default" if arg == "-" else "set")
             + " (the conversation is processed again on the next turn)")


@command("set", "[KEY VALUE]", "show or change a setting: " + ", ".join(SETTINGS))
def _set(app: ChatHost, arg: str) -> None:
    if not arg:
        app.note(settings_text(app.settings))
        return
    parts = arg.split()
    if len(parts) != 2:
        raise CommandError("/set: usage: /set KEY VALUE, e.g. /set temperature 0.6")
    key, value = parse_setting(*parts)
    setattr(app.settings, key, value)
    app.session.update_header(settings=app.settings_dict())
    app.note(f"{key} = {'none' if value is None else value}")


@command("think", "[show|collapse|hide]", "how reasoning is displayed (remembered)")
def _think(app: ChatHost, arg: str) -> None:
    if not arg:
        app.note(f"reasoning display: {app.think.value} (show, collapse or hide)")
        return
    try:
        mode = ThinkMode(arg.lower())
    except ValueError:
        raise CommandError(f"/think: expected show, collapse or hide, got {arg!r}") from None
    app.set_think(mode)
    app.note(f"reasoning display: {mode.value} (remembered)")


@command("agent", "[on|off]", "agent mode: the model reads, edits and runs things in the "
         "workspace with tools")
def _agent(app: ChatHost, arg: str) -> None:
    if not arg:
        state = f"on · {app.agent.describe()}" if app.agent.on else "off"
        app.note(f"agent mode: {state}")
        return
    if arg.lower() not in ("on", "off"):
        raise CommandError(f"/agent: expected on or off, got {arg!r}")
    from ..agent.sandbox import workspace_problem

    problem = workspace_problem(app.agent.workspace) if arg.lower() == "on" else None
    if problem:  # e.g. a chat started in the home directory
        raise CommandError(f"/agent: {problem} (restart with --agent -w DIR)")
    app.set_agent(arg.lower() == "on")


@command("heavy", "[N | off]", f"answer the next message in heavy mode: N trajectories "
         f"(default {config.HEAVY_TRAJECTORIES}) in one batch, then an aggregate of their answers")
def _heavy(app: ChatHost, arg: str) -> None:
    if arg.lower() == "off":
        app.heavy_next = 0
        app.note("heavy mode off for the next message")
        return
    try:
        n = int(arg) if arg else config.HEAVY_TRAJECTORIES
    except ValueError:
        n = 0
    if n < 1:
        raise CommandError(f"/heavy: expected a number of trajectories >= 1, got {arg!r}")
    app.heavy_next = n
    app.note(f"the next message gets {n} trajectories, then an aggregate of their answers")


@command("retry", "", "answer the last message again")
def _retry(app: ChatHost, arg: str) -> None:
    msgs = app.session.messages
    while msgs and msgs[-1].get("role") in ("assistant", "tool"):  # an agent turn: all its steps
        app.session.pop()
    if not msgs or msgs[-1].get("role") != "user":
        raise CommandError("/retry: there is no message to answer again")
    app.respond()


@command("save", "[NAME]", "save the session and its KV cache now, optionally named")
def _save(app: ChatHost, arg: str) -> None:
    if arg:
        app.session.update_header(name=arg)
    if not app.session.messages:
        app.note("nothing to save yet" + (f"; the session will be named {arg!r}" if arg else ""))
        return
    app.session.save()
    kv = app.save_kv()
    what = f"{kv.tokens:,} tokens of KV cache ({kv.bytes / 1e6:.1f} MB)" if kv else "no KV cache"
    app.note(f"saved session {app.session.id}" + (f" ({arg})" if arg else "")
             + f" · {what} · resume: kimi chat -r {arg or app.session.id}")


@command("load", "ID", "switch to a saved session (id, id prefix or name)")
def _load(app: ChatHost, arg: str) -> None:
    if not arg:
        raise CommandError("/load: which session? /sessions lists them")
    from ..sessions import find_session

    try:
        ref = shlex.split(arg)[0]
    except ValueError:
        ref = arg
    try:
        path = find_session(ref)
    except Exception as e:  # KimiError: not found or ambiguous
        raise CommandError(f"/load: {e}") from None
    app.switch_to(path)


@command("sessions", "", "list saved sessions")
def _sessions(app: ChatHost, arg: str) -> None:
    from ..sessions import list_sessions

    infos = list_sessions()
    if not infos:
        app.note("no saved sessions yet")
        return
    table = Table(box=None, padding=(0, 1), header_style="bold")
    for col in ("", "id", "updated", "messages", "KV", "title"):
        table.add_column(col, no_wrap=col != "title", overflow="ellipsis")
    for info in infos[:20]:
        mark = "●" if info.id == app.session.id else ""
        when = datetime.fromtimestamp(info.updated).strftime("%Y-%m-%d %H:%M")
        kv = f"{info.kv_bytes / 1e6:.1f} MB" if info.kv_bytes else "-"
        table.add_row(*(Text(c) for c in (mark, info.id, when, str(info.messages), kv,
                                          (f"[{info.name}] " if info.name else "") + info.title)))
    app.console.print(table)
    if len(infos) > 20:
        app.note(f"… and {len(infos) - 20} older")


@command("stats", "", "timings of the last reply and of the session")
def _stats(app: ChatHost, arg: str) -> None:
    for line in app.stats_lines():
        app.note(line)


@command("context", "", "how much of the 256K context is used and cached")
def _context(app: ChatHost, arg: str) -> None:
    used, reusable = app.context_usage()
    pct = 100 * used / config.CONTEXT_LENGTH
    app.note(f"conversation: {used:,} tokens of the {kilo(config.CONTEXT_LENGTH)} context "
             f"({pct:.1f}%) · {len(app.session.messages)} messages")
    app.note(f"KV cache: holds {len(app.engine.cached_ids):,} tokens; the next turn reuses "
             f"{reusable:,} of them")


@command("model", "", "the model in use")
def _model(app: ChatHost, arg: str) -> None:
    for line in app.model_lines():
        app.note(line)
