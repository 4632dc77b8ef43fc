"""Helpers for agent tests: raw model outputs for the scripted model, and an agent to run them."""

from __future__ import annotations

import json
from pathlib import Path

from kimi_cli.agent import events as ev
from kimi_cli.agent.approval import Mode, Policy
from kimi_cli.agent.loop import Agent, AgentConfig
from kimi_cli.agent.sandbox import Sandbox
from kimi_cli.agent.tools import ToolContext, select
from kimi_cli.engine import Engine, SamplingSettings
from kimi_cli.model.scripted import ScriptedModel


def call(name: str, index: int, raw: str | None = None, **args) -> str:
    arguments = raw if raw is not None else json.dumps(args)
    return (f"<|tool_call_begin|>functions.{name}:{index}<|tool_call_argument_begin|>"
            f"{arguments}<|tool_call_end|>")


def step(*calls: str, reasoning: str = "I will use a tool.", text: str = "") -> str:
    return (f"<think>{reasoning}</think>{text}<|tool_calls_section_begin|>{''.join(calls)}"
            "<|tool_calls_section_end|><|im_end|>")


def answer(text: str, reasoning: str = "Done.") -> str:
    return f"<think>{reasoning}</think>{text}<|im_end|>"


def make_agent(outputs: list[str], tokenizer, workspace: Path, mode: Mode = Mode.yolo,
               approver=None, tools=None, sandbox: Sandbox | None = None,
               max_tokens: int = 4096, **cfg) -> Agent:
    engine = Engine(ScriptedModel(outputs, tokenizer), tokenizer)
    ctx = ToolContext(Path(workspace).resolve(), sandbox or Sandbox("none"))
    return Agent(engine, tools if tools is not None else select(None), ctx,
                 Policy(mode, approver), SamplingSettings(temperature=0, max_tokens=max_tokens),
                 AgentConfig(**cfg))


def run(agent: Agent, task: str = "do the task") -> list:
    return list(agent.run(task))


def of(events: list, kind) -> list:
    return [e for e in events if isinstance(e, kind)]


def results(events: list) -> dict[str, ev.ToolResult]:
    return {e.id: e for e in of(events, ev.ToolResult)}
