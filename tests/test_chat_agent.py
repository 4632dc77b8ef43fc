"""`kimi chat --agent` through a real pseudo-terminal: tool calls run inside chat turns, drawn in
their own panels, recorded in the session file, with approval asked at the terminal; and the
loop's hook it relies on (a turn continues an earlier history).

The model is the scripted test double; what the model was shown is read back from the KV cache
file the chat saves (its token ids are the last prompt and reply).
"""

from __future__ import annotations

import sys
from pathlib import Path

import mlx.core as mx
import pytest
import test_chat_pty
from agent_script import answer, call, make_agent, step
from test_chat_pty import Term, script, session_lines, sessions, torn_panels
from test_cli import kimi

from kimi_cli.agent import events as ev
from kimi_cli.agent.approval import Mode, Policy
from kimi_cli.agent.loop import Agent, AgentConfig
from kimi_cli.agent.tools import select

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="needs a pseudo-terminal")

# The pseudo-terminal fixtures of the plain chat tests: private XDG dirs, a screen per process.
env = test_chat_pty.env
shared_cache = test_chat_pty.shared_cache
term_factory = test_chat_pty.term_factory

WRITE = step(call("write_file", 0, path="notes.txt", content="hello from kimi\n"),
             reasoning="I will write the file first.")
WROTE = answer("I wrote notes.txt for you.", reasoning="The file is written.")


def prompt_seen(env: dict[str, str], monkeypatch) -> str:
    """The token ids in the session's saved KV cache, as text: the model's last prompt."""
    from kimi_cli.checkpoint.demo import ensure_tokenizer_dir
    from kimi_cli.tokenizer import Tokenizer

    monkeypatch.setenv("XDG_CACHE_HOME", env["XDG_CACHE_HOME"])
    tok = Tokenizer.from_dir(ensure_tokenizer_dir())
    [saved] = sessions(env)
    arrays = mx.load(str(saved.with_name(saved.stem + ".kv.safetensors")))
    return tok.decode(arrays["token_ids"].tolist())


def start_chat(term_factory, env, tmp_path: Path, outputs: list[str], *flags: str) -> Term:
    ws = tmp_path / "ws"
    ws.mkdir()
    t = term_factory(["chat", "--agent", "-w", str(ws), *flags, "--model",
                      script(tmp_path, outputs, rate=400)], env)
    t.prompt_ready(1)
    return t


def test_an_agent_turn_writes_a_file_shows_its_panels_and_is_saved(tmp_path, env, term_factory,
                                                                    monkeypatch):
    plain = "<think>No tools this time.</think>Just an answer.<|im_end|>"
    t = start_chat(term_factory, env, tmp_path, [WRITE, WROTE, plain], "--approval", "yolo")
    assert "agent: on" in t.text() and "shell sandbox:" in t.text(), t.capture()
    t.line("please write notes.txt")
    t.wait_for("I wrote notes.txt for you.")
    t.prompt_ready(2)
    assert (tmp_path / "ws" / "notes.txt").read_text() == "hello from kimi\n"
    screen = t.text()
    assert "╭─ tool call write_file" in screen and '"path": "notes.txt"' in screen, t.capture()
    assert "╭─ result of write_file" in screen and "functions.write_file:0" in screen, t.capture()
    assert screen.index("tool call write_file") < screen.index("╭─ Kimi"), t.capture()
    assert "agent: 2 steps, 1 tool call" in screen, t.capture()
    reused = int(screen.split("agent: 2 steps")[0].rsplit("(", 1)[1].split()[0].replace(",", ""))
    assert reused > 0, "the second step reuses the first one's KV cache" + t.capture()

    t.line("/save")
    t.wait_for("saved session")
    t.prompt_ready(3)
    seen = prompt_seen(env, monkeypatch)
    assert seen.startswith("<|im_system|>tool_declare<|im_middle|>[")
    assert "<think>I will write the file first.</think>" in seen, \
        "reasoning stays on the current turn's tool-call message"

    t.line("/agent off")
    t.wait_for("agent mode off")
    t.prompt_ready(4)
    t.line("/help")
    t.wait_for("agent mode: off")
    t.prompt_ready(5)
    t.line("and now without tools")
    t.wait_for("Just an answer.")
    t.prompt_ready(6)
    t.line("/exit")
    assert t.exit_status() == 0, t.capture()
    assert "Traceback" not in t.text(), t.capture()

    seen = prompt_seen(env, monkeypatch)
    assert "tool_declare" not in seen and "and now without tools" in seen
    assert "<think></think>" in seen and "I will write the file first." not in seen, \
        "a finished turn's reasoning is dropped"
    [saved] = sessions(env)
    header, *msgs = session_lines(saved)
    assert [m["role"] for m in msgs] == ["user", "assistant", "tool", "assistant", "user",
                                         "assistant"]
    _, calling, result, final, _, last = msgs
    assert calling["tool_calls"] == [{
        "id": "functions.write_file:0", "type": "function",
        "function": {"name": "write_file",
                     "arguments": '{"path": "notes.txt", "content": "hello from kimi\\n"}'}}]
    assert calling["reasoning_content"] == "I will write the file first."
    assert calling["stats"]["prompt_tokens"] > 0
    assert result["tool_call_id"] == "functions.write_file:0" and result["ok"] is True
    assert result["name"] == "write_file" and "notes.txt" in result["content"]
    assert result["approval"]["decision"] == "allowed" and result["approval"]["by"] == "mode"
    assert final["content"] == "I wrote notes.txt for you." and final["finish_reason"] == "stop"
    assert last["content"] == "Just an answer." and "tool_calls" not in last


