"""The `kimi chat` loop: read a message or a slash command, stream the reply (in agent mode, run
the agent: agent_turn.py), save the session.

Ctrl-C stops a reply (what was written stays in the conversation); at an empty prompt it says how
to leave; Ctrl-D or /exit leave with exit code 0, saving the session's KV cache for a fast resume.
"""

from __future__ import annotations

import sys
import traceback
from dataclasses import asdict, replace
from pathlib import Path

from rich.console import Console
from rich.markdown import Markdown
from rich.text import Text

from .. import config
from ..chat.reply import Reply, generate_reply
from ..chat.template import render
from ..engine import Engine, PrefillProgress, SamplingSettings, common_prefix
from ..errors import KimiError
from ..sessions import KVInfo, KVMismatch, Session, load_kv, model_fingerprint, save_kv
from . import commands
from .agent_mode import AgentMode
from .agent_turn import prompt_ids as agent_prompt_ids
from .agent_turn import run_turn
from .events import ThinkMode, ToolResult
from .input import LineReader, PromptReader, unwrap
from .prefs import write_pref
from .render import (
    ANSWER_STYLE,
    Frame,
    make_renderer,
    reason_label,
    tool_call_panel,
    tool_result_panel,
)
from .status import expert_delta, status_line
from .term import can_go_live, is_tty, no_echo

TRANSCRIPT_MESSAGES = 12  # messages of a resumed session shown again


