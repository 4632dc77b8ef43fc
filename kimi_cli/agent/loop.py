"""The agent loop: generate, run the tool calls, send the results back, until the model answers.

UI-independent: `Agent.run(task)` yields events (events.py) that `kimi run --agent` prints and
the chat front end renders; approvals go through the `Policy`'s `Approver`.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from dataclasses import dataclass, field, replace

from .. import config
from ..chat.parser import SECTION_BEGIN, THINK_BEGIN, THINK_END, OutputParser
from ..chat.parser import ReasoningDelta as _ReasoningDelta
from ..chat.parser import TextDelta as _TextDelta
from ..chat.parser import ToolCall as _ToolCall
from ..engine import Done as _EngineDone
from ..engine import Engine, SamplingSettings
from ..engine import PrefillProgress as _PrefillProgress
from ..engine import Token as _Token
from . import events as ev
from .approval import NO_TERMINAL, Policy, Request, command_prefixes
from .prompt import encode_messages, system_prompt
from .safety import Refused
from .tools import Tool, ToolContext, ToolError, cap_text, validate

DISPLAY_LINES = 12
DISPLAY_CHARS = 1200


@dataclass
class AgentConfig:
    max_steps: int = config.AGENT_MAX_STEPS
    context_limit: int = config.CONTEXT_LENGTH  # tokens; old tool results are elided near it
    repeat_warn: int = config.AGENT_REPEAT_WARN
    repeat_stop: int = config.AGENT_REPEAT_STOP
    keep_recent: int = 4  # elision never touches the last steps
    system_prompt: str | None = None  # None: the agent's default (prompt.SYSTEM_PROMPT)


@dataclass
class Totals:
    steps: int = 0
    tool_calls: int = 0
    prompt_tokens: int = 0  # summed over steps: what re-processing the history would prefill
    prefilled_tokens: int = 0  # what was prefilled
    reused_tokens: int = 0
    added_tokens: int = 0  # tokens the steps added to the conversation (the ideal prefill)
    generated_tokens: int = 0
    elisions: int = 0
    prompt_time: float = 0.0
    generation_time: float = 0.0
    per_step: list = field(default_factory=list, repr=False)

    def to_dict(self) -> dict:
        d = {k: v for k, v in self.__dict__.items() if k != "per_step"}
        d["prefill_ratio"] = self.prefilled_tokens / self.added_tokens if self.added_tokens else 0.0
        return d


class Agent:
    """One conversation with tools; `run` may be called again for a follow-up task, and
    `history` continues an earlier conversation (a chat's messages after its system prompt)."""

    def __init__(self, engine: Engine | None, tools: list[Tool], ctx: ToolContext,
                 policy: Policy, settings: SamplingSettings | None = None,
                 cfg: AgentConfig | None = None, tokenizer=None,
                 history: list[dict] | None = None):
        self.engine = engine  # None: only render prompts (kimi run --agent --print-prompt)
        self.tokenizer = tokenizer or engine.tokenizer
        self.tools = {t.name: t for t in tools}
        self.schemas = [t.schema() for t in tools] or None
        self.ctx = ctx
        self.policy = policy
        if policy.workspace is None:  # session approvals hold only inside it
            policy.workspace = ctx.workspace
        self.settings = settings or SamplingSettings()
        self.cfg = cfg or AgentConfig()
        self.messages: list[dict] = [{"role": "system", "content": self.cfg.system_prompt
                                      or system_prompt(ctx.workspace)}]
        self.totals = Totals()
        self._next_index = 0  # tool-call ids are functions.NAME:IDX with a running IDX
        self._used_ids: set[str] = set()
        self._previous_total: int | None = None  # prompt + generated tokens of the last step
        self._added = 0  # tokens this step's messages added (measured before any elision)
        self._base: int | None = None
        if history:  # a chat's earlier turns (no system message): ids keep running across them
            self.messages += history
            for m in history:
                for c in m.get("tool_calls") or ():
                    self._used_ids.add(c["id"])
                    self._next_index += 1
            # Elision may shorten the earlier turns too: only the system prompt is fixed.
            self._base = len(encode_messages(self.tokenizer, self.messages[:1], self.schemas))
        special = self.tokenizer.special_tokens
        self._think = (special.get(THINK_BEGIN), special.get(THINK_END), special.get(SECTION_BEGIN))

    def started(self) -> ev.Started:
        return ev.Started(str(self.ctx.workspace), self.policy.mode.value,
                          self.ctx.sandbox.describe(), list(self.tools), self.cfg.max_steps,
                          self.cfg.context_limit)

    def prompt_ids(self) -> list[int]:
        return encode_messages(self.tokenizer, self.messages, self.schemas)

    def run(self, task: str) -> Iterator[ev.Event]:
        self.messages.append({"role": "user", "content": task})
        yield self.started()
        step = 0
        repeats = (None, 0)
        try:
            while True:
                if step >= self.cfg.max_steps:
                    yield self._done("max_steps", step, f"the agent reached its step limit "
                                     f"({self.cfg.max_steps} steps) without answering")
                    return
                step += 1
                ids = yield from self._prompt(step)
                if ids is None:
                    yield self._done("context_full", step - 1, "the conversation no longer fits "
                                     f"in the context limit ({self.cfg.context_limit} tokens), "
                                     "even with old tool results elided")
                    return
                message, calls, finish = yield from self._generate(step, ids)
                self.messages.append(message)
                if not calls:
                    yield ev.Answer(step, message["content"], message["reasoning_content"],
                                    finish)
                    yield self._done("answer", step)
                    return
                signature = json.dumps([[c.name, c.arguments if c.error is None
                                         else c.raw_arguments] for c, _ in calls],
                                       sort_keys=True)
                n = repeats[1] + 1 if signature == repeats[0] else 1
                repeats = (signature, n)
                if n >= self.cfg.repeat_stop:
                    for call, cid in calls:
                        yield from self._result(step, cid, call.name, False, (
                            f"Error: not run: this exact call was made {n} times in a row. "
                            "The run stops here."), 0.0)
                    yield self._done("repeated_calls", step, f"the agent repeated the same "
                                     f"tool call {n} times in a row")
                    return
                note = ""
                if n >= self.cfg.repeat_warn:
                    note = (f"\n\n[Note from kimi: this is the same call, with the same "
                            f"arguments, {n} times in a row; its result will not change. Do "
                            f"something different or answer. At {self.cfg.repeat_stop} in a "
                            "row the run stops.]")
                for call, cid in calls:
                    yield from self._execute(step, call, cid, note)
        except KeyboardInterrupt:
            self._close_open_calls()
            yield self._done("interrupted", step, "interrupted")

    # One step

    def _prompt(self, step: int) -> Iterator[ev.Event]:
        """The prompt ids, eliding old context first if they come near the limit; None if full."""
        ids = self.prompt_ids()
        previous = self._previous_total
        # A finished turn's reasoning leaves the history, so a follow-up prompt can be shorter.
        self._added = max(0, len(ids) - previous) if previous is not None else len(ids)
        if self._base is None:
            self._base = len(ids)  # system, tools, first task: what elision cannot shorten
        limit = self.cfg.context_limit
        reserve = min(self.settings.max_tokens, limit // 4)
        high = limit - reserve
        if len(ids) > high:
            before = len(ids)
            # Down to half the room above the base: elision re-processes what follows the
            # first change, so it should be rare rather than a little at every step.
            low = self._base + (high - self._base) // 2
            n_tool, n_reasoning, n_steps = self._elide(len(ids) - low)
            ids = self.prompt_ids()
            self.totals.elisions += 1
            yield ev.ContextElided(step, n_tool, n_reasoning, n_steps, before, len(ids))
        if limit - len(ids) < min(reserve, 1024):
            return None
        return ids

    def _generate(self, step: int, ids: list[int]):
        tok = self.tokenizer
        budget = self.cfg.context_limit - len(ids)
        settings = replace(self.settings, max_tokens=max(1, min(self.settings.max_tokens, budget)))
        parser = OutputParser(tok)
        think_begin, think_end, section = self._think
        thinking = section_in_reasoning = False
        reasoning: list[str] = []
        text: list[str] = []
        calls: list[tuple[_ToolCall, str]] = []
        done = None
        yield ev.StepStarted(step, len(ids))

        def handle(events):
            for p in events:
                if isinstance(p, _ReasoningDelta):
                    reasoning.append(p.text)
                    yield ev.Reasoning(step, p.text)
                elif isinstance(p, _TextDelta):
                    text.append(p.text)
                    yield ev.Text(step, p.text)
                elif isinstance(p, _ToolCall):
                    cid = self._assign_id(p)
                    calls.append((p, cid))
                    yield ev.ToolCallEvent(step, cid, p.name, p.arguments, p.raw_arguments,
                                           section_in_reasoning, p.error)

        for e in self.engine.generate(ids, settings):
            if isinstance(e, _PrefillProgress):
                yield ev.Prefill(step, e.processed, e.total)
            elif isinstance(e, _Token):
                if e.id == think_begin:
                    thinking = True
                elif e.id == think_end:
                    thinking = False
                elif e.id == section:
                    section_in_reasoning, thinking = thinking, False
                yield from handle(parser.feed(e.id))
            elif isinstance(e, _EngineDone):
                done = e
        yield from handle(parser.finish(done.finish_reason))
        yield self._count(step, ids, done)
        message = {"role": "assistant", "content": "".join(text),
                   "reasoning_content": "".join(reasoning)}
        if calls:
            message["tool_calls"] = [
                {"id": cid, "type": "function",
                 "function": {"name": c.name, "arguments": c.raw_arguments}}
                for c, cid in calls]
        return message, calls, done.finish_reason

    def _assign_id(self, call: _ToolCall) -> str:
        """The model's id when it is `functions.NAME:IDX` and new in this run; else the next one."""
        expected = f"functions.{call.name}:{call.index}"
        cid = call.id if call.id == expected and call.id not in self._used_ids else None
        if cid is None:
            cid = f"functions.{call.name or 'unknown'}:{self._next_index}"
            while cid in self._used_ids:
                self._next_index += 1
                cid = f"functions.{call.name or 'unknown'}:{self._next_index}"
        else:
            self._next_index = max(self._next_index, call.index)
        self._next_index += 1
        self._used_ids.add(cid)
        return cid

    def _count(self, step: int, ids: list[int], done: _EngineDone) -> ev.StepFinished:
        st = done.stats
        t = self.totals
        added = self._added
        self._previous_total = len(ids) + len(done.token_ids)
        t.steps = step
        t.prompt_tokens += st.prompt_tokens
        t.prefilled_tokens += st.prefilled_tokens
        t.reused_tokens += st.reused_tokens
        t.added_tokens += added
        t.generated_tokens += st.generation_tokens
        t.prompt_time += st.prompt_time
        t.generation_time += st.generation_time
        t.per_step.append((st.prompt_tokens, st.prefilled_tokens, added))
        return ev.StepFinished(step, done.finish_reason, added, st.to_dict())

    # Tool calls

    def _execute(self, step: int, call: _ToolCall, cid: str, note: str) -> Iterator[ev.Event]:
        start = time.monotonic()
        self.totals.tool_calls += 1
        tool = self.tools.get(call.name)
        args = call.arguments
        ok = False
        if call.error is not None:
            content = (f"Error: {call.error}. Nothing was run; call the tool again with its "
                       "arguments as one JSON object.")
        elif tool is None:
            content = (f"Error: there is no tool named {call.name!r}. Available tools: "
                       f"{', '.join(self.tools) or 'none'}.")
        else:
            try:
                validate(tool, args)
                tool.check(args, self.ctx)
                allowed, content = yield from self._approve(step, cid, tool, args)
                if allowed:
                    content, ok = tool.run(args, self.ctx), True
            except Refused as e:
                yield ev.Approval(step, cid, tool.name, "refused", "safety", str(e))
                content = f"Error: refused: {e}. No approval mode allows this."
            except ToolError as e:
                content = f"Error: {e}"
            except (KeyboardInterrupt, SystemExit):
                raise
            except Exception as e:  # a tool bug must not end a 300-step run
                content = f"Error: {tool.name} failed: {type(e).__name__}: {e}"
        content = cap_text(content, self.ctx.output_cap + 1000,
                           "The result was too long; ask for less at a time.") + note
        yield from self._result(step, cid, call.name, ok, content, time.monotonic() - start)

    def _approve(self, step: int, cid: str, tool: Tool, args: dict):
        if tool.kind == "read":
            yield ev.Approval(step, cid, tool.name, "allowed", "mode")
            return True, ""
        command = args.get("command") if tool.kind == "exec" else None
        title = command if command is not None else f"{tool.name} {args.get('path', '')}"
        try:
            preview = tool.preview(args, self.ctx)
        except (ToolError, OSError) as e:
            preview = f"(no preview: {e})"
        request = Request(cid, tool.name, tool.kind, title, preview,
                          command_prefixes(command) if command is not None else None,
                          tool.protected(args, self.ctx))
        decision = self.policy.decide(request, command)
        yield ev.Approval(step, cid, tool.name, "allowed" if decision.allowed else "denied",
                          decision.by, decision.reason, decision.message)
        if decision.allowed:
            return True, ""
        if decision.by == "no-terminal":
            return False, f"Error: denied: {NO_TERMINAL}."
        if decision.by == "protected":
            return False, f"Error: denied: {decision.reason}."
        said = f" The user says: {decision.message}" if decision.message else ""
        return False, f"Error: denied: the user did not allow this call.{said}"

    def _result(self, step: int, cid: str, name: str, ok: bool, content: str,
                seconds: float) -> Iterator[ev.Event]:
        self.messages.append({"role": "tool", "tool_call_id": cid, "name": name,
                              "content": content})
        yield ev.ToolResult(step, cid, name, ok, content, display(content), round(seconds, 3))

    def _close_open_calls(self) -> None:
        """After Ctrl-C, give every call of the last step a result so the history stays valid."""
        last = next((m for m in reversed(self.messages) if m["role"] == "assistant"), None)
        if not last or not last.get("tool_calls"):
            return
        answered = {m.get("tool_call_id") for m in self.messages if m["role"] == "tool"}
        for c in last["tool_calls"]:
            if c["id"] not in answered:
                self.messages.append({"role": "tool", "tool_call_id": c["id"],
                                      "name": c["function"]["name"],
                                      "content": "Error: interrupted by the user."})

    def _done(self, reason: str, steps: int, message: str = "") -> ev.Done:
        return ev.Done(reason, steps, message, self.totals.to_dict())

    # Context

    def _elide(self, need: int) -> tuple[int, int, int]:
        """Free about `need` tokens, oldest first and never in the last `keep_recent` steps:
        shorten tool results, then reasoning and long arguments, then drop whole steps.
        Returns how many results, reasoning blocks and steps went."""
        tok = self.tokenizer
        msgs = self.messages
        steps = [i for i, m in enumerate(msgs) if m["role"] == "assistant" and m.get("tool_calls")]
        keep = self.cfg.keep_recent
        if keep == 0:
            cutoff = len(msgs)
        elif len(steps) >= keep:
            cutoff = steps[-keep]  # messages from here on are the recent steps: untouched
        else:
            cutoff = steps[0] if steps else 0
        freed = n_tool = n_reasoning = 0
        for m in msgs[:cutoff]:
            if freed >= need:
                break
            if m["role"] != "tool" or m["content"].startswith(ELIDED):
                continue
            note = f"{ELIDED} a {m.get('name', 'tool')} result of {len(m['content'])} characters; " \
                   "call the tool again if you need it]"
            gain = len(tok.encode(m["content"], allow_special=False)) - len(tok.encode(note))
            if gain > 0:
                m["content"] = note
                freed += gain
                n_tool += 1
        for m in msgs[:cutoff]:
            if freed >= need:
                break
            if m["role"] != "assistant":
                continue
            gain = 0
            if len(m.get("reasoning_content") or "") > len(ELIDED_REASONING):
                gain += len(tok.encode(m["reasoning_content"])) - len(tok.encode(ELIDED_REASONING))
                m["reasoning_content"] = ELIDED_REASONING
            for c in m.get("tool_calls") or []:
                if len(c["function"]["arguments"]) > 400:
                    gain += len(tok.encode(c["function"]["arguments"]))
                    c["function"]["arguments"] = _shortened_arguments(c["function"]["arguments"])
            if gain > 0:
                freed += gain
                n_reasoning += 1
        n_steps = 0
        while freed < need and steps and steps[0] < cutoff:
            first = steps.pop(0)
            end = first + 1
            while end < len(msgs) and msgs[end]["role"] == "tool":
                end += 1
            freed += sum(_tokens(tok, m) for m in msgs[first:end])
            del msgs[first:end]
            n_steps += 1
            shift = first - end
            if first > 0 and _is_drop_note(msgs[first - 1]):
                note = msgs[first - 1]
                note["content"] = _drop_note(int(note["content"].split()[1]) + 1)
            else:
                msgs.insert(first, {"role": "system", "content": _drop_note(1)})
                shift += 1
            steps = [i + shift for i in steps]
            cutoff += shift
        return n_tool, n_reasoning, n_steps


ELIDED = "[elided by kimi to free context:"
ELIDED_REASONING = "[reasoning elided by kimi to free context]"


def _tokens(tok, message: dict) -> int:
    """About the tokens a message takes in the prompt (its text parts; markers are few)."""
    parts = [message.get("content") or "", message.get("reasoning_content") or ""]
    parts += [c["id"] + c["function"]["arguments"] for c in message.get("tool_calls") or []]
    return len(tok.encode("".join(parts), allow_special=False)) + 4


def _drop_note(n: int) -> str:
    return f"[kimi: {n} earlier tool-call steps of this task (calls and results) were removed " \
           "to free context]"


def _is_drop_note(m: dict) -> bool:
    return m["role"] == "system" and m["content"].startswith("[kimi: ") and \
        "earlier tool-call steps" in m["content"]


def _shortened_arguments(raw: str) -> str:
    try:
        args = json.loads(raw)
    except json.JSONDecodeError:
        return json.dumps({"elided": "arguments elided by kimi to free context"})
    if not isinstance(args, dict):
        return json.dumps({"elided": "arguments elided by kimi to free context"})
    return json.dumps({k: (v if not isinstance(v, str) or len(v) <= 200
                           else f"[{len(v)} characters elided by kimi]") for k, v in args.items()},
                      ensure_ascii=False)


def display(content: str) -> str:
    """A tool result shortened for a screen: the first lines, and how much was left out."""
    lines = content.splitlines()
    shown = "\n".join(lines[:DISPLAY_LINES])
    if len(shown) > DISPLAY_CHARS:
        shown = shown[:DISPLAY_CHARS] + "…"
    if len(lines) > DISPLAY_LINES:
        shown += f"\n… ({len(lines) - DISPLAY_LINES} more lines)"
    return shown
