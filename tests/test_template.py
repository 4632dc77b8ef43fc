"""Chat template: the prompt strings Kimi-K2-Thinking was trained on, rendered exactly.

The expected strings are the release's own renders (shared/reference/template_cases.json).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from kimi_cli.chat.template import builtin_template, load_template, render
from kimi_cli.errors import CheckpointError

REFERENCE = Path(__file__).resolve().parents[2] / "shared" / "reference"

CASES = {
    "single_user": {
        "messages": [{"role": "user", "content": "Hi"}],
        "tools": None,
        "add_generation_prompt": True,
        "expected": (
            "<|im_system|>system<|im_middle|>You are Kimi, an AI assistant created by Moonshot AI.<|im_end|>"
            "<|im_user|>user<|im_middle|>Hi<|im_end|>"
            "<|im_assistant|>assistant<|im_middle|>"
        ),
    },
    "system_and_history": {
        "messages": [
            {"role": "system", "content": "You are a helpful assistant."},
            {"role": "user", "content": "What is 2+2?"},
            {"role": "assistant", "content": "4", "reasoning_content": "2+2=4."},
            {"role": "user", "content": "And 3+3?"},
        ],
        "tools": None,
        "add_generation_prompt": True,
        "expected": (
            "<|im_system|>system<|im_middle|>You are a helpful assistant.<|im_end|>"
            "<|im_user|>user<|im_middle|>What is 2+2?<|im_end|>"
            "<|im_assistant|>assistant<|im_middle|><think></think>4<|im_end|>"
            "<|im_user|>user<|im_middle|>And 3+3?<|im_end|>"
            "<|im_assistant|>assistant<|im_middle|>"
        ),
    },
    "tool_turn_in_progress": {
        "messages": [
            {"role": "user", "content": "Weather in Beijing?"},
            {
                "role": "assistant",
                "content": "",
                "reasoning_content": "I should call the tool.",
                "tool_calls": [
                    {
                        "id": "functions.get_weather:0",
                        "type": "function",
                        "function": {"name": "get_weather", "arguments": '{"city": "Beijing"}'},
                    }
                ],
            },
            {
                "role": "tool",
                "tool_call_id": "functions.get_weather:0",
                "name": "get_weather",
                "content": '{"weather": "Sunny"}',
            },
        ],
        "tools": [
            {
                "type": "function",
                "function": {
                    "name": "get_weather",
                    "description": "Get weather",
                    "parameters": {
                        "type": "object",
                        "required": ["city"],
                        "properties": {"city": {"type": "string", "description": "City name"}},
                    },
                },
            }
        ],
        "add_generation_prompt": True,
        "expected": (
            '<|im_system|>tool_declare<|im_middle|>[{"function":{"description":"Get weather","name":"get_weather","parameters":{"properties":{"city":{"description":"City name","type":"string"}},"required":["city"],"type":"object"}},"type":"function"}]<|im_end|>'
            "<|im_system|>system<|im_middle|>You are Kimi, an AI assistant created by Moonshot AI.<|im_end|>"
            "<|im_user|>user<|im_middle|>Weather in Beijing?<|im_end|>"
            '<|im_assistant|>assistant<|im_middle|><think>I should call the tool.</think><|tool_calls_section_begin|><|tool_call_begin|>functions.get_weather:0<|tool_call_argument_begin|>{"city": "Beijing"}<|tool_call_end|><|tool_calls_section_end|><|im_end|>'
            '<|im_system|>get_weather<|im_middle|>## Return of functions.get_weather:0\n{"weather": "Sunny"}<|im_end|>'
            "<|im_assistant|>assistant<|im_middle|>"
        ),
    },
    "two_parallel_calls_dict_args": {
        "messages": [
            {"role": "user", "content": "Beijing and Paris?"},
            {
                "role": "assistant",
                "content": "Checking both.",
                "reasoning_content": "Two cities.",
                "tool_calls": [
                    {
                        "id": "functions.get_weather:0",
                        "type": "function",
                        "function": {"name": "get_weather", "arguments": {"city": "Beijing"}},
                    },
                    {
                        "id": "functions.get_weather:1",
                        "type": "function",
                        "function": {"name": "get_weather", "arguments": {"city": "Paris"}},
                    },
                ],
            },
            {"role": "tool", "tool_call_id": "functions.get_weather:0", "content": "rain"},
            {"role": "tool", "tool_call_id": "functions.get_weather:1", "content": "sun"},
        ],
        "tools": [
            {
                "type": "function",
                "function": {
                    "name": "get_weather",
                    "description": "Get weather",
                    "parameters": {
                        "type": "object",
                        "required": ["city"],
                        "properties": {"city": {"type": "string", "description": "City name"}},
                    },
                },
            }
        ],
        "add_generation_prompt": True,
        "expected": (
            '<|im_system|>tool_declare<|im_middle|>[{"function":{"description":"Get weather","name":"get_weather","parameters":{"properties":{"city":{"description":"City name","type":"string"}},"required":["city"],"type":"object"}},"type":"function"}]<|im_end|>'
            "<|im_system|>system<|im_middle|>You are Kimi, an AI assistant created by Moonshot AI.<|im_end|>"
            "<|im_user|>user<|im_middle|>Beijing and Paris?<|im_end|>"
            '<|im_assistant|>assistant<|im_middle|><think>Two cities.</think>Checking both.<|tool_calls_section_begin|><|tool_call_begin|>functions.get_weather:0<|tool_call_argument_begin|>{"city": "Beijing"}<|tool_call_end|><|tool_call_begin|>functions.get_weather:1<|tool_call_argument_begin|>{"city": "Paris"}<|tool_call_end|><|tool_calls_section_end|><|im_end|>'
            "<|im_system|>tool<|im_middle|>## Return of functions.get_weather:0\nrain<|im_end|>"
            "<|im_system|>tool<|im_middle|>## Return of functions.get_weather:1\nsun<|im_end|>"
            "<|im_assistant|>assistant<|im_middle|>"
        ),
    },
    "finished_tool_turn_then_new_user": {
        "messages": [
            {"role": "user", "content": "ls"},
            {
                "role": "assistant",
                "content": "",
                "reasoning_content": "run ls",
                "tool_calls": [
                    {
                        "id": "functions.shell:0",
                        "type": "function",
                        "function": {"name": "shell", "arguments": '{"cmd":"ls"}'},
                    }
                ],
            },
            {"role": "tool", "tool_call_id": "functions.shell:0", "content": "a.txt\nb.txt"},
            {"role": "assistant", "content": "Two files.", "reasoning_content": "saw two"},
            {"role": "user", "content": "thanks"},
        ],
        "tools": [
            {
                "type": "function",
                "function": {
                    "name": "shell",
                    "description": "Run a command; returns stdout/stderr. Unicode: 你好",
                    "parameters": {
                        "type": "object",
                        "properties": {
                            "cmd": {"type": "string"},
                            "timeout": {"type": "integer", "default": 30},
                        },
                        "required": ["cmd"],
                    },
                },
            }
        ],
        "add_generation_prompt": True,
        "expected": (
            '<|im_system|>tool_declare<|im_middle|>[{"function":{"description":"Run a command; returns stdout/stderr. Unicode: 你好","name":"shell","parameters":{"properties":{"cmd":{"type":"string"},"timeout":{"default":30,"type":"integer"}},"required":["cmd"],"type":"object"}},"type":"function"}]<|im_end|>'
            "<|im_system|>system<|im_middle|>You are Kimi, an AI assistant created by Moonshot AI.<|im_end|>"
            "<|im_user|>user<|im_middle|>ls<|im_end|>"
            '<|im_assistant|>assistant<|im_middle|><think></think><|tool_calls_section_begin|><|tool_call_begin|>functions.shell:0<|tool_call_argument_begin|>{"cmd":"ls"}<|tool_call_end|><|tool_calls_section_end|><|im_end|>'
            "<|im_system|>tool<|im_middle|>## Return of functions.shell:0\na.txt\nb.txt<|im_end|>"
            "<|im_assistant|>assistant<|im_middle|><think></think>Two files.<|im_end|>"
            "<|im_user|>user<|im_middle|>thanks<|im_end|>"
            "<|im_assistant|>assistant<|im_middle|>"
        ),
    },
    "no_generation_prompt": {
        "messages": [
            {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello!", "reasoning_content": "greet"},
        ],
        "tools": None,
        "add_generation_prompt": False,
        "expected": (
            "<|im_system|>system<|im_middle|>You are Kimi, an AI assistant created by Moonshot AI.<|im_end|>"
            "<|im_user|>user<|im_middle|>Hi<|im_end|>"
            "<|im_assistant|>assistant<|im_middle|><think></think>Hello!<|im_end|>"
        ),
    },
}


@pytest.mark.parametrize("name", list(CASES))
def test_builtin_template_renders_release_case(name):
    case = CASES[name]
    out = render(case["messages"], case["tools"], case["add_generation_prompt"])
    assert out == case["expected"]


def test_release_template_and_ours_render_reference_cases_identically():
    if not REFERENCE.is_dir():
        pytest.skip(f"{REFERENCE} not present")
    release = (REFERENCE / "chat_template_kimi_k2_thinking.jinja").read_text(encoding="utf-8")
    cases = json.loads((REFERENCE / "template_cases.json").read_text(encoding="utf-8"))
    assert cases
    for name, case in cases.items():
        args = (case["messages"], case["tools"], case["add_generation_prompt"])
        assert render(*args, template=release) == case["expected"], name
        assert render(*args) == case["expected"], name


def test_generation_prompt_is_on_by_default_and_has_no_think():
    out = render([{"role": "user", "content": "Hi"}])
    assert out.endswith("<|im_end|><|im_assistant|>assistant<|im_middle|>")


def test_given_template_text_is_used_instead_of_builtin():
    out = render([{"role": "user", "content": "Hi"}], template="{{ messages[0].content }}!")
    assert out == "Hi!"


def test_tool_list_is_deep_sorted_compact_and_keeps_non_ascii_and_html():
    tools = [{"type": "function", "function": {"name": "f", "description": "<b>é</b> & 你"}}]
    out = render([{"role": "user", "content": "x"}], tools)
    assert out.startswith(
        '<|im_system|>tool_declare<|im_middle|>[{"function":{"description":"<b>é</b> & 你",'
        '"name":"f"},"type":"function"}]<|im_end|>'
    )


def test_dict_arguments_render_as_spaced_json_in_their_own_key_order():
    call = {"id": "functions.f:0", "function": {"name": "f", "arguments": {"b": 1, "a": "é"}}}
    messages = [{"role": "user", "content": "x"}, {"role": "assistant", "tool_calls": [call]}]
    out = render(messages, add_generation_prompt=False)
    assert '<|tool_call_argument_begin|>{"b": 1, "a": "é"}<|tool_call_end|>' in out


def test_list_content_joins_text_parts():
    content = [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]
    out = render([{"role": "user", "content": content}], add_generation_prompt=False)
    assert out.endswith("<|im_user|>user<|im_middle|>ab<|im_end|>")


def test_missing_reasoning_in_current_turn_renders_empty_think():
    call = {"id": "functions.f:0", "function": {"name": "f", "arguments": "{}"}}
    messages = [
        {"role": "user", "content": "x"},
        {"role": "assistant", "content": "", "reasoning_content": None, "tool_calls": [call]},
    ]
    assert "<|im_middle|><think></think><|tool_calls_section_begin|>" in render(messages)


def test_load_template_prefers_chat_template_jinja(tmp_path):
    (tmp_path / "chat_template.jinja").write_text("file")
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": "config"}))
    assert load_template(tmp_path) == "file"


def test_load_template_falls_back_to_tokenizer_config(tmp_path):
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": "config"}))
    assert load_template(tmp_path) == "config"


def test_load_template_is_none_without_one(tmp_path):
    assert load_template(tmp_path) is None
    (tmp_path / "tokenizer_config.json").write_text("{}")
    assert load_template(tmp_path) is None


def test_load_template_rejects_bad_syntax_naming_the_file(tmp_path):
    (tmp_path / "chat_template.jinja").write_text("{% if %}")
    with pytest.raises(CheckpointError, match="chat_template.jinja"):
        load_template(tmp_path)


def test_load_template_rejects_corrupt_tokenizer_config(tmp_path):
    (tmp_path / "tokenizer_config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="tokenizer_config.json"):
        load_template(tmp_path)


def test_builtin_template_ships_with_the_package():
    assert "<|tool_calls_section_begin|>" in builtin_template()