class ChatApp:
    """One chat: the model's engine, the current session, the settings and the screen (the
    `ChatHost` that commands and agent turns see)."""

    def __init__(self, model, tokenizer, console: Console, *, spec: str, session: Session,
                 settings: SamplingSettings, think: ThinkMode, model_path: Path | None = None,
                 err_console: Console | None = None, debug: bool = False,
                 agent: AgentMode | None = None):
        self.model = model
        self.tokenizer = tokenizer
        # Answers go to `out`; everything else to `console`: the same terminal, or stderr when
        # stdout is a pipe or a file (so it holds the answers alone, as with `kimi run`).
        self.out = console
        self.console = console if can_go_live(console.file) or err_console is None \
            else err_console
        self.spec = spec
        self.model_path = model_path
        self.session = session
        self.settings = settings
        self.think = think
        self.debug = debug
        self.agent = agent or AgentMode()  # /agent on|off
        self.engine = Engine(model, tokenizer)
        self.fingerprint = model_fingerprint(model)
        self.kv_owner: str | None = None  # the session whose tokens the engine's cache holds
        self.kv_restored: KVInfo | None = None
        self.last: Reply | None = None
        self.last_experts: dict | None = None
        self.turns = 0
        self.heavy_next = 0  # trajectories for the next message (/heavy), 0: a normal reply
        self._renderer = None  # the last reply's
        self._answered = False  # an answer is on `out` already
        self.totals = {"prefilled": 0, "reused": 0, "generated": 0, "prompt_time": 0.0,
                       "generation_time": 0.0}

    # Screen helpers

    def note(self, text: str) -> None:
        self.console.print(Text(text, style="dim"))

    def hint(self, text: str) -> None:
        self.console.print(Text(text, style="yellow"))

    def settings_dict(self) -> dict:
        return asdict(self.settings)

    def set_think(self, mode: ThinkMode) -> None:
        self.think = mode
        write_pref("think", mode.value)

    def renderer(self):
        """A renderer for one reply. In a pipe, answers are set apart by an empty line."""
        previous = self._renderer
        self._renderer = make_renderer(self.out, self.console, think=self.think)
        if self._answered or getattr(previous, "answered", False):
            self._answered = True
            self._renderer.before_answer = "\n"
        return self._renderer

    def set_agent(self, on: bool) -> None:
        self.agent.on = on
        if on:
            self.note(f"agent mode on: the model uses tools · {self.agent.describe()}")
        else:
            self.note("agent mode off: the model answers without tools")

    # The loop

    def run(self, reader) -> int:
        self.banner(keys=isinstance(reader, PromptReader))
        if self.session.messages:
            self.show_transcript()
            self.restore_kv()
        while True:
            try:
                text = reader.read()
            except KeyboardInterrupt:
                self.hint("(to leave, type /exit or press Ctrl-D)")
                continue
            except EOFError:
                break
            text = unwrap(text)
            if not text.strip():
                continue
            try:
                if text.lstrip().startswith("/") and not text.lstrip().startswith("//"):
                    commands.dispatch(self, text.lstrip())
                else:
                    if text.lstrip().startswith("//"):
                        text = text.lstrip()[1:]
                    self.session.append({"role": "user", "content": text})
                    self.respond()
            except commands.Exit:
                break
            except commands.CommandError as e:
                self.hint(str(e))
            except KeyboardInterrupt:
                self.hint("interrupted")
            except KimiError as e:
                self.console.print(Text(f"kimi: error: {e}", style="red"))
            except Exception as e:  # noqa: BLE001 - the chat must survive a bad turn
                if self.debug:
                    traceback.print_exc()
                self.console.print(Text(f"kimi: internal error: {type(e).__name__}: {e}"
                                        + ("" if self.debug else " (rerun with --debug)"),
                                        style="red"))
        self.close()
        return 0

    def banner(self, keys: bool = True) -> None:
        """`keys`: the keys are read from a terminal, so their hints mean something."""
        self.console.print(Text.assemble(("kimi chat", "bold " + ANSWER_STYLE),
                                         (f" · {self.spec} · reasoning: {self.think.value}"
                                          + (" · agent: on" if self.agent.on else ""), "dim")))
        if keys:
            self.note("/help: commands · Alt-Enter: new line · Ctrl-C: stop a reply · "
                      "Ctrl-D: exit")
        if self.agent.on:
            self.note(f"agent mode: {self.agent.describe()}")

    # One reply

    def respond(self) -> None:
        """Answer the last user message: with the agent loop in agent mode, else one reply."""
        if self.agent.on or self.heavy_next:  # heavy_next: armed by /heavy for this message
            self.kv_owner = self.session.id
            if self.agent.on:
                turn = run_turn(self)
            else:
                from .heavy_turn import run_heavy_turn

                n, self.heavy_next = self.heavy_next, 0
                turn = run_heavy_turn(self, n)
            self.last_experts = turn.experts
            if turn.reply is not None:
                t = turn.totals
                self._count(turn.reply, t["prefilled_tokens"], t["reused_tokens"],
                            t["generated_tokens"], t["prompt_time"], t["generation_time"])
            return
        messages = self.session.prompt_messages()
        ids = self.tokenizer.encode(render(messages, template=self.tokenizer.chat_template))
        room = config.CONTEXT_LENGTH - len(ids)
        if room <= 0:
            raise commands.CommandError(
                f"the conversation ({len(ids):,} tokens) fills the model's context "
                f"({config.CONTEXT_LENGTH:,}): /clear starts a new one")
        settings = replace(self.settings, max_tokens=min(self.settings.max_tokens, room))
        renderer = self.renderer()
        cache = getattr(self.model, "expert_cache", None)
        before = cache.stats.to_dict(per_layer=False) if cache is not None else None

        def on_event(ev) -> None:
            if isinstance(ev, PrefillProgress):
                renderer.progress(ev.processed, ev.total)
            else:
                renderer.feed(ev)

        self.kv_owner = self.session.id
        renderer.waiting("thinking…")
        reason = "error"
        try:
            with no_echo() if is_tty(sys.stdin) else _nothing():
                reply = generate_reply(self.engine, self.tokenizer, ids, settings, on_event)
            reason = reply.finish_reason
        finally:
            renderer.finish(reason)
        after = cache.stats.to_dict(per_layer=False) if cache is not None else None
        self.last_experts = expert_delta(before, after)
        msg = reply.message()
        st = reply.stats
        msg["stats"] = {k: round(v, 4) if isinstance(v, float) else v
                        for k, v in st.to_dict().items()}
        self.session.append(msg)
        self._count(reply, st.prefilled_tokens, st.reused_tokens, st.generation_tokens,
                    st.prompt_time, st.generation_time)
        self.note(status_line(st, len(ids) + st.generation_tokens, self.last_experts))

    def _count(self, reply: Reply, prefilled: int, reused: int, generated: int,
               prompt_time: float, generation_time: float) -> None:
        """One more reply for /stats (an agent turn's counts cover all its steps)."""
        self.last = reply
        self.turns += 1
        for key, value in (("prefilled", prefilled), ("reused", reused),
                           ("generated", generated), ("prompt_time", prompt_time),
                           ("generation_time", generation_time)):
            self.totals[key] += value

    # Sessions

    def new_session(self) -> None:
        self.save_kv()
        self.session = Session.create(self.spec, self.settings_dict(), self.session.system)
        self.last = None

    def switch_to(self, path: Path) -> None:
        if path == self.session.path:
            self.note("already in that session")
            return
        session = Session.load(path)
        self.save_kv()
        self.session = session
        self.last = None
        self.show_transcript()
        self.restore_kv()

    def save_kv(self) -> KVInfo | None:
        if self.kv_owner != self.session.id or not self.session.path.exists():
            return None
        size = sum(getattr(c, "nbytes", 0) for c in self.engine.cache)
        if size > 200e6:  # the real model keeps ~70 KB per token: say why we pause
            self.note(f"saving the KV cache ({size / 1e9:.1f} GB)…")
        return save_kv(self.session.kv_path, self.engine, self.fingerprint)

    def restore_kv(self) -> None:
        path = self.session.kv_path
        if not path.exists():
            return
        try:
            info = load_kv(path, self.engine, self.fingerprint)
        except KVMismatch as e:
            self.note(f"KV cache not used: {e}; the conversation will be processed again")
            return
        self.kv_owner = self.session.id
        self.kv_restored = info
        self.note(f"restored {info.tokens:,} tokens of KV cache in {info.seconds:.2f} s")

    def close(self) -> None:
        if not self.session.path.exists():
            return
        try:
            self.save_kv()
        except (OSError, KimiError) as e:
            self.note(f"KV cache not saved: {e}")
        self.note(f"session {self.session.id} saved · continue it with: kimi chat -c")

    def show_transcript(self) -> None:
        msgs = self.session.messages
        title = self.session.header.get("name") or self.session.id
        self.console.rule(Text(f"resumed {title} · {len(msgs)} messages", style="dim"),
                          style="grey50")
        if len(msgs) > TRANSCRIPT_MESSAGES:
            self.note(f"… {len(msgs) - TRANSCRIPT_MESSAGES} earlier messages")
        for m in msgs[-TRANSCRIPT_MESSAGES:]:
            role = m.get("role")
            if role == "user":
                self.console.print(Text.assemble(("› ", "bold cyan"), m.get("content") or ""))
            elif role == "assistant":
                if m.get("reasoning_content") and self.think is not ThinkMode.hide:
                    self.console.print(_past_reasoning(m["reasoning_content"],
                                                       self.console.width))
                if (m.get("content") or "").strip():
                    footer = reason_label(m.get("finish_reason") or "stop")
                    self.console.print(Frame(Markdown(m["content"].strip()),
                                             title=Text("Kimi", style="bold " + ANSWER_STYLE),
                                             footer=Text(footer, style="dim") if footer else None,
                                             style=ANSWER_STYLE))
                for call in m.get("tool_calls") or []:
                    self.console.print(tool_call_panel(_call_from_message(call)))
            elif role == "tool":
                self.console.print(tool_result_panel(ToolResult(
                    m.get("tool_call_id", ""), m.get("name", ""), m.get("content") or "",
                    error=m.get("ok") is False)))
        self.console.rule(style="grey50")

    # Reports

    def context_usage(self) -> tuple[int, int]:
        """Tokens of the conversation so far, and how many of them the KV cache holds."""
        if self.agent.on:
            ids = agent_prompt_ids(self)
        else:
            ids = self.tokenizer.encode(render(self.session.prompt_messages(),
                                               add_generation_prompt=False,
                                               template=self.tokenizer.chat_template))
        return len(ids), common_prefix(self.engine.cached_ids, ids)

    def stats_lines(self) -> list[str]:
        lines = []
        if self.last is None:
            lines.append("no reply yet in this session")
        else:
            st = self.last.stats
            lines.append(
                f"last reply: {st.prompt_tokens:,} prompt tokens ({st.reused_tokens:,} reused "
                f"from the KV cache, {st.prefilled_tokens:,} processed at "
                f"{st.prompt_tps:,.1f} tok/s) · {st.generation_tokens:,} generated at "
                f"{st.generation_tps:,.1f} tok/s · first token after {st.ttft:.2f} s · "
                f"peak {st.peak_memory_gb:.2f} GB · {self.last.finish_reason}")
        t = self.totals
        lines.append(f"this run: {self.turns} repl{'y' if self.turns == 1 else 'ies'} · {t['prefilled']:,} prompt tokens "
                     f"processed, {t['reused']:,} reused · {t['generated']:,} generated")
        if self.kv_restored is not None:
            lines.append(f"KV cache restored from disk: {self.kv_restored.tokens:,} tokens "
                         f"in {self.kv_restored.seconds:.2f} s")
        if self.last_experts is not None:
            e = self.last_experts
            lines.append(f"expert cache (last reply): {e['hit_rate']:.1%} hit rate, "
                         f"{e['hits']:,} hits, {e['misses']:,} misses")
        return lines

    def model_lines(self) -> list[str]:
        lines = [f"model: {self.spec}"]
        if self.model_path is not None:
            lines.append(f"path: {self.model_path}")
        args = getattr(self.model, "args", None)
        if args is not None:
            lines.append(f"{args.num_hidden_layers} layers · hidden {args.hidden_size} · "
                         f"{args.n_routed_experts} routed experts, {args.num_experts_per_tok} "
                         f"per token · vocab {args.vocab_size:,}")
        cache = getattr(self.model, "expert_cache", None)
        if cache is not None:
            s = cache.stats.to_dict(per_layer=False)
            lines.append(f"expert cache: {s.get('resident_bytes', 0) / 1e9:.2f} GB resident, "
                         f"hit rate so far {s.get('hit_rate', 1.0):.1%}")
        lines.append(f"context {config.CONTEXT_LENGTH:,} tokens · fingerprint "
                     f"{self.fingerprint[:12]}")
        return lines


