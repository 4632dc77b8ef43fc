"""What a chat's agent mode is: on or off, and the tools, workspace, approval policy and sandbox
its turns get (`--agent` flags, `/agent on|off`).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path

from .. import config
from ..agent.approval import Mode, Policy, StreamApprover
from ..agent.sandbox import Sandbox, choose
from ..agent.tools import Tool, ToolContext, select
from .term import is_tty


@dataclass
class AgentMode:
    """Whether the chat's turns run the agent, and what the agent gets. The tool context and
    the approval policy are made once, so approvals "for this session" last across turns."""

    tools: list[Tool] = field(default_factory=lambda: select(None))
    workspace: Path = field(default_factory=lambda: Path.cwd().resolve())
    approval: Mode = Mode.ask
    allow_network: bool = False
    max_steps: int = config.AGENT_MAX_STEPS
    sandbox: Sandbox | None = None  # checked by cli._agent_options; None: the best one here
    max_command_timeout: float = config.AGENT_SHELL_MAX_TIMEOUT
    on: bool = False
    _ctx: ToolContext | None = field(default=None, repr=False)
    _policy: Policy | None = field(default=None, repr=False)

    @classmethod
    def from_options(cls, opts: dict, on: bool) -> AgentMode:
        """From the checked `--tools/--workspace/--approval/...` flags (cli._agent_options)."""
        return cls(tools=opts["tools"], workspace=opts["workspace"],
                   approval=Mode(opts["approval"].value if opts["approval"] else "ask"),
                   allow_network=opts["allow_network"],
                   max_steps=opts["max_steps"] or config.AGENT_MAX_STEPS,
                   sandbox=opts["sandbox"], on=on, max_command_timeout=(
                       opts["max_command_timeout"] or config.AGENT_SHELL_MAX_TIMEOUT))

    def context(self) -> ToolContext:
        if self._ctx is None:
            self._ctx = ToolContext(self.workspace, self.sandbox or choose(self.allow_network),
                                    shell_max_timeout=self.max_command_timeout)
        return self._ctx

    def policy(self, question_to) -> Policy:
        """Asks on `question_to` (the chat's screen) when it and stdin are a terminal."""
        if self._policy is None:
            terminal = is_tty(sys.stdin) and is_tty(question_to)
            self._policy = Policy(self.approval,
                                  StreamApprover(sys.stdin, question_to) if terminal else None)
        return self._policy

    def describe(self) -> str:
        return (f"workspace {self.workspace} · approval: {self.approval.value} · tools: "
                f"{', '.join(t.name for t in self.tools)} · shell sandbox: "
                f"{self.context().sandbox.describe()}")