def test_ask_mode_asks_at_the_terminal_inside_the_chat(tmp_path, env, term_factory):
    t = start_chat(term_factory, env, tmp_path, [WRITE, WROTE])
    t.line("write notes.txt")
    t.wait_for("[y] yes")
    assert not (tmp_path / "ws" / "notes.txt").exists()
    assert "the agent wants to change a file" in t.text(), t.capture()
    t.line("y")
    t.wait_for("I wrote notes.txt for you.")
    t.prompt_ready(2)
    assert (tmp_path / "ws" / "notes.txt").read_text() == "hello from kimi\n"
    assert "✓ write_file functions.write_file:0 approved" in t.text(), t.capture()
    t.send("\x04")
    assert t.exit_status() == 0, t.capture()
    [saved] = sessions(env)
    [tool] = [m for m in session_lines(saved) if m.get("role") == "tool"]
    assert tool["approval"]["by"] == "user" and tool["ok"] is True


def test_ctrl_c_stops_a_tool_or_a_reply_and_the_history_keeps_what_happened(tmp_path, env,
                                                                             term_factory):
    words = " ".join(f"word{i}" for i in range(300))
    outputs = [step(call("shell", 0, command="sleep 20 && touch late.txt")),
               answer(f"Still here: {words}")]
    t = start_chat(term_factory, env, tmp_path, outputs, "--approval", "yolo")
    t.line("run something slow")
    t.wait_for("running shell")
    t.send("\x03")  # Ctrl-C while the command runs
    t.wait_for("interrupted")
    t.prompt_ready(2)
    t.line("are you there?")
    t.wait_for("word3")
    t.send("\x03")  # Ctrl-C while the answer streams
    t.wait_for("interrupted", count=2)
    t.prompt_ready(3)
    t.line("/exit")
    assert t.exit_status() == 0, t.capture()
    assert not (tmp_path / "ws" / "late.txt").exists()
    [saved] = sessions(env)
    msgs = session_lines(saved)[1:]
    assert [m["role"] for m in msgs] == ["user", "assistant", "tool", "user", "assistant"]
    assert msgs[2]["content"] == "Error: interrupted by the user." and msgs[2]["ok"] is False
    partial = msgs[4]
    assert partial["finish_reason"] == "interrupted" and partial["reasoning_content"] == "Done."
    assert partial["content"].startswith("Still here: word0 word1 word2 word3")
    assert "word299" not in partial["content"]


def test_a_turn_continues_the_history_with_running_call_ids_and_the_kv_cache(tokenizer,
                                                                              tmp_path):
    outputs = [step(call("list_files", 0)), answer("one"), step(call("list_files", 0)),
               answer("two")]
    first = make_agent(outputs, tokenizer, tmp_path)
    list(first.run("first task"))
    history = first.messages[1:]
    second = Agent(first.engine, select(None), first.ctx, Policy(Mode.yolo), first.settings,
                   AgentConfig(), history=history)
    events = list(second.run("second task"))
    assert [e.id for e in events if isinstance(e, ev.ToolCallEvent)] == ["functions.list_files:1"]
    assert second.messages[1:len(history) + 1] == history
    assert second.messages[len(history) + 1] == {"role": "user", "content": "second task"}
    step_one = next(e for e in events if isinstance(e, ev.StepFinished))
    assert step_one.stats["reused_tokens"] > 0.9 * step_one.stats["prompt_tokens"] > 0


def test_agent_flags_need_agent_mode_in_chat(env):
    r = kimi("chat", "--max-steps", "5", "-m", "scripted:/nonexistent.json", env=env)
    assert r.returncode == 2 and r.stderr == "kimi: error: --max-steps needs --agent\n"


def test_y_and_enter_typed_at_once_at_the_approval_leave_the_next_panels_whole(
        tmp_path, env, term_factory):
    # Typed in one write the moment the question shows (tmux send-keys "y" Enter), twice; the
    # step after each approval streams more reasoning than the live region holds.
    thinking = "\n".join(f"line {i} of the next thinking" for i in range(20))
    outputs = [step(call("shell", 0, command="echo one"), reasoning="First a command."),
               step(call("shell", 1, command="echo two"), reasoning=thinking),
               answer("Both ran.", reasoning=thinking)]
    t = start_chat(term_factory, env, tmp_path, outputs)
    t.line("run two commands")
    for n in (1, 2):
        t.wait_for("[y] yes", count=n)
        t.send("y\r")
    t.wait_for("Both ran.")
    t.prompt_ready(2)
    screen = t.text()
    assert torn_panels(screen) == [], t.capture()
    assert screen.count("╭─ thinking") == 3 and screen.count("thought for") == 3, t.capture()
    assert screen.count("line 19 of the next thinking") == 2, t.capture()
    t.send("\x04")
    assert t.exit_status() == 0, t.capture()