class _nothing:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def _past_reasoning(text: str, width: int) -> Text:
    words = len(text.split())
    line = Text(f"▸ reasoning · {words} word{'s' * (words != 1)} · "
                + " ".join(text.split()), style="dim")
    line.truncate(max(10, width), overflow="ellipsis")
    line.no_wrap = True
    return line


def _call_from_message(call: dict):
    from ..chat.parser import _make_call

    fn = call.get("function") or {}
    c = _make_call(call.get("id", ""), fn.get("arguments") or "", 0)
    c.name = fn.get("name") or c.name
    return c


def pick_session(console: Console) -> Path | None:
    """`kimi chat -r` without an id: a numbered list of recent sessions; None if there are none
    or the user chose none."""
    from ..sessions import list_sessions

    infos = list_sessions()[:20]
    if not infos:
        return None
    for n, info in enumerate(infos, 1):
        console.print(Text.assemble((f"{n:>3}  ", "bold cyan"), (info.id, ""),
                                    (f"  {info.messages} messages  ", "dim"),
                                    (f"[{info.name}] " if info.name else "", "bold"),
                                    info.title))
    while True:
        try:
            answer = input(f"resume which session? [1-{len(infos)}, Enter: 1] ").strip()
        except (EOFError, KeyboardInterrupt):
            console.print()
            return None
        if not answer:
            return infos[0].path
        if answer.isdigit() and 1 <= int(answer) <= len(infos):
            return infos[int(answer) - 1].path
        console.print(Text(f"type a number from 1 to {len(infos)}", style="yellow"))


def make_reader():
    if is_tty(sys.stdin) and is_tty(sys.stdout):
        return PromptReader(commands.completions())
    return LineReader()
