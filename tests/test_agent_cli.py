"""`kimi run --agent` as a real process: streams, formats, exit codes, no-terminal denial, Ctrl-C
in the middle of a tool, and approval at a terminal.

The model is the scripted test double (`--model scripted:FILE`); XDG paths are private.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from agent_script import answer, call, step
from test_cli import KIMI, kimi

from kimi_cli import config
from kimi_cli.agent import events as ev
from kimi_cli.agent.frontend import AgentStopped, check_done
from kimi_cli.agent.tools import select
from kimi_cli.cli import _agent_options
from kimi_cli.errors import UsageError


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("agent-home")
    e = {k: v for k, v in os.environ.items()
         if k not in ("KIMI_MODEL", "KIMI_MLX_HOME", "NO_COLOR", "FORCE_COLOR")}
    for var in ("XDG_CACHE_HOME", "XDG_STATE_HOME", "XDG_CONFIG_HOME", "HF_HOME"):
        (root / var).mkdir()
        e[var] = str(root / var)
    e["HF_HUB_OFFLINE"] = "1"
    return e


def script(path, outputs) -> str:
    path.write_text(json.dumps(outputs))
    return f"scripted:{path}"


WRITE_EDIT_RUN = [
    step(call("write_file", 0, path="hello.py", content="print('hello')\n")),
    step(call("edit_file", 1, path="hello.py", old="hello", new="world")),
    step(call("shell", 2, command="python3 hello.py")),
    answer("It prints world."),
]


def test_text_run_puts_the_answer_on_stdout_and_the_trace_on_stderr(tmp_path, env):
    ws = tmp_path / "ws"
    ws.mkdir()
    spec = script(tmp_path / "s.json", WRITE_EDIT_RUN)
    r = kimi("run", "--agent", "--approval", "yolo", "-w", str(ws), "-m", spec,
             "make hello.py print world", env=env)
    assert r.returncode == 0, r.stderr
    assert r.stdout == "It prints world.\n"
    assert (ws / "hello.py").read_text() == "print('world')\n"
    assert "functions.shell:2" in r.stderr and "world" in r.stderr
    assert "\x1b[" not in r.stdout + r.stderr  # not a terminal: no colour, no cursor moves
    closing = r.stderr.splitlines()[-1]
    assert re.fullmatch(r"\[agent: 4 steps · 3 tool calls · [\d,]+ prompt tokens, [\d,]+ "
                        r"processed \([\d,]+ from the KV cache\) · [\d,]+ generated · "
                        r"answered\]", closing), closing


def test_the_closing_line_says_how_many_tool_calls_were_denied(tmp_path, env):
    # No terminal to ask on, approval `ask`: the write, the edit and the command are denied.
    spec = script(tmp_path / "s.json", WRITE_EDIT_RUN)
    r = kimi("run", "--agent", "-w", str(tmp_path), "-m", spec, "task", env=env)
    assert r.returncode == 0, r.stderr
    closing = r.stderr.splitlines()[-1]
    assert closing.startswith("[agent: 4 steps · 3 tool calls (3 denied) · "), closing
    assert closing.endswith(" · answered]"), closing


def test_without_a_terminal_writes_and_commands_are_denied_by_default(tmp_path, env):
    spec = script(tmp_path / "s.json", WRITE_EDIT_RUN)
    r = kimi("run", "--agent", "-w", str(tmp_path), "-m", spec, "--format", "jsonl", "task",
             env=env)
    assert r.returncode == 0, r.stderr
    events = [json.loads(line) for line in r.stdout.splitlines()]
    assert events[0]["type"] == "start" and events[0]["approval"] == "ask"
    denials = [(e["id"], e["by"]) for e in events if e["type"] == "approval"]
    assert denials == [("functions.write_file:0", "no-terminal"),
                       ("functions.edit_file:1", "no-terminal"),
                       ("functions.shell:2", "no-terminal")]
    assert all(e["decision"] == "denied" for e in events if e["type"] == "approval")
    assert not (tmp_path / "hello.py").exists()
    tool_results = [e for e in events if e["type"] == "tool_result"]
    assert all("--approval auto-edit" in e["content"] for e in tool_results)
    assert events[-1]["type"] == "done" and events[-1]["reason"] == "answer"
    types = {e["type"] for e in events}
    assert {"step", "reasoning", "tool_call", "stats", "answer"} <= types


def test_json_format_is_one_document_with_the_transcript(tmp_path, env):
    ws = tmp_path / "ws"
    ws.mkdir()
    spec = script(tmp_path / "s.json", WRITE_EDIT_RUN)
    r = kimi("run", "--agent", "--approval", "auto-edit", "-w", str(ws), "-m", spec,
             "--format", "json", "task", env=env)
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    assert doc["text"] == "It prints world." and doc["finish_reason"] == "answer"
    assert doc["steps"] == 4 and doc["tool_calls"][0]["decision"] == "allowed"
    assert doc["tool_calls"][2]["decided_by"] == "no-terminal"  # auto-edit: commands ask
    assert doc["usage"]["prefilled_tokens"] == doc["usage"]["added_tokens"]
    assert [m["role"] for m in doc["messages"]][:2] == ["system", "user"]


def test_the_step_limit_has_its_own_exit_code_and_message(tmp_path, env):
    outputs = [step(call("list_files", i, pattern=f"{i}*")) for i in range(3)]
    spec = script(tmp_path / "s.json", outputs)
    r = kimi("run", "--agent", "--max-steps", "2", "-w", str(tmp_path), "-m", spec, "task",
             env=env)
    assert r.returncode == config.EXIT_AGENT_STEP_LIMIT == 3
    assert r.stdout == ""
    assert r.stderr.splitlines()[-1] == (
        "kimi: error: the agent reached its step limit (2 steps) without answering; raise "
        "--max-steps to let it go on")


def test_other_endings_map_to_documented_exit_codes():
    def done(reason):
        return ev.Done(reason, 5, "it stopped")

    check_done(done("answer"))
    for reason, code in (("max_steps", 3), ("repeated_calls", 4), ("context_full", 1)):
        with pytest.raises(AgentStopped) as info:
            check_done(done(reason))
        assert info.value.exit_code == code
    with pytest.raises(KeyboardInterrupt):
        check_done(done("interrupted"))


def test_agent_flags_are_checked_before_anything_loads(env):
    r = kimi("run", "--max-steps", "5", "-m", "scripted:/nonexistent.json", "task", env=env)
    assert r.returncode == 2 and r.stderr == "kimi: error: --max-steps needs --agent\n"


@pytest.mark.parametrize("flags,message", [
    (dict(tools="read_file,rm"), "--tools: unknown tool 'rm'; choose from read_file, "),
    (dict(workspace=Path("/nonexistent")), "--workspace: /nonexistent: not a directory"),
    (dict(max_steps=0), "--max-steps must be at least 1"),
])
def test_bad_agent_flags_are_usage_errors(flags, message):
    base = dict(max_steps=None, tools=None, workspace=None, approval=None,
                allow_network=False, context_limit=None)
    with pytest.raises(UsageError, match=re.escape(message)):
        _agent_options(True, False, **{**base, **flags})
    with pytest.raises(UsageError, match="--raw and --agent"):
        _agent_options(True, True, **base)
    assert sorted(t.name for t in select("read-only")) == ["grep", "list_files", "read_file"]


def test_print_prompt_shows_the_tools_and_the_workspace(tmp_path, env):
    spec = script(tmp_path / "s.json", [])
    r = kimi("run", "--agent", "--tools", "read-only", "-w", str(tmp_path), "--print-prompt",
             "-m", spec, "look around", env=env)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("<|im_system|>tool_declare<|im_middle|>[")
    assert '"name":"grep"' in r.stdout and '"name":"shell"' not in r.stdout
    assert f"Your workspace is {tmp_path.resolve()}" in r.stdout
    assert r.stdout.endswith("look around<|im_end|><|im_assistant|>assistant<|im_middle|>\n")


def test_ctrl_c_during_a_long_command_kills_it_and_exits_130(tmp_path, env):
    ws = tmp_path / "ws"
    ws.mkdir()
    spec = script(tmp_path / "s.json",
                  [step(call("shell", 0, command="sleep 1.5 && touch late.txt")), answer("no")])
    proc = subprocess.Popen([*KIMI, "run", "--agent", "--approval", "yolo", "-w", str(ws),
                             "-m", spec, "--format", "jsonl", "task"], env=env,
                            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    lines = []
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        assert line, proc.stderr.read()
        lines.append(json.loads(line))
        if lines[-1]["type"] == "approval":
            break
    time.sleep(0.5)  # inside `sleep 1.5`
    sent = time.monotonic()
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=30)
    assert time.monotonic() - sent < 5
    assert proc.returncode == 130
    assert "Traceback" not in err and err.strip().splitlines()[-1] == "kimi: interrupted"
    last = json.loads(out.splitlines()[-1])
    assert last["type"] == "done" and last["reason"] == "interrupted"
    time.sleep(1.5)
    assert not (ws / "late.txt").exists()  # the command died with the step


@pytest.mark.skipif(sys.platform == "win32", reason="needs a pseudo-terminal")
def test_at_a_terminal_ask_mode_asks_and_remembers_a_command_prefix(tmp_path, env):
    pexpect = pytest.importorskip("pexpect")
    ws = tmp_path / "ws"
    ws.mkdir()
    spec = script(tmp_path / "s.json", [
        step(call("shell", 0, command="echo one > a.txt")),
        step(call("shell", 1, command="ls")),
        step(call("shell", 2, command="ls -la && ls")),
        step(call("shell", 3, command="cat a.txt")),
        answer("done"),
    ])
    child = pexpect.spawn(KIMI[0], [*KIMI[1:], "run", "--agent", "-w", str(ws), "-m", spec,
                                    "task"], env={**env, "TERM": "xterm", "COLUMNS": "120"},
                          encoding="utf-8", timeout=60, dimensions=(40, 120))
    child.expect(r"\[y\] yes")
    child.sendline("y")  # echo one > a.txt: once
    child.expect(r"don't ask again this session for `ls`")
    child.sendline("a")  # ls: for the session
    child.expect(r"\[y\] yes")  # cat asks: ls -la && ls did not
    child.sendline("m")
    child.expect("message to the model:")
    child.sendline("no cat please")
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0
    assert (ws / "a.txt").read_text() == "one\n"


def test_the_closing_line_counts_denied_and_refused_calls_apart():
    from collections import Counter

    from kimi_cli.agent.frontend import closing_line
    from kimi_cli.agent.loop import Totals

    totals = Totals(steps=301, tool_calls=1200, prompt_tokens=123456, prefilled_tokens=2325,
                    reused_tokens=121131, generated_tokens=9000).to_dict()
    line = closing_line(ev.Done("max_steps", 301, "step limit", totals),
                        Counter(denied=2, refused=1))
    assert line == ("[agent: 301 steps · 1,200 tool calls (2 denied, 1 refused) · 123,456 prompt "
                    "tokens, 2,325 processed (121,131 from the KV cache) · 9,000 generated · "
                    "stopped at --max-steps]")
    one = closing_line(ev.Done("answer", 1, "", Totals(steps=1, tool_calls=1).to_dict()))
    assert one.startswith("[agent: 1 step · 1 tool call · ")


@pytest.mark.skipif(sys.platform == "win32", reason="needs a pseudo-terminal")
def test_keys_typed_while_panels_stream_neither_tear_them_nor_answer_the_next_question(
        tmp_path, env):
    from test_chat_pty import COLS, ROWS, Term, torn_panels

    thinking = "\n".join(f"line {i} of the next thinking" for i in range(20))
    ws = tmp_path / "ws"
    ws.mkdir()
    spec = script(tmp_path / "s.json", [
        step(call("shell", 0, command="echo one"), reasoning="First a command."),
        step(call("shell", 1, command="echo two"), reasoning=thinking),
        answer("Both ran.", reasoning=thinking)])
    t = Term(["run", "--agent", "-w", str(ws), "-m", spec + "@100", "run two commands"],
             {**env, "TERM": "xterm-256color", "COLUMNS": str(COLS), "LINES": str(ROWS)})
    try:
        t.wait_for("[y] yes")
        t.send("y\r")  # y and Enter at once, as tmux send-keys "y" Enter types them
        t.wait_for("line 3 of the next thinking")
        t.send("y\r")  # typed while the reasoning streams: not echoed, not an answer
        t.wait_for("[y] yes", count=2)
        t.settle(0.5)
        assert "functions.shell:1 approved" not in t.text(), t.capture()
        t.send("y\r")
        t.wait_for("Both ran.")
        assert t.exit_status() == 0, t.capture()
        screen = t.text()
        assert torn_panels(screen) == [], t.capture()
        assert screen.count("╭─ thinking") == 3 and screen.count("thought for") == 3, t.capture()
    finally:
        t.close()
