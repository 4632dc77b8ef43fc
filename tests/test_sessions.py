"""Session files (readable JSONL) and the KV cache saved beside them.

A restored KV cache must continue a conversation exactly as the process that saved it would
have, report the tokens it saved from processing again, and be refused for another model.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from kimi_cli.chat.reply import generate_reply
from kimi_cli.chat.template import render
from kimi_cli.engine import Engine, SamplingSettings
from kimi_cli.errors import KimiError
from kimi_cli.sessions import (
    KVMismatch,
    Session,
    find_session,
    latest_session,
    list_sessions,
    load_kv,
    model_fingerprint,
    save_kv,
)
from kimi_cli.ui.prefs import read_prefs, write_pref

GREEDY = SamplingSettings(temperature=0.0, max_tokens=10)


def test_session_file_round_trip(tmp_path):
    s = Session.create("demo", {"temperature": 0.6}, "Be brief.", directory=tmp_path)
    assert not s.path.exists(), "nothing is written before the first message"
    s.append({"role": "user", "content": "héllo\nworld"})
    s.append({"role": "assistant", "content": "hi", "reasoning_content": "greet",
              "tool_calls": [{"id": "functions.ls:0", "type": "function",
                              "function": {"name": "ls", "arguments": "{}"}}],
              "finish_reason": "stop", "stats": {"prompt_tokens": 5}})
    s.update_header(name="greeting")

    lines = s.path.read_text(encoding="utf-8").splitlines()
    assert len(lines) == 3  # one readable JSON object per line, the header first
    header = json.loads(lines[0])
    assert header["type"] == "session" and header["id"] == s.id and header["name"] == "greeting"
    assert header["model"] == "demo" and header["settings"] == {"temperature": 0.6}
    assert "héllo" in lines[1], "text stays readable (no \\u escapes)"
    assert all("time" in json.loads(line) for line in lines[1:])

    back = Session.load(s.path)
    assert back.header == s.header and back.messages == s.messages
    assert back.title == "héllo world"
    prompt = back.prompt_messages()
    assert prompt[0] == {"role": "system", "content": "Be brief."}
    assert set(prompt[2]) == {"role", "content", "reasoning_content", "tool_calls"}


def test_a_line_cut_short_by_a_crash_is_dropped_and_garbage_is_refused(tmp_path):
    s = Session.create("demo", directory=tmp_path)
    s.append({"role": "user", "content": "one"})
    with open(s.path, "a") as f:
        f.write('{"role": "assistant", "cont')
    assert [m["content"] for m in Session.load(s.path).messages] == ["one"]

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"role": "user"}\n')
    with pytest.raises(KimiError, match="not a kimi session file"):
        Session.load(bad)


def test_sessions_are_found_by_id_prefix_and_name(tmp_path):
    a = Session.create("demo", directory=tmp_path)
    a.append({"role": "user", "content": "first"})
    b = Session.create("demo", directory=tmp_path)
    b.header["id"] = a.id[:-1] + ("0" if a.id[-1] != "0" else "1")
    b.path = tmp_path / f"{b.id}.jsonl"
    b.append({"role": "user", "content": "second"})
    b.update_header(name="later")

    assert find_session(a.id, tmp_path) == a.path
    assert find_session("later", tmp_path) == b.path
    with pytest.raises(KimiError, match="ambiguous"):
        find_session(a.id[:-1], tmp_path)
    with pytest.raises(KimiError, match="no session"):
        find_session("nope", tmp_path)
    assert {i.id for i in list_sessions(tmp_path)} == {a.id, b.id}
    assert latest_session(tmp_path) in (a.path, b.path)


def _conversation(tokenizer, engine, turns: list[str]) -> tuple[list[dict], list]:
    messages: list[dict] = []
    replies = []
    for text in turns:
        messages.append({"role": "user", "content": text})
        ids = tokenizer.encode(render(messages, template=tokenizer.chat_template))
        reply = generate_reply(engine, tokenizer, ids, GREEDY)
        messages.append(reply.message())
        replies.append(reply)
    return messages, replies


@pytest.fixture(scope="module")
def tiny_model(tiny_ckpt):
    from kimi_cli.loader import load

    return load(tiny_ckpt)


def test_restored_kv_cache_continues_identically_and_is_reused(tiny_model, tmp_path):
    model, tok = tiny_model
    saver = Engine(model, tok)
    messages, _ = _conversation(tok, saver, ["the first question", "a second one"])
    kv = tmp_path / "s.kv.safetensors"
    info = save_kv(kv, saver, model_fingerprint(model))
    assert info.tokens == len(saver.cached_ids) > 40

    follow_up = [*messages, {"role": "user", "content": "and a third"}]
    ids = tok.encode(render(follow_up, template=tok.chat_template))
    expected = generate_reply(saver, tok, ids, GREEDY)

    resumed = Engine(model, tok)
    restored = load_kv(kv, resumed, model_fingerprint(model))
    assert restored.tokens == info.tokens
    got = generate_reply(resumed, tok, ids, GREEDY)
    assert got.token_ids == expected.token_ids
    assert got.stats.reused_tokens == expected.stats.reused_tokens > 40
    assert got.stats.prefilled_tokens == len(ids) - got.stats.reused_tokens

    cold = generate_reply(Engine(model, tok), tok, ids, GREEDY)
    assert cold.stats.reused_tokens == 0 and cold.stats.prefilled_tokens == len(ids)


def test_kv_cache_of_another_model_is_refused(tiny_model, tmp_path):
    from kimi_cli.checkpoint.synthetic import write_checkpoint
    from kimi_cli.loader import load

    model, tok = tiny_model
    engine = Engine(model, tok)
    _conversation(tok, engine, ["hello"])
    kv = tmp_path / "s.kv.safetensors"
    save_kv(kv, engine, model_fingerprint(model))

    other_model, other_tok = load(write_checkpoint(tmp_path / "other", "tiny", seed=7))
    assert model_fingerprint(other_model) != model_fingerprint(model)
    other = Engine(other_model, other_tok)
    with pytest.raises(KVMismatch, match="different model"):
        load_kv(kv, other, model_fingerprint(other_model))
    assert other.cached_ids == [] and other.cache[0].offset == 0


def test_scripted_model_kv_restores_positions(tokenizer, tmp_path):
    from kimi_cli.model.scripted import ScriptedModel

    model = ScriptedModel(["<think>a</think>b", "<think>c</think>d"], tokenizer)
    engine = Engine(model, tokenizer)
    _conversation(tokenizer, engine, ["x"])
    kv = tmp_path / "s.kv.safetensors"
    save_kv(kv, engine, model_fingerprint(model))
    fresh = Engine(ScriptedModel(["<think>c</think>d"], tokenizer), tokenizer)
    load_kv(kv, fresh, model_fingerprint(model))
    assert fresh.cached_ids == engine.cached_ids
    assert fresh.cache[0].offset == len(engine.cached_ids)


def test_preferences_are_remembered_in_config_toml(tmp_path: Path):
    path = tmp_path / "config.toml"
    path.write_text('# mine\nmodel = "demo"\n\n[agent]\nthink = "other"\n')
    write_pref("think", "collapse", path)
    write_pref("think", "hide", path)
    assert read_prefs(path) == {"model": "demo", "think": "hide"}
    assert path.read_text().startswith('# mine\nmodel = "demo"\n')
    assert path.read_text().count("think =") == 2  # the [agent] table is left alone
