"""Output parser: reasoning, answer text and tool calls from ids fed one at a time.

Generations are written as text and tokenized, so each marker is its single special id.
"""

from __future__ import annotations

from kimi_cli.chat.parser import (
    End,
    OutputParser,
    ReasoningDelta,
    TextDelta,
    ToolCall,
    parse_all,
)

WEATHER_CALL = (
    "<|tool_call_begin|>functions.get_weather:0<|tool_call_argument_begin|>"
    '{"city": "Beijing"}<|tool_call_end|>'
)


def _events(tokenizer, text):
    parser = OutputParser(tokenizer)
    return [e for i in tokenizer.encode(text) for e in parser.feed(i)] + parser.finish()


def test_reasoning_then_answer_stream_token_by_token(tokenizer):
    events = _events(tokenizer, "<think>Let me think it over.</think>The answer is 4.<|im_end|>")
    reasoning = [e.text for e in events if isinstance(e, ReasoningDelta)]
    text = [e.text for e in events if isinstance(e, TextDelta)]
    assert "".join(reasoning) == "Let me think it over."
    assert "".join(text) == "The answer is 4."
    assert len(reasoning) > 1 and len(text) > 1  # streamed, not delivered at the end
    assert events[-1] == End("stop")
    assert events.index(End("stop")) == len(events) - 1


def test_reasoning_comes_before_answer(tokenizer):
    events = _events(tokenizer, "<think>a</think>b<|im_end|>")
    assert events == [ReasoningDelta("a"), TextDelta("b"), End("stop")]


def test_prompt_that_opened_think_starts_in_reasoning(tokenizer):
    out = parse_all(tokenizer, "plan</think>done<|im_end|>", starts_in_reasoning=True)
    assert (out.reasoning, out.text, out.finish_reason) == ("plan", "done", "stop")


def test_text_without_think_is_answer(tokenizer):
    out = parse_all(tokenizer, "Hello<|im_end|>")
    assert (out.reasoning, out.text, out.finish_reason) == ("", "Hello", "stop")


def test_tool_section_ends_reasoning_without_think_close(tokenizer):
    generated = (
        "<think>I need the tool."
        f"<|tool_calls_section_begin|>{WEATHER_CALL}<|tool_calls_section_end|><|im_end|>"
    )
    out = parse_all(tokenizer, generated)
    assert out.reasoning == "I need the tool."
    assert out.text == ""
    assert out.tool_calls == [
        ToolCall(
            id="functions.get_weather:0",
            name="get_weather",
            index=0,
            arguments={"city": "Beijing"},
            raw_arguments='{"city": "Beijing"}',
        )
    ]
    assert out.finish_reason == "stop"


def test_several_calls_in_one_section(tokenizer):
    generated = (
        "<think>two</think>Checking both.<|tool_calls_section_begin|>"
        f"{WEATHER_CALL}"
        "<|tool_call_begin|>functions.get_weather:1<|tool_call_argument_begin|>"
        '{"city": "Paris"}<|tool_call_end|>'
        "<|tool_calls_section_end|><|im_end|>"
    )
    out = parse_all(tokenizer, generated)
    assert out.text == "Checking both."
    assert [(c.name, c.index, c.arguments) for c in out.tool_calls] == [
        ("get_weather", 0, {"city": "Beijing"}),
        ("get_weather", 1, {"city": "Paris"}),
    ]
    assert all(c.error is None for c in out.tool_calls)


def test_tool_call_is_emitted_when_its_end_marker_arrives(tokenizer):
    parser = OutputParser(tokenizer)
    ids = tokenizer.encode(f"<|tool_calls_section_begin|>{WEATHER_CALL}")
    per_token = [parser.feed(i) for i in ids]
    assert all(events == [] for events in per_token[:-1])
    assert [type(e) for e in per_token[-1]] == [ToolCall]


