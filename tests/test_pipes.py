"""`kimi run` (and `kimi chat`) in pipes: colour rules, what goes to which stream, JSONL events.

The scripted model stands in for the network, so each run is only a process start.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

_SCRIPT = Path(sys.executable).parent / "kimi"
KIMI = [str(_SCRIPT)] if _SCRIPT.exists() else [sys.executable, "-m", "kimi_cli.cli"]

REASONING = "Think about colours."
ANSWER = "Blue, *mostly*."
OUTPUT = f"<think>{REASONING}</think>{ANSWER}<|im_end|>"
DIM = "\x1b[2m"


@pytest.fixture(scope="module")
def env(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("pipes-home")
    e = {k: v for k, v in os.environ.items()
         if k not in ("KIMI_MODEL", "KIMI_MLX_HOME", "NO_COLOR", "FORCE_COLOR", "TERM")}
    for var in ("XDG_CACHE_HOME", "XDG_STATE_HOME", "XDG_CONFIG_HOME", "HF_HOME"):
        (root / var).mkdir()
        e[var] = str(root / var)
    script = root / "script.json"
    script.write_text(json.dumps([OUTPUT] * 3))
    e["KIMI_MODEL"] = f"scripted:{script}"
    e["TERM"] = "xterm-256color"
    return e


def kimi(*args: str, env: dict[str, str], input: str | None = None,
         **extra: str) -> subprocess.CompletedProcess:
    return subprocess.run([*KIMI, *args], env={**env, **extra}, input=input,
                          capture_output=True, text=True, timeout=120,
                          stdin=subprocess.DEVNULL if input is None else None)


# Each case: (extra flags, extra environment). They run at once: each is mostly start-up time.
CASES = {
    "plain": ([], {}),
    "FORCE_COLOR": ([], {"FORCE_COLOR": "1"}),
    "--color always": (["--color", "always"], {}),
    "NO_COLOR beats FORCE_COLOR": ([], {"NO_COLOR": "1", "FORCE_COLOR": "1"}),
    "TERM=dumb": ([], {"TERM": "dumb"}),
    "--color never beats FORCE_COLOR": (["--color", "never"], {"FORCE_COLOR": "1"}),
    "--hide-reasoning": (["--hide-reasoning"], {}),
    "jsonl": (["--format", "jsonl"], {"FORCE_COLOR": "1"}),
}


@pytest.fixture(scope="module")
def runs(env) -> dict[str, subprocess.CompletedProcess]:
    procs = {name: subprocess.Popen([*KIMI, "run", *flags, "colour?"], env={**env, **extra},
                                    stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                    stderr=subprocess.PIPE, text=True)
             for name, (flags, extra) in CASES.items()}
    out = {}
    for name, p in procs.items():
        stdout, stderr = p.communicate(timeout=180)
        out[name] = subprocess.CompletedProcess(p.args, p.returncode, stdout, stderr)
    return out


def test_piped_stdout_is_the_plain_answer_and_stderr_has_reasoning_and_stats(runs):
    r = runs["plain"]
    assert r.returncode == 0, r.stderr
    assert r.stdout == ANSWER + "\n"
    assert REASONING in r.stderr and "prompt tokens" in r.stderr
    assert "\x1b" not in r.stdout + r.stderr


@pytest.mark.parametrize("case", ["FORCE_COLOR", "--color always"])
def test_forced_colour_reaches_stderr_but_never_the_piped_answer(runs, case):
    r = runs[case]
    assert r.returncode == 0, r.stderr
    assert r.stdout == ANSWER + "\n"
    assert DIM in r.stderr, "the reasoning is dim"
    assert REASONING in r.stderr.replace(DIM, "").replace("\x1b[0m", "")


@pytest.mark.parametrize("case", ["NO_COLOR beats FORCE_COLOR", "TERM=dumb",
                                  "--color never beats FORCE_COLOR"])
def test_no_colour_anywhere(runs, case):
    r = runs[case]
    assert r.returncode == 0, r.stderr
    assert "\x1b" not in r.stdout + r.stderr
    assert r.stdout == ANSWER + "\n" and REASONING in r.stderr


def test_hide_reasoning_keeps_the_stats(runs):
    r = runs["--hide-reasoning"]
    assert r.returncode == 0 and r.stdout == ANSWER + "\n"
    assert REASONING not in r.stderr and "prompt tokens" in r.stderr


def test_jsonl_events_carry_the_documented_fields(runs):
    r = runs["jsonl"]
    assert r.returncode == 0, r.stderr
    events = [json.loads(line) for line in r.stdout.splitlines()]
    types = [e["type"] for e in events]
    assert types[-2:] == ["stats", "done"] and {"reasoning", "text"} <= set(types)
    assert "".join(e["text"] for e in events if e["type"] == "reasoning") == REASONING
    assert "".join(e["text"] for e in events if e["type"] == "text") == ANSWER
    stats = events[-2]
    for field in ("prompt_tokens", "reused_tokens", "prefilled_tokens", "generation_tokens",
                  "prompt_time", "generation_time", "ttft", "prompt_tps", "generation_tps",
                  "peak_memory_gb"):
        assert field in stats
    assert events[-1] == {"type": "done", "finish_reason": "stop"}
    assert "\x1b" not in r.stdout


def test_chat_reads_lines_from_a_pipe_and_saves_the_session(env):
    r = kimi("chat", "--think", "hide", input="first\n/set temperature 0.3\nsecond\n", env=env)
    assert r.returncode == 0, r.stderr
    assert r.stdout == f"{ANSWER}\n\n{ANSWER}\n", "only the answers, an empty line between"
    assert "temperature = 0.3" in r.stderr and "prompt tok" in r.stderr
    assert REASONING not in r.stderr + r.stdout
    sessions = list((Path(env["XDG_STATE_HOME"]) / "kimi-mlx" / "sessions").glob("*.jsonl"))
    assert len(sessions) == 1



def test_piped_chat_shows_no_key_hints_and_sets_agent_answers_apart(env, tmp_path):
    # Keys are not read from a terminal here: Alt-Enter, Ctrl-C and Ctrl-D hints mean nothing.
    script = tmp_path / "agent.json"
    script.write_text(json.dumps([
        OUTPUT,
        "<think>List, then write.</think><|tool_calls_section_begin|><|tool_call_begin|>"
        "functions.list_files:0<|tool_call_argument_begin|>{}<|tool_call_end|><|tool_call_begin|>"
        'functions.write_file:1<|tool_call_argument_begin|>{"path": "x.txt", "content": "x"}'
        "<|tool_call_end|><|tool_calls_section_end|><|im_end|>",
        f"<think>Seen.</think>{ANSWER}<|im_end|>"]))
    r = kimi("chat", "--agent", "-w", str(tmp_path), "-m", f"scripted:{script}",
             input="first\nsecond\n", env=env)
    assert r.returncode == 0, r.stderr
    assert r.stdout == f"{ANSWER}\n\n{ANSWER}\n"
    assert "Alt-Enter" not in r.stderr and "Ctrl-" not in r.stderr, r.stderr
    assert "kimi chat · " in r.stderr.splitlines()[0]  # the banner still says what runs
    # No terminal to ask on: the write is denied, and the status line says so.
    assert "agent: 2 steps, 2 tool calls, 1 denied" in r.stderr, r.stderr
    assert not (tmp_path / "x.txt").exists()


# A stdin pipe nobody writes to (`sleep 30 | kimi run hi`, every rank under mlx.launch)


def _run_with_silent_pipe(args: list[str], env: dict[str, str], **extra: str):
    """`kimi ARGS` with stdin a pipe the test holds open and never writes to."""
    read_end, write_end = os.pipe()
    try:
        p = subprocess.Popen([*KIMI, *args], env={**env, **extra}, stdin=read_end,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        os.close(read_end)
        try:
            # A bound on correctness, not a speed measurement: without the fix the run waits
            # for the pipe for as long as the test holds it open.
            out, err = p.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            p.kill()
            p.communicate()
            raise AssertionError("kimi waited on a stdin pipe nobody writes to") from None
    finally:
        os.close(write_end)
    return p.returncode, out, err


def test_a_prompt_with_a_silent_stdin_pipe_answers_without_reading_it(env):
    code, out, err = _run_with_silent_pipe(["run", "--print-prompt", "hi"], env)
    assert code == 0, err
    assert out.rstrip().endswith("<|im_assistant|>assistant<|im_middle|>")
    assert "hi<|im_end|>" in out and "\n\nhi" not in out, "no context was prepended"

