"""Heavy mode: N trajectories in one batch, then one aggregation turn that reads their answers.

The CLI runs as a subprocess with the scripted model (each trajectory, then the aggregate, is the
next scripted output); the batch itself runs on the tiny synthetic checkpoint. Ctrl-C on a pty.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pexpect
import pytest

import kimi_cli
from kimi_cli.chat.heavy_prompt import UNFINISHED, aggregation_message
from kimi_cli.engine import Engine, SamplingSettings
from kimi_cli.heavy import run_heavy

_SCRIPT = Path(sys.executable).parent / "kimi"
KIMI = [str(_SCRIPT)] if _SCRIPT.exists() else [sys.executable, "-m", "kimi_cli.cli"]

ANSWERS = ["The answer is 41.", "The answer is 42.", "42, surely."]
OUTPUTS = [f"<think>attempt {i} reasons {'at length ' * i}</think>{a}<|im_end|>"
           for i, a in enumerate(ANSWERS, 1)]
AGGREGATE = "<think>Two of three say 42; 6 x 7 is 42.</think>The final answer is 42.<|im_end|>"
QUESTION = "What is six times seven?"


@pytest.fixture(scope="module")
def env(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("heavy-home")
    e = {k: v for k, v in os.environ.items()
         if k not in ("KIMI_MODEL", "KIMI_MLX_HOME", "NO_COLOR", "FORCE_COLOR")}
    for var in ("XDG_CACHE_HOME", "XDG_STATE_HOME", "XDG_CONFIG_HOME", "HF_HOME"):
        (root / var).mkdir()
        e[var] = str(root / var)
    e["HF_HUB_OFFLINE"] = "1"
    return e


def script(tmp_path: Path, outputs: list[str], rate: float = 0) -> str:
    path = tmp_path / "script.json"
    path.write_text(json.dumps(outputs))
    return f"scripted:{path}" + (f"@{rate}" if rate else "")


def kimi(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run([*KIMI, *args], env=env, capture_output=True, text=True, timeout=120,
                          stdin=subprocess.DEVNULL)


@pytest.fixture(scope="module")
def heavy_json(tmp_path_factory, env) -> dict:
    tmp = tmp_path_factory.mktemp("heavy-json")
    r = kimi("run", "--heavy", "--trajectories", "3", "--model",
             script(tmp, OUTPUTS + [AGGREGATE]), "--format", "json", QUESTION, env=env)
    assert r.returncode == 0, r.stderr
    assert r.stderr == ""
    return json.loads(r.stdout)


def test_json_carries_every_trajectory_and_the_aggregate(heavy_json):
    doc = heavy_json
    assert doc["mode"] == "heavy"
    trajs = doc["trajectories"]
    assert [t["index"] for t in trajs] == [1, 2, 3]
    assert [t["text"] for t in trajs] == ANSWERS
    assert [t["reasoning"].strip() for t in trajs] == [
        f"attempt {i} reasons {'at length ' * i}".strip() for i in (1, 2, 3)]
    assert all(t["finish_reason"] == "stop" for t in trajs)
    assert all(t["tokens"] == len(t["token_ids"]) > 0 for t in trajs)
    assert len({t["tokens"] for t in trajs}) == 3  # they finished at different steps
    assert len({t["seed"] for t in trajs}) == 3
    agg = doc["aggregate"]
    assert agg["text"] == doc["text"] == "The final answer is 42."
    assert agg["reasoning"] == doc["reasoning"] == "Two of three say 42; 6 x 7 is 42."
    assert agg["finish_reason"] == doc["finish_reason"] == "stop"
    assert agg["tokens"] == len(agg["token_ids"])
    for key in ("prompt_tokens", "generation_tokens", "generation_tps", "prompt_token_ids"):
        assert key in agg


def test_the_aggregate_prompt_holds_the_answers_not_the_reasoning(heavy_json):
    from kimi_cli.checkpoint.demo import ensure_tokenizer_dir
    from kimi_cli.tokenizer import Tokenizer

    tok = Tokenizer.from_dir(ensure_tokenizer_dir())
    prompt = tok.decode(heavy_json["aggregate"]["prompt_token_ids"])
    assert QUESTION in prompt
    for i, answer in enumerate(ANSWERS, 1):
        assert f"<candidate {i}>\n{answer}\n</candidate {i}>" in prompt
    assert "reasons" not in prompt
    assert prompt.count("<|im_user|>") == 1  # one user turn: the question is replaced


def test_piped_heavy_run_prints_only_the_final_answer(tmp_path, env):
    r = kimi("run", "--heavy", "--trajectories", "3", "-m", script(tmp_path, OUTPUTS +
             [AGGREGATE]), QUESTION, env=env)
    assert r.returncode == 0, r.stderr
    assert r.stdout == "The final answer is 42.\n"
    for i in (1, 2, 3):
        assert f"kimi: trajectory {i}/3:" in r.stderr
    assert "aggregating 3 answers" in r.stderr and "[heavy: 3 trajectories" in r.stderr


def test_quiet_heavy_run_writes_nothing_but_the_answer(tmp_path, env):
    r = kimi("run", "--heavy", "--trajectories", "3", "-q", "-m", script(tmp_path, OUTPUTS +
             [AGGREGATE]), QUESTION, env=env)
    assert (r.returncode, r.stdout, r.stderr) == (0, "The final answer is 42.\n", "")


def test_heavy_defaults_to_eight_trajectories(tmp_path, env):
    outputs = [f"answer {i}<|im_end|>" for i in range(8)] + ["final<|im_end|>"]
    r = kimi("run", "--heavy", "-m", script(tmp_path, outputs), "-f", "json", QUESTION, env=env)
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    assert [t["text"] for t in doc["trajectories"]] == [f"answer {i}" for i in range(8)]
    assert doc["text"] == "final"


def test_jsonl_streams_each_trajectory_then_the_aggregate(tmp_path, env):
    r = kimi("run", "--trajectories", "3", "-m", script(tmp_path, OUTPUTS + [AGGREGATE]),
             "-f", "jsonl", QUESTION, env=env)
    assert r.returncode == 0, r.stderr
    events = [json.loads(line) for line in r.stdout.splitlines()]
    kinds = [e["type"] for e in events]
    assert kinds.count("trajectory") == 3
    assert kinds[-2:] == ["stats", "done"]
    last_traj = max(i for i, k in enumerate(kinds) if k == "trajectory")
    assert kinds.index("text") > last_traj
    text = "".join(e["text"] for e in events if e["type"] == "text")
    assert text == "The final answer is 42."


def test_a_trajectory_cut_off_by_max_tokens_is_shown_to_the_aggregate_as_unfinished(
        tmp_path, env):
    long = "<think>" + "thinking " * 50 + "</think>late answer<|im_end|>"
    outputs = ["short.<|im_end|>", long, AGGREGATE]
    r = kimi("run", "--trajectories", "2", "-n", "20", "-m", script(tmp_path, outputs), "-f",
             "json", QUESTION, env=env)
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    assert [t["finish_reason"] for t in doc["trajectories"]] == ["stop", "length"]
    assert doc["trajectories"][1]["tokens"] == 20


@pytest.mark.parametrize("args, message", [
    (["--trajectories", "0"], "--trajectories must be >= 1"),
    (["--heavy", "--agent"], "--heavy does not combine with --agent"),
    (["--heavy", "--raw"], "--heavy needs the chat template"),
])
def test_heavy_usage_errors_are_one_line_and_exit_2(tmp_path, env, args, message):
    r = kimi("run", *args, "-m", script(tmp_path, OUTPUTS), QUESTION, env=env)
    assert r.returncode == 2
    assert r.stderr.startswith("kimi: error:") and message in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and r.stdout == ""


def test_a_batch_whose_kv_cache_cannot_fit_is_refused(tiny_ckpt, env):
    r = kimi("run", "--heavy", "-m", str(tiny_ckpt), "-n", str(10**12), QUESTION, env=env)
    assert r.returncode == 1, r.stderr
    assert r.stderr.startswith("kimi: error: 8 sequences of up to")
    assert "of KV cache" in r.stderr and "--trajectories" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and r.stdout == ""


def test_aggregation_message_marks_attempts_without_an_answer():
    msg = aggregation_message("Q?", ["A", None, ""])
    assert msg.startswith("Question:\nQ?")
    assert "<candidate 1>\nA\n</candidate 1>" in msg
    assert f"<candidate 2>\n{UNFINISHED}\n</candidate 2>" in msg
    assert f"<candidate 3>\n{UNFINISHED}\n</candidate 3>" in msg
    assert "3 candidate answers" in msg


# The real batch: trajectories on the tiny checkpoint


def test_each_trajectory_is_the_single_run_with_its_seed(tiny_ckpt):
    from kimi_cli.chat.template import render

    model, tok = kimi_cli.load(tiny_ckpt)
    messages = [{"role": "user", "content": QUESTION}]
    settings = SamplingSettings(temperature=1.0, max_tokens=12, seed=1234)
    result = run_heavy(Engine(model, tok), tok, messages, 3, settings)
    ids = tok.encode(render(messages, template=tok.chat_template))
    for t in result.trajectories:
        assert t.seed == 1234 + t.index - 1
        alone = list(Engine(model, tok).generate(
            ids, SamplingSettings(temperature=1.0, max_tokens=12, seed=t.seed)))[-1]
        assert t.token_ids == alone.token_ids
    assert result.aggregate is not None and result.aggregate.token_ids


# Ctrl-C on a terminal


def test_ctrl_c_stops_every_trajectory_keeps_what_is_done_and_exits_130(tmp_path, env):
    words = " ".join(f"w{i}" for i in range(300))
    outputs = ["<think>quick</think>Done early.<|im_end|>",
               f"<think>{words}</think>never", f"<think>{words}</think>never", AGGREGATE]
    e = {**env, "TERM": "xterm-256color", "COLUMNS": "100", "LINES": "30"}
    child = pexpect.spawn(KIMI[0], [*KIMI[1:], "run", "--trajectories", "3", "-m",
                                    script(tmp_path, outputs, rate=40), QUESTION],
                          env=e, dimensions=(30, 100), timeout=60)
    try:
        child.expect("3 trajectories")  # the live table
        seen = b""
        deadline = time.monotonic() + 60
        while b"Done early." not in seen and time.monotonic() < deadline:
            try:
                seen += child.read_nonblocking(1 << 16, 0.1)
            except pexpect.TIMEOUT:
                pass
        assert b"Done early." in seen, seen[-2000:]
        child.sendintr()
        child.expect(pexpect.EOF)
        rest = seen + child.before
    finally:
        child.close(force=True)
    screen = rest.decode(errors="replace")
    assert child.exitstatus == 130, screen[-2000:]
    assert "interrupted" in screen
    assert "The final answer is 42." not in screen  # no aggregate after Ctrl-C


# kimi chat: /heavy N for the next message


def test_chat_heavy_answers_the_next_message_with_an_aggregate_then_turns_go_back(tmp_path,
                                                                                  env):
    outputs = ["<think>a</think>Hi there.<|im_end|>", "one.<|im_end|>", "two.<|im_end|>",
               "<think>agg</think>Aggregated answer.<|im_end|>", "Normal again.<|im_end|>"]
    home = tmp_path / "state"
    home.mkdir()
    r = subprocess.run([*KIMI, "chat", "-m", script(tmp_path, outputs)],
                       env={**env, "XDG_STATE_HOME": str(home)}, capture_output=True, text=True,
                       timeout=120, input="hello\n/heavy 0\n/heavy 2\nwhat?\nand now\n")
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines() == ["Hi there.", "", "Aggregated answer.", "", "Normal again."]
    assert "/heavy: expected a number of trajectories >= 1" in r.stderr
    [session] = (home / "kimi-mlx" / "sessions").glob("*.jsonl")
    lines = [json.loads(line) for line in session.read_text().splitlines()]
    replies = [m for m in lines if m.get("role") == "assistant"]
    assert [m["content"] for m in replies] == ["Hi there.", "Aggregated answer.",
                                               "Normal again."]
    assert [t["text"] for t in replies[1]["heavy"]["trajectories"]] == ["one.", "two."]
    assert "heavy" not in replies[2]


def test_ctrl_c_in_jsonl_sends_every_trajectory_as_it_stands_then_done(tmp_path, env):
    import signal

    words = " ".join(f"w{i}" for i in range(300))
    outputs = ["Done early.<|im_end|>", f"<think>{words}</think>never",
               f"<think>{words}</think>never", AGGREGATE]
    proc = subprocess.Popen([*KIMI, "run", "--trajectories", "3", "-m",
                             script(tmp_path, outputs, rate=40), "-f", "jsonl", QUESTION],
                            env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        first = json.loads(proc.stdout.readline())  # the short trajectory has finished
        proc.send_signal(signal.SIGINT)
        rest, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 130, err
    events = [first] + [json.loads(line) for line in rest.splitlines()]
    assert [e["type"] for e in events] == ["trajectory"] * 3 + ["done"]
    assert (first["index"], first["text"], first["finish_reason"]) == (1, "Done early.", "stop")
    assert [e["finish_reason"] for e in events[1:3]] == ["interrupted"] * 2
    assert all(0 < e["tokens"] < 500 for e in events[1:3])
    assert events[-1] == {"type": "done", "finish_reason": "interrupted"}
