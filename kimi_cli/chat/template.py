"""Render chat messages into Kimi-K2-Thinking's prompt string with a Jinja chat template.

Uses our built-in template or a checkpoint's own, in a sandbox configured like transformers'.
"""

from __future__ import annotations

import json
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Any

import jinja2
from jinja2.sandbox import ImmutableSandboxedEnvironment

from kimi_cli.config import DEFAULT_SYSTEM_PROMPT
from kimi_cli.errors import CheckpointError

TEMPLATE_FILE = "chat_template.jinja"


def render(
    messages: list[dict],
    tools: list[dict] | None = None,
    add_generation_prompt: bool = True,
    template: str | None = None,
    **template_kwargs: Any,
) -> str:
    """The prompt for `messages` (OpenAI-style dicts, plus `reasoning_content` on assistants).

    `template` is the text of a checkpoint's chat template; None uses the built-in one.
    `template_kwargs` are extra template variables (as transformers' apply_chat_template takes).
    """
    compiled = _compile(builtin_template() if template is None else template)
    return compiled.render(
        **template_kwargs,
        messages=messages,
        # The release's tokenizer deep-sorts the tool list before rendering (apply_chat_template);
        # tool-call arguments keep their own key order.
        tools=_deep_sorted(tools) if tools else tools,
        add_generation_prompt=add_generation_prompt,
        default_system_prompt=DEFAULT_SYSTEM_PROMPT,
    )


def load_template(checkpoint_dir: str | Path) -> str | None:
    """A checkpoint's chat template: chat_template.jinja, else tokenizer_config.json's; or None."""
    checkpoint_dir = Path(checkpoint_dir)
    path = checkpoint_dir / TEMPLATE_FILE
    if path.is_file():
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise CheckpointError(f"{path}: cannot read it ({e})") from None
    else:
        path = checkpoint_dir / "tokenizer_config.json"
        text = _template_from_config(path) if path.is_file() else None
    if text is not None:
        try:
            _compile(text)
        except CheckpointError as e:
            raise CheckpointError(f"{path}: {e}") from None
    return text


@lru_cache(maxsize=1)
def builtin_template() -> str:
    return resources.files("kimi_cli.chat").joinpath(TEMPLATE_FILE).read_text(encoding="utf-8")


def tojson(
    value: Any,
    indent: int | None = None,
    separators: tuple[str, str] | None = None,
    sort_keys: bool = False,
) -> str:
    # transformers' filter: unlike Jinja's own tojson it keeps non-ASCII text and does not
    # HTML-escape, because the result is a prompt, not a web page.
    return json.dumps(
        value, ensure_ascii=False, indent=indent, separators=separators, sort_keys=sort_keys
    )


@lru_cache(maxsize=1)
def _environment() -> ImmutableSandboxedEnvironment:
    # The settings transformers renders chat templates with; the release's template relies on
    # them for whitespace and on loopcontrols for `{% break %}`.
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"]
    )
    env.filters["tojson"] = tojson
    return env


@lru_cache(maxsize=8)
def _compile(text: str) -> jinja2.Template:
    try:
        return _environment().from_string(text)
    except jinja2.TemplateSyntaxError as e:
        raise CheckpointError(f"chat template line {e.lineno}: {e.message}") from None


def _template_from_config(path: Path) -> str | None:
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: not readable JSON ({e})") from None
    value = config.get("chat_template") if isinstance(config, dict) else None
    # transformers also allows a list of named templates; "default" is the chat one.
    if isinstance(value, list):
        named = {t.get("name"): t.get("template") for t in value if isinstance(t, dict)}
        value = named.get("default")
    return value if isinstance(value, str) else None


def _deep_sorted(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _deep_sorted(v) for k, v in sorted(value.items())}
    if isinstance(value, list):
        return [_deep_sorted(v) for v in value]
    return value
