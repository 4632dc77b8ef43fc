"""What one request asks the engine for: prompt ids, sampling, stop sequences, streaming.

Shared by both APIs: the served model's name, the context limit and the sampling checks.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..engine import SamplingSettings
from .wire import ApiError, bad
from .wire import field as get


@dataclass
class Served:
    """The model this server answers for, and its settings."""

    tokenizer: object
    name: str
    aliases: set[str]
    context_limit: int
    reasoning_field: str = "reasoning_content"  # reasoning_content, reasoning or both
    parallel: int = 1  # the most sequences decoded at once (the most choices of a request)

    def check_model(self, body: dict, required: bool = False) -> str:
        model = get(body, "model", str, required=required)
        if model is not None and model not in self.aliases | {self.name}:
            raise ApiError(404, f"model {model!r} not found: this server serves {self.name!r} "
                                "(GET /v1/models)", kind="not_found", param="model",
                           code="model_not_found")
        return self.name

    def render(self, messages: list[dict], tools: list[dict] | None,
               kwargs: dict | None = None) -> list[int]:
        from ..chat.template import render

        try:
            text = render(messages, tools or None, template=self.tokenizer.chat_template,
                          **(kwargs or {}))
        except Exception as e:  # a client's template kwargs or message shapes the template rejects
            raise ApiError(400, f"messages: the chat template cannot render them ({e})",
                           param="messages") from None
        return self.tokenizer.encode(text)


@dataclass
class Plan:
    prompt_ids: list[int]
    settings: SamplingSettings
    stops: list[str] = field(default_factory=list)
    stream: bool = False
    raw: bool = False  # /v1/completions: no chat parsing
    include_usage: bool = False  # OpenAI stream_options.include_usage
    thinking: bool = True  # Anthropic: send thinking blocks
    n: int = 1  # OpenAI: choices of the same prompt, decoded in one batch


def sampling(body: dict, served: Served, prompt_tokens: int, max_tokens: int | None,
             api: str) -> SamplingSettings:
    """Sampling settings from the request's fields, defaults from config, within the context."""
    defaults = SamplingSettings()
    s = SamplingSettings(
        temperature=get(body, "temperature", float, defaults.temperature),
        top_p=get(body, "top_p", float, defaults.top_p),
        min_p=get(body, "min_p", float, defaults.min_p),
        top_k=get(body, "top_k", int, defaults.top_k),
        seed=get(body, "seed", int),
    )
    if s.temperature < 0:
        raise bad("temperature", "must be >= 0")
    if not 0 < s.top_p <= 1:
        raise bad("top_p", "must be in (0, 1]")
    if not 0 <= s.min_p < 1:
        raise bad("min_p", "must be in [0, 1)")
    if s.top_k < 0:
        raise bad("top_k", "must be >= 0")
    limit = served.context_limit
    if max_tokens is not None and max_tokens < 1:
        raise bad("max_tokens", "must be at least 1")
    room = limit - prompt_tokens
    if room < 1 or (max_tokens is not None and max_tokens > room):
        asked = prompt_tokens + (max_tokens or 0)
        if api == "anthropic":
            msg = (f"prompt is too long: {prompt_tokens} tokens + {max_tokens} max_tokens "
                   f"> {limit} maximum context")
        else:
            wanted = f"{asked} tokens ({prompt_tokens} in the messages, {max_tokens} in the " \
                     "completion)" if max_tokens else f"{prompt_tokens} tokens in the messages"
            msg = (f"This model's maximum context length is {limit} tokens. However, you "
                   f"requested {wanted}. Please reduce the length of the messages or "
                   "completion.")
        raise ApiError(400, msg, param="messages", code="context_length_exceeded")
    s.max_tokens = max_tokens or room  # this model's default: up to the context limit
    return s