def test_malformed_json_gives_call_with_error_and_parsing_goes_on(tokenizer):
    generated = (
        "<|tool_calls_section_begin|>"
        '<|tool_call_begin|>functions.shell:0<|tool_call_argument_begin|>{"cmd": "ls"<|tool_call_end|>'
        '<|tool_call_begin|>functions.shell:1<|tool_call_argument_begin|>{"cmd": "pwd"}<|tool_call_end|>'
        "<|tool_calls_section_end|>Done.<|im_end|>"
    )
    out = parse_all(tokenizer, generated)
    bad, good = out.tool_calls
    assert bad.arguments is None and "not valid JSON" in bad.error
    assert bad.raw_arguments == '{"cmd": "ls"'
    assert good.arguments == {"cmd": "pwd"} and good.error is None
    assert out.text == "Done."


def test_json_that_is_not_an_object_is_an_error(tokenizer):
    generated = (
        "<|tool_calls_section_begin|><|tool_call_begin|>functions.f:0"
        "<|tool_call_argument_begin|>[1, 2]<|tool_call_end|><|tool_calls_section_end|>"
    )
    (call,) = parse_all(tokenizer, generated).tool_calls
    assert call.arguments is None
    assert "JSON object" in call.error and "list" in call.error


def test_empty_arguments_mean_no_parameters(tokenizer):
    generated = (
        "<|tool_calls_section_begin|><|tool_call_begin|>functions.now:0"
        "<|tool_call_argument_begin|><|tool_call_end|><|tool_calls_section_end|>"
    )
    (call,) = parse_all(tokenizer, generated).tool_calls
    assert (call.arguments, call.error) == ({}, None)


def test_id_without_prefix_or_index_is_tolerated(tokenizer):
    generated = (
        f"<|tool_calls_section_begin|>{WEATHER_CALL}"
        '<|tool_call_begin|> shell <|tool_call_argument_begin|>{"cmd": "ls"}<|tool_call_end|>'
        "<|tool_calls_section_end|>"
    )
    second = parse_all(tokenizer, generated).tool_calls[1]
    assert (second.id, second.name, second.index, second.error) == ("shell", "shell", 1, None)


def test_truncated_stream_reports_cut_off_call(tokenizer):
    generated = (
        "<think>go<|tool_calls_section_begin|><|tool_call_begin|>functions.shell:0"
        '<|tool_call_argument_begin|>{"cmd": "l'
    )
    events = _events(tokenizer, generated)
    call = next(e for e in events if isinstance(e, ToolCall))
    assert call.name == "shell" and call.arguments is None
    assert "cut off" in call.error
    assert call.raw_arguments == '{"cmd": "l'
    assert events[-1] == End("length")


def test_section_end_before_call_end_reports_cut_off_call(tokenizer):
    generated = (
        "<|tool_calls_section_begin|><|tool_call_begin|>functions.f:0"
        '<|tool_call_argument_begin|>{"a": 1}<|tool_calls_section_end|>after'
    )
    out = parse_all(tokenizer, generated)
    assert out.tool_calls[0].error is not None
    assert out.text == "after"


def test_multibyte_text_split_across_tokens_is_never_half_a_character(tokenizer):
    parser = OutputParser(tokenizer)
    events = [e for i in tokenizer.encode("<think>a</think>") for e in parser.feed(i)]
    events += [e for b in b"<think>" for e in parser.feed(b)]  # literal text, not a marker
    events += [e for b in "你好🙂".encode() for e in parser.feed(b)]  # one byte per token
    deltas = [e.text for e in events if isinstance(e, TextDelta)]
    # "<" waits for one more character: it could begin a marker spelled out in text.
    assert deltas == ["<t", "h", "i", "n", "k", ">", "你", "好", "🙂"]


def test_eos_stops_and_later_tokens_are_ignored(tokenizer):
    parser = OutputParser(tokenizer)
    events = [e for i in tokenizer.encode("<think>x</think>y[EOS]") for e in parser.feed(i)]
    assert events[-1] == End("stop")
    assert parser.feed(tokenizer.encode("z")[0]) == []
    assert parser.finish() == []


