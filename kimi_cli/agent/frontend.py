"""`kimi run --agent`'s front end: agent events to a renderer the caller gives (text), one JSON
document (json) or one event per line (jsonl); how the run ended becomes the exit code.
"""

from __future__ import annotations

import json
import sys
from collections import Counter
from collections.abc import Callable
from typing import IO

from .. import config
from ..errors import KimiError
from . import events as ev
from .escape import json_safe, visible
from .loop import Agent


class AgentStopped(KimiError):
    """The agent stopped without answering (step limit, repeated calls, context full)."""

    def __init__(self, message: str, exit_code: int) -> None:
        super().__init__(message)
        self.exit_code = exit_code


EXIT_CODES = {"max_steps": config.EXIT_AGENT_STEP_LIMIT,
              "repeated_calls": config.EXIT_AGENT_REPEATING, "context_full": 1}
HINTS = {"max_steps": "; raise --max-steps to let it go on",
         "repeated_calls": "; it was told after "
                           f"{config.AGENT_REPEAT_WARN} and stopped at {config.AGENT_REPEAT_STOP}",
         "context_full": "; raise --context-limit if memory allows"}


def check_done(done: ev.Done) -> None:
    """Raise what the CLI turns into the run's exit code (nothing for an answer)."""
    if done.reason == "interrupted":
        raise KeyboardInterrupt
    if done.reason in EXIT_CODES:
        raise AgentStopped(done.message + HINTS[done.reason], EXIT_CODES[done.reason])


def run(agent: Agent, task: str, fmt: str, *, renderer=None, live: bool = False,
        quiet: bool = False, out: IO | None = None,
        settle: Callable[[], None] | None = None) -> ev.Done:
    """Run `task`: for `text`, drawn on `renderer` (the caller's: the agent does not know the
    terminal; `live` as for `show`), `settle` called before the closing line; for `json` and
    `jsonl`, written to `out`."""
    out = out or sys.stdout
    if fmt == "jsonl":
        return _jsonl(agent, task, out)
    if fmt == "json":
        return _json(agent, task, out)
    return _text(agent, task, renderer, live, quiet, settle)


def _jsonl(agent: Agent, task: str, out: IO) -> ev.Done:
    done = None
    for e in agent.run(task):
        out.write(json_safe(json.dumps(ev.to_dict(e), ensure_ascii=False)) + "\n")
        out.flush()
        if isinstance(e, ev.Done):
            done = e
    return done


def _json(agent: Agent, task: str, out: IO) -> ev.Done:
    calls: dict[str, dict] = {}
    answer = None
    done = None
    start = None
    for e in agent.run(task):
        if isinstance(e, ev.Started):
            start = e
        elif isinstance(e, ev.ToolCallEvent):
            calls[e.id] = {k: v for k, v in ev.to_dict(e).items() if k != "type"}
        elif isinstance(e, ev.Approval) and e.id in calls:
            calls[e.id].update(decision=e.decision, decided_by=e.by, reason=e.reason,
                               message=e.message)
        elif isinstance(e, ev.ToolResult) and e.id in calls:
            calls[e.id].update(ok=e.ok, content=e.content)
        elif isinstance(e, ev.Answer):
            answer = e
        elif isinstance(e, ev.Done):
            done = e
    doc = {
        "text": answer.text if answer else "",
        "reasoning": answer.reasoning if answer else "",
        "finish_reason": done.reason,
        "message": done.message,
        "steps": done.steps,
        "workspace": start.workspace, "approval": start.approval, "sandbox": start.sandbox,
        "tool_calls": list(calls.values()),
        "usage": done.totals,
        "messages": agent.messages,
    }
    out.write(json_safe(json.dumps(doc, ensure_ascii=False)) + "\n")
    out.flush()
    return done


def _text(agent: Agent, task: str, r, live: bool, quiet: bool,
          settle: Callable[[], None] | None) -> ev.Done:
    base = agent.policy.approver
    if base is not None:
        def ask(request):
            r.finish("stop")  # the question must not be drawn over by a live region
            return base(request)
        agent.policy.approver = ask

    refusals: Counter[str] = Counter()

    def announce(e: ev.Event) -> None:
        if isinstance(e, ev.Started):
            r.note(f"kimi: agent in {e.workspace} · approval: {e.approval} · "
                   f"shell sandbox: {e.sandbox}")
        elif isinstance(e, ev.Approval) and e.decision != "allowed":
            refusals[e.decision] += 1

    done = show(agent, task, r, live=live, on_event=announce)
    r.finish("stop" if done.reason == "answer" else done.reason)
    if not quiet:
        if settle is not None:
            settle()
        r.note(closing_line(done, refusals))
    return done


