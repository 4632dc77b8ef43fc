"""What an agent run reports, step by step: the events every front end consumes.

Plain dataclasses with a `to_dict()` whose `type` and fields are the `--format jsonl` contract.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field


@dataclass
class Started:
    workspace: str
    approval: str
    sandbox: str
    tools: list[str]
    max_steps: int
    context_limit: int


@dataclass
class StepStarted:
    step: int
    prompt_tokens: int


@dataclass
class Prefill:
    step: int
    processed: int  # new prompt tokens processed so far (the rest came from the KV cache)
    total: int


@dataclass
class Reasoning:
    step: int
    text: str  # a delta


@dataclass
class Text:
    step: int
    text: str  # a delta of the assistant's text (the answer, on the last step)


@dataclass
class ToolCallEvent:
    """A call as the model wrote it (`error` set: malformed, it goes back as a tool error)."""

    step: int
    id: str
    name: str
    arguments: dict | None
    raw_arguments: str
    in_reasoning: bool = False  # emitted inside <think>: executed all the same
    error: str | None = None


@dataclass
class Approval:
    """The decision on one call: allowed, denied or refused, and who decided."""

    step: int
    id: str
    name: str
    decision: str  # "allowed" | "denied" | "refused"
    by: str  # "mode" | "user" | "session" | "no-terminal" | "safety"
    reason: str = ""
    message: str = ""  # what the user told the model when denying


@dataclass
class ToolResult:
    step: int
    id: str
    name: str
    ok: bool
    content: str  # exactly what the model receives
    display: str  # shortened for a screen
    seconds: float = 0.0


@dataclass
class ContextElided:
    """Old tool results, then old reasoning, then whole old steps were replaced by notes to stay
    within the context limit."""

    step: int
    tool_results: int
    reasoning: int
    steps: int
    tokens_before: int
    tokens_after: int


@dataclass
class StepFinished:
    step: int
    finish_reason: str  # the generation's: "stop" | "length"
    added_tokens: int  # tokens this step's prompt added to the conversation
    stats: dict = field(default_factory=dict)  # the engine's Stats.to_dict()


@dataclass
class Answer:
    step: int
    text: str
    reasoning: str
    finish_reason: str


@dataclass
class Done:
    reason: str  # "answer" | "max_steps" | "repeated_calls" | "context_full" | "interrupted"
    steps: int
    message: str = ""
    totals: dict = field(default_factory=dict)


Event = (Started | StepStarted | Prefill | Reasoning | Text | ToolCallEvent | Approval | ToolResult
         | ContextElided | StepFinished | Answer | Done)

_TYPES = {
    Started: "start", StepStarted: "step", Prefill: "prefill", Reasoning: "reasoning", Text: "text",
    ToolCallEvent: "tool_call", Approval: "approval", ToolResult: "tool_result",
    ContextElided: "context", StepFinished: "stats", Answer: "answer", Done: "done",
}


def to_dict(event: Event) -> dict:
    """The JSONL form: `{"type": ..., fields...}`."""
    d = asdict(event)
    if isinstance(event, ToolCallEvent) and d["error"] is None:
        del d["error"]
    return {"type": _TYPES[type(event)], **d}