def test_finish_passes_its_reason(tokenizer):
    parser = OutputParser(tokenizer)
    parser.feed(tokenizer.encode("a")[0])
    assert parser.finish("cancelled") == [TextDelta("a"), End("cancelled")]


def test_parse_all_accepts_ids(tokenizer):
    ids = tokenizer.encode("<think>r</think>t<|im_end|>")
    out = parse_all(tokenizer, ids)
    assert (out.reasoning, out.text, out.tool_calls, out.finish_reason) == ("r", "t", [], "stop")


# Variants the model produces besides the documented format (vLLM's kimi_k2 parsers handle them)


def test_reasoning_without_think_open_ends_at_think_close(tokenizer):
    out = parse_all(tokenizer, "I should greet.</think>Hello!<|im_end|>")
    assert (out.reasoning, out.text, out.finish_reason) == ("I should greet.", "Hello!", "stop")


def test_text_before_a_marker_is_held_back_until_the_marker_says_what_it_was(tokenizer):
    events = _events(tokenizer, "plan it</think>done<|im_end|>")
    assert events[0] == ReasoningDelta("plan it")  # one delta, when </think> arrives
    assert "".join(e.text for e in events if isinstance(e, TextDelta)) == "done"
    assert not any(isinstance(e, ReasoningDelta) for e in events[1:])


def test_singular_section_spelling_is_a_section_and_never_leaks(tokenizer):
    generated = (f"<think>plan</think>Checking.<|tool_call_section_begin|>{WEATHER_CALL}"
                 "<|tool_call_section_end|>After.<|im_end|>")
    out = parse_all(tokenizer, generated)
    assert (out.reasoning, out.text) == ("plan", "Checking.After.")
    assert [(c.name, c.arguments) for c in out.tool_calls] == [("get_weather",
                                                                 {"city": "Beijing"})]


def test_singular_section_marker_split_one_byte_per_token_streams_the_text_around_it(tokenizer):
    parser = OutputParser(tokenizer)
    events = [e for i in tokenizer.encode("<think>p</think>") for e in parser.feed(i)]
    for b in b"Hi <|tool_call_section_begin|>":  # one byte per token
        events += parser.feed(b)
    events += [e for i in tokenizer.encode(WEATHER_CALL + "<|im_end|>") for e in parser.feed(i)]
    text = [e.text for e in events if isinstance(e, TextDelta)]
    assert "".join(text) == "Hi "
    assert [e.name for e in events if isinstance(e, ToolCall)] == ["get_weather"]


def test_a_lone_angle_bracket_is_text_once_it_cannot_be_a_marker(tokenizer):
    out = parse_all(tokenizer, "<think>r</think>a <b> <|tool_call_sect<|im_end|>")
    assert out.text == "a <b> <|tool_call_sect"


def test_tool_section_inside_reasoning_without_think_close_is_a_call_not_reasoning(tokenizer):
    for spelling in ("tool_calls_section", "tool_call_section"):
        generated = (f"<think>I need the weather.<|{spelling}_begin|>{WEATHER_CALL}"
                     f"<|{spelling}_end|><|im_end|>")
        out = parse_all(tokenizer, generated)
        assert (out.reasoning, out.text) == ("I need the weather.", ""), spelling
        assert [c.arguments for c in out.tool_calls] == [{"city": "Beijing"}], spelling
        assert "tool_call" not in out.reasoning


def test_tool_section_without_any_think_marker_ends_reasoning(tokenizer):
    out = parse_all(tokenizer, f"Need a tool.<|tool_call_section_begin|>{WEATHER_CALL}"
                               "<|tool_call_section_end|><|im_end|>")
    assert (out.reasoning, out.text) == ("Need a tool.", "")
    assert [c.name for c in out.tool_calls] == ["get_weather"]