def closing_line(done: ev.Done, refusals: Counter[str] | None = None) -> str:
    """How the run went, in words: steps, tool calls (how many were denied or refused by the
    safety rules), tokens, and how it ended."""
    t = done.totals
    refusals = refusals or Counter()
    held = ", ".join(f"{n} {what}" for what, n in sorted(refusals.items()) if n)
    parts = [_count(done.steps, "step"),
             _count(t["tool_calls"], "tool call") + (f" ({held})" if held else ""),
             f"{t['prompt_tokens']:,} prompt tokens, {t['prefilled_tokens']:,} processed "
             f"({t['reused_tokens']:,} from the KV cache)",
             f"{t['generated_tokens']:,} generated",
             REASONS.get(done.reason, done.reason)]
    return "[agent: " + " · ".join(parts) + "]"


REASONS = {"answer": "answered", "max_steps": "stopped at --max-steps",
           "repeated_calls": "stopped: repeated calls", "context_full": "stopped: context full",
           "interrupted": "interrupted"}


def _count(n: int, what: str) -> str:
    return f"{n:,} {what}{'s' * (n != 1)}"


def show(agent: Agent, task: str, r, *, live: bool,
         on_event: Callable[[ev.Event], None] | None = None) -> ev.Done:
    """Run `task` and draw its events on the renderer `r` (reasoning, answer, tool calls and
    results in their panels, approvals as notes); `on_event` sees each event first. Ctrl-C
    while an event is being drawn reaches the loop too, which closes the turn as usual.
    `live`: `r` streams the answer in place (else only the last step's text is the answer)."""
    kinds = {name: t.kind for name, t in agent.tools.items()}
    step_text: list[str] = []  # a piped answer is only what the last step writes
    step_calls = 0
    done = None
    events = agent.run(task)
    interrupted = False
    while done is None:
        try:
            e = events.throw(KeyboardInterrupt) if interrupted else next(events)
        except StopIteration:
            break
        except KeyboardInterrupt:  # before the loop could catch it, or pressed twice
            e = ev.Done("interrupted", agent.totals.steps, "interrupted", agent.totals.to_dict())
        interrupted = False
        try:
            if on_event is not None:
                on_event(e)
            if isinstance(e, ev.StepStarted):
                step_text.clear()
                step_calls = 0
            elif isinstance(e, ev.Prefill):
                r.progress(e.processed, e.total)
            elif isinstance(e, ev.Reasoning):
                r.reasoning(e.text)
            elif isinstance(e, ev.Text):
                if live:
                    r.text(e.text)
                else:
                    step_text.append(e.text)
            elif isinstance(e, ev.ToolCallEvent):
                step_calls += 1
                r.tool_call(e)
            elif isinstance(e, ev.StepFinished):
                if step_calls and step_text and "".join(step_text).strip():
                    r.note(visible("".join(step_text).strip(), tabs=True))
            elif isinstance(e, ev.Approval):
                if e.decision != "allowed":
                    r.note(f"✗ {visible(e.id)} {e.decision} ({e.by})", style="red")
                else:
                    if e.by in ("user", "session"):
                        r.note(f"✓ {visible(e.name)} {visible(e.id)} approved"
                               + (" (session approval)" if e.by == "session" else ""),
                               style="green")
                    if kinds.get(e.name) == "exec":
                        r.waiting(f"running {e.name}…")
            elif isinstance(e, ev.ToolResult):
                r.tool_result(e)
            elif isinstance(e, ev.ContextElided):
                r.note(f"kimi: context near its limit: elided {e.tool_results} old tool results"
                       + (f" and {e.reasoning} old reasoning blocks" if e.reasoning else "")
                       + f" ({e.tokens_before} → {e.tokens_after} tokens)")
            elif isinstance(e, ev.Answer):
                if not live:
                    r.text(e.text)
        except KeyboardInterrupt:
            interrupted = not isinstance(e, ev.Done)
        if isinstance(e, ev.Done):
            done = e
    return done
