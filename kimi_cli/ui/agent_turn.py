"""`kimi chat` in agent mode: each turn runs the agent loop on the conversation so far.

The loop and its drawing are `kimi run --agent`'s (agent/loop.py, agent/frontend.py); this module
gives them the chat's engine, history, screen and terminal, and writes each step to the session.
"""

from __future__ import annotations

import contextlib
import copy
import sys
from collections import Counter
from dataclasses import dataclass, fields

from ..agent import events as ev
from ..agent.frontend import HINTS, show
from ..agent.loop import Agent, AgentConfig
from ..agent.prompt import encode_messages
from ..chat.reply import Reply
from ..engine import Stats
from ..sessions import TEMPLATE_KEYS, Session
from .host import ChatHost
from .render import LiveRenderer
from .status import expert_delta, status_line
from .term import is_tty, line_input, no_echo

# How a turn that ended without an answer goes on from the chat.
CHAT_HINTS = {**HINTS, "max_steps": "; send a message (e.g. `go on`) to let it continue",
              "context_full": "; /clear starts a new conversation"}


def make_agent(app: ChatHost, history: list[dict]) -> Agent:
    mode = app.agent
    cfg = AgentConfig(max_steps=mode.max_steps, system_prompt=app.session.system)
    return Agent(app.engine, mode.tools, mode.context(), mode.policy(app.console.file),
                 app.settings, cfg, tokenizer=app.tokenizer, history=history)


def template_messages(session: Session) -> list[dict]:
    """The session's messages as the loop takes them: template keys only, deep copies (the
    loop may shorten its copies to free context; the session keeps them whole)."""
    return [copy.deepcopy({k: m[k] for k in TEMPLATE_KEYS if k in m and m[k] is not None})
            for m in session.messages]


def prompt_ids(app: ChatHost) -> list[int]:
    """The conversation as the agent would see it now (tools declared), for /context."""
    agent = make_agent(app, template_messages(app.session))
    return encode_messages(app.tokenizer, agent.messages, agent.schemas,
                           add_generation_prompt=False)


@dataclass
class Turn:
    """What an agent turn did, for the chat's /stats."""

    reply: Reply | None  # its last step (None: it stopped before one finished)
    experts: dict | None  # the expert cache's counts over the turn
    totals: dict  # the loop's totals (agent.loop.Totals)


def run_turn(app: ChatHost) -> Turn:
    """Answer the session's last (user) message with the agent loop."""
    *earlier, last = template_messages(app.session)
    agent = make_agent(app, earlier)
    renderer = app.renderer()
    recorder = _Recorder(app.session, agent)
    policy = agent.policy
    ask = policy.approver
    if ask is not None:
        def approver(request):
            renderer.finish("stop")  # the question must not be drawn over by a live region
            with line_input():
                return ask(request)
        policy.approver = approver

    def on_event(e: ev.Event) -> None:
        recorder(e)
        if isinstance(e, ev.StepStarted):
            renderer.waiting("thinking…")

    cache = getattr(app.model, "expert_cache", None)
    before = cache.stats.to_dict(per_layer=False) if cache is not None else None
    done = None
    try:
        with no_echo() if is_tty(sys.stdin) else contextlib.nullcontext():
            done = show(agent, last["content"], renderer,
                        live=isinstance(renderer, LiveRenderer), on_event=on_event)
    finally:
        policy.approver = ask
        renderer.finish("error" if done is None else
                        "stop" if done.reason == "answer" else done.reason)
    after = cache.stats.to_dict(per_layer=False) if cache is not None else None
    experts = expert_delta(before, after)
    if done.reason not in ("answer", "interrupted"):
        app.hint(f"kimi: {done.message}{CHAT_HINTS.get(done.reason, '')}")
    stats = recorder.last_stats
    if stats is None:
        return Turn(None, experts, done.totals)
    reply = Reply(reasoning=recorder.last_reasoning, content=recorder.last_text,
                  finish_reason=recorder.last_finish, stats=stats)
    steps, calls = done.totals["steps"], done.totals["tool_calls"]
    held = "".join(f", {n} {what}" for what, n in sorted(recorder.refusals.items()))
    app.note(status_line(stats, stats.prompt_tokens + stats.generation_tokens, experts)
             + f" · agent: {steps} step{'s' * (steps != 1)}, "
               f"{calls} tool call{'s' * (calls != 1)}{held}")
    return Turn(reply, experts, done.totals)


