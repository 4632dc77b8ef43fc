"""The scripted test double: replays outputs through the real tokenizer, engine and parser."""

from __future__ import annotations

import json

import pytest

from kimi_cli.chat.parser import parse_all
from kimi_cli.engine import Done, Engine, SamplingSettings, Token
from kimi_cli.errors import KimiError
from kimi_cli.model.scripted import load_scripted


def script(tmp_path, outputs) -> str:
    path = tmp_path / "script.json"
    path.write_text(json.dumps(outputs))
    return f"scripted:{path}"


def generate(engine, tokenizer, prompt="hi", **kw):
    ids = tokenizer.encode(prompt)
    events = list(engine.generate(ids, SamplingSettings(**kw)))
    done = events[-1]
    assert isinstance(done, Done)
    return done


def test_outputs_replay_in_order_through_the_parser(tmp_path, tokenizer):
    spec = script(tmp_path, ["<think>plan</think>first answer",
                             "<think>more</think>second<|im_end|>"])
    engine = Engine(load_scripted(spec, tokenizer), tokenizer)
    first = generate(engine, tokenizer)  # default temperature 1.0: still exactly the script
    parsed = parse_all(tokenizer, first.token_ids)
    assert (parsed.reasoning, parsed.text, parsed.finish_reason) == ("plan", "first answer",
                                                                     "stop")
    second = generate(engine, tokenizer, prompt="hi again")
    parsed = parse_all(tokenizer, second.token_ids)
    assert (parsed.reasoning, parsed.text) == ("more", "second")


def test_tool_calls_and_streaming_token_by_token(tmp_path, tokenizer):
    call = ("<|tool_calls_section_begin|><|tool_call_begin|>functions.shell:0"
            '<|tool_call_argument_begin|>{"command": "ls"}<|tool_call_end|>'
            "<|tool_calls_section_end|>")
    engine = Engine(load_scripted(script(tmp_path, [f"<think>run ls</think>{call}"]),
                                  tokenizer), tokenizer)
    events = list(engine.generate(tokenizer.encode("x"), SamplingSettings()))
    tokens = [e for e in events if isinstance(e, Token)]
    assert len(tokens) > 5  # streamed, not in one piece
    parsed = parse_all(tokenizer, events[-1].token_ids)
    assert parsed.tool_calls[0].name == "shell"
    assert parsed.tool_calls[0].arguments == {"command": "ls"}


def test_running_out_of_script_is_a_clear_error(tmp_path, tokenizer):
    engine = Engine(load_scripted(script(tmp_path, ["only one"]), tokenizer), tokenizer)
    generate(engine, tokenizer)
    with pytest.raises(KimiError, match="has 1 outputs and generation 2"):
        generate(engine, tokenizer)


def test_max_tokens_still_applies(tmp_path, tokenizer):
    engine = Engine(load_scripted(script(tmp_path, ["a b c d e f g h i j k"]), tokenizer),
                    tokenizer)
    done = generate(engine, tokenizer, max_tokens=3)
    assert done.finish_reason == "length" and len(done.token_ids) == 3


@pytest.mark.parametrize("content,message", [
    ("not json", "not valid JSON"),
    ('{"a": 1}', "expected a JSON list of strings"),
])
def test_bad_script_files(tmp_path, tokenizer, content, message):
    path = tmp_path / "bad.json"
    path.write_text(content)
    with pytest.raises(KimiError, match=message):
        load_scripted(f"scripted:{path}", tokenizer)
    with pytest.raises(KimiError, match="no such script file"):
        load_scripted(f"scripted:{tmp_path / 'missing.json'}", tokenizer)


def test_a_prompt_longer_than_one_prefill_chunk_keeps_the_whole_output(tmp_path, tokenizer):
    engine = Engine(load_scripted(script(tmp_path, ["<think>plan</think>answer"]), tokenizer),
                    tokenizer, prefill_chunk=16)
    done = generate(engine, tokenizer, prompt="hello world " * 20)
    assert tokenizer.decode(done.token_ids) == "<think>plan</think>answer<|im_end|>"