class _Recorder:
    """Appends what the loop adds to its messages to the session file as it happens: assistant
    steps (with their stats) and tool results (with the approval decision), so a turn can be
    audited, and a turn stopped by Ctrl-C keeps what it did, a partial answer included."""

    def __init__(self, session: Session, agent: Agent):
        self.session = session
        self.agent = agent
        self.kept = list(agent.messages)  # held, so that no new message can reuse an id()
        self.seen = {id(m) for m in self.kept}
        self.approvals: dict[str, ev.Approval] = {}
        self.refusals: Counter[str] = Counter()  # "denied", "refused": how many calls
        self.ok: dict[str, bool] = {}
        self.step: ev.StepFinished | None = None
        self.reasoning: list[str] = []
        self.text: list[str] = []
        self.step_recorded = False
        self.last_stats: Stats | None = None
        self.last_reasoning = self.last_text = ""
        self.last_finish = "stop"

    def __call__(self, e: ev.Event) -> None:
        if isinstance(e, ev.StepStarted):
            self.step, self.step_recorded = None, False
            self.reasoning.clear()
            self.text.clear()
        elif isinstance(e, ev.Reasoning):
            self.reasoning.append(e.text)
        elif isinstance(e, ev.Text):
            self.text.append(e.text)
        elif isinstance(e, ev.StepFinished):
            self.step = e
            self.last_stats = Stats(**{f.name: e.stats[f.name] for f in fields(Stats)})
            self.last_finish = e.finish_reason
            self.last_reasoning, self.last_text = "".join(self.reasoning), "".join(self.text)
        elif isinstance(e, ev.Approval):
            self.approvals[e.id] = e
            if e.decision != "allowed":
                self.refusals[e.decision] += 1
        elif isinstance(e, ev.ToolResult):
            self.ok[e.id] = e.ok
        if isinstance(e, (ev.Answer, ev.Approval, ev.ToolResult, ev.Done)):
            self.sync()
        if isinstance(e, ev.Done) and e.reason == "interrupted" and not self.step_recorded \
                and (self.reasoning or self.text):
            # Stopped while the model wrote: keep what it wrote, as a plain chat turn does.
            self.session.append({"role": "assistant", "content": "".join(self.text),
                                 "reasoning_content": "".join(self.reasoning),
                                 "finish_reason": "interrupted"})
            self.step_recorded = True

    def sync(self) -> None:
        new = []
        for m in reversed(self.agent.messages):  # new messages are at the end
            if id(m) in self.seen:
                break
            new.append(m)
        for m in reversed(new):
            self.seen.add(id(m))
            self.kept.append(m)
            if m["role"] == "assistant":
                rec = copy.deepcopy(m)
                if self.step is not None:
                    rec["finish_reason"] = self.step.finish_reason
                    rec["stats"] = {k: round(v, 4) if isinstance(v, float) else v
                                    for k, v in self.step.stats.items()}
                self.step_recorded = True
                self.session.append(rec)
            elif m["role"] == "tool":  # the user's message is in the session already
                rec = copy.deepcopy(m)
                rec["ok"] = self.ok.get(m["tool_call_id"], False)
                a = self.approvals.get(m["tool_call_id"])
                if a is not None:
                    rec["approval"] = {"decision": a.decision, "by": a.by, "reason": a.reason,
                                       "message": a.message}
                self.session.append(rec)
