"""The `kimi` command line run as a real process: streams, formats, stdin, exit codes, signals.

Each test starts the installed console script (or `python -m kimi_cli.cli`) on the tiny
synthetic checkpoint, with XDG and Hugging Face paths pointed at temporary directories.
"""

from __future__ import annotations

import json
import os
import re
import select
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from kimi_cli import __version__
from kimi_cli.chat.template import render
from kimi_cli.config import DEFAULT_SYSTEM_PROMPT
from kimi_cli.tokenizer import Tokenizer

_SCRIPT = Path(sys.executable).parent / "kimi"
KIMI = [str(_SCRIPT)] if _SCRIPT.exists() else [sys.executable, "-m", "kimi_cli.cli"]

JSON_FIELDS = {"text", "reasoning", "tool_calls", "finish_reason", "prompt_token_ids", "token_ids",
               "prompt_tokens", "generation_tokens", "prompt_tps", "generation_tps",
               "peak_memory_gb"}
USER_TURN = re.compile(r"<\|im_user\|>user<\|im_middle\|>(.*?)<\|im_end\|>", re.DOTALL)


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """The environment of a fresh user: private XDG dirs, an empty offline Hugging Face cache."""
    root = tmp_path_factory.mktemp("cli-home")
    e = {k: v for k, v in os.environ.items()
         if k not in ("KIMI_MODEL", "KIMI_MLX_HOME", "NO_COLOR", "FORCE_COLOR", "HF_HUB_CACHE")}
    for var in ("XDG_CACHE_HOME", "XDG_STATE_HOME", "XDG_CONFIG_HOME", "HF_HOME"):
        (root / var).mkdir()
        e[var] = str(root / var)
    e["HF_HUB_OFFLINE"] = "1"
    return e


def kimi(*args: str, env: dict[str, str], input: str | None = None,
         timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([*KIMI, *args], env=env, input=input, capture_output=True, text=True,
                          timeout=timeout, stdin=subprocess.DEVNULL if input is None else None)


def assert_one_error_line(stderr: str) -> None:
    assert len(stderr.strip().splitlines()) == 1, stderr
    assert stderr.startswith("kimi: error:"), stderr
    assert "Traceback" not in stderr


@pytest.fixture(scope="module")
def json_run(tiny_ckpt: Path, env) -> subprocess.CompletedProcess:
    return kimi("run", "--model", str(tiny_ckpt), "hi", "--format", "json", "-t", "0", "-n", "8",
                env=env)


# Output formats


def test_json_format_is_one_object_with_the_documented_fields(json_run, tiny_ckpt):
    assert json_run.returncode == 0, json_run.stderr
    lines = json_run.stdout.splitlines()
    assert len(lines) == 1
    result = json.loads(lines[0])
    assert JSON_FIELDS <= result.keys()
    assert 1 <= len(result["token_ids"]) <= 8
    assert result["generation_tokens"] == len(result["token_ids"])
    assert result["finish_reason"] in ("length", "stop")

    tok = Tokenizer.from_dir(tiny_ckpt)
    expected = tok.encode(render([{"role": "user", "content": "hi"}], template=tok.chat_template))
    assert result["prompt_token_ids"] == expected
    assert result["prompt_tokens"] == len(expected)


def test_jsonl_format_is_one_event_per_line_ending_with_stats_then_done(tiny_ckpt, env):
    r = kimi("run", "--model", str(tiny_ckpt), "hi", "--format", "jsonl", "-t", "0", "-n", "8",
             env=env)
    assert r.returncode == 0, r.stderr
    events = [json.loads(line) for line in r.stdout.splitlines()]
    assert all("type" in e for e in events)
    assert [e["type"] for e in events[-2:]] == ["stats", "done"]
    assert events[-2]["generation_tokens"] <= 8
    assert events[-1]["finish_reason"] in ("length", "stop")


def test_text_mode_in_a_pipe_is_plain_answer_on_stdout_and_stats_on_stderr(json_run, tiny_ckpt,
                                                                             env):
    answer = json.loads(json_run.stdout)["text"]
    r = kimi("run", "--model", str(tiny_ckpt), "hi", "-t", "0", "-n", "8", env=env)
    assert r.returncode == 0, r.stderr
    assert "\x1b" not in r.stdout and "\x1b" not in r.stderr
    assert r.stdout.rstrip("\n") == answer.rstrip("\n")
    assert "prompt tokens" in r.stderr and "generated" in r.stderr


def test_quiet_leaves_stderr_empty_and_kimi_model_env_selects_the_model(json_run, tiny_ckpt,
                                                                        env):
    answer = json.loads(json_run.stdout)["text"]
    r = kimi("run", "hi", "-t", "0", "-n", "8", "--quiet",
             env={**env, "KIMI_MODEL": str(tiny_ckpt)})
    assert r.returncode == 0, r.stderr
    assert r.stderr == ""
    assert r.stdout.rstrip("\n") == answer.rstrip("\n")


# Prompt from arguments and stdin


def user_turns(prompt: str) -> list[str]:
    return USER_TURN.findall(prompt)


def test_piped_stdin_is_context_before_the_question(tiny_ckpt, env):
    r = kimi("run", "--model", str(tiny_ckpt), "--print-prompt", "question?",
             input="CONTEXT LINE\n", env=env)
    assert r.returncode == 0, r.stderr
    [turn] = user_turns(r.stdout)
    assert turn.startswith("CONTEXT LINE")
    assert turn.endswith("question?")


def test_dash_reads_the_prompt_from_stdin(tiny_ckpt, env):
    r = kimi("run", "-", "--model", str(tiny_ckpt), "--print-prompt",
             input="the question from stdin\n", env=env)
    assert r.returncode == 0, r.stderr
    [turn] = user_turns(r.stdout)
    assert turn.strip() == "the question from stdin"


def test_no_prompt_and_empty_stdin_is_a_usage_error(tiny_ckpt, env):
    r = kimi("run", "--model", str(tiny_ckpt), input="", env=env)
    assert r.returncode == 2
    assert_one_error_line(r.stderr)
    assert r.stdout == ""


def test_raw_prints_the_prompt_untouched_plus_a_final_newline(tiny_ckpt, env):
    r = kimi("run", "--model", str(tiny_ckpt), "--raw", "--print-prompt", "abc", env=env)
    assert r.returncode == 0, r.stderr
    assert r.stdout == "abc\n"


def test_system_flag_replaces_the_default_system_prompt(tiny_ckpt, env):
    r = kimi("run", "--model", str(tiny_ckpt), "--system", "Be terse.", "--print-prompt", "hi",
             env=env)
    assert r.returncode == 0, r.stderr
    assert r.stdout.count("<|im_system|>") == 1
    assert "<|im_system|>system<|im_middle|>Be terse.<|im_end|>" in r.stdout
    assert DEFAULT_SYSTEM_PROMPT not in r.stdout
    assert user_turns(r.stdout) == ["hi"]


def test_print_prompt_does_not_read_the_weights(corruptible_ckpt, env):
    for shard in corruptible_ckpt.glob("*.safetensors"):
        shard.unlink()
    r = kimi("run", "--model", str(corruptible_ckpt), "--print-prompt", "hi", env=env)
    assert r.returncode == 0, r.stderr
    assert user_turns(r.stdout) == ["hi"]


# Errors and exit codes


def test_missing_model_dir_is_one_line_and_exit_1(tmp_path, env):
    missing = tmp_path / "no-such-model"
    r = kimi("run", "--model", str(missing), "hi", env=env)
    assert r.returncode == 1
    assert_one_error_line(r.stderr)
    assert str(missing) in r.stderr


def test_debug_shows_the_traceback(tmp_path, env):
    r = kimi("run", "--model", str(tmp_path / "no-such-model"), "hi", "--debug", env=env)
    assert r.returncode != 0
    assert "Traceback" in r.stderr


def test_bad_flag_value_is_exit_2(tiny_ckpt, env):
    r = kimi("run", "--model", str(tiny_ckpt), "hi", "--top-p", "3", env=env)
    assert r.returncode == 2
    assert "--top-p" in r.stderr
    assert "Traceback" not in r.stderr


def test_unknown_flag_is_exit_2(env):
    r = kimi("run", "--no-such-flag", "hi", env=env)
    assert r.returncode == 2
    assert "Traceback" not in r.stderr


def test_no_model_anywhere_says_how_to_get_one(env):
    r = kimi("run", "hi", env=env)
    assert r.returncode == 1
    assert_one_error_line(r.stderr)
    assert "kimi download" in r.stderr
    assert "--model demo" in r.stderr


# Pipes and signals


def test_closed_pipe_is_not_an_error(tiny_ckpt, env):
    cmd = " ".join(shlex.quote(a) for a in [*KIMI, "run", "--model", str(tiny_ckpt), "x", "-t",
                                            "0", "-n", "200", "--raw"])
    r = subprocess.run(f"set -o pipefail; {cmd} | head -c 1", shell=True, executable="/bin/bash",
                       env=env, capture_output=True, stdin=subprocess.DEVNULL, timeout=120)
    stderr = r.stderr.decode(errors="replace")
    assert r.returncode == 0, stderr
    assert len(r.stdout) == 1
    assert "Traceback" not in stderr
    assert "BrokenPipe" not in stderr


def test_ctrl_c_stops_with_exit_130(small_ckpt, env):
    proc = subprocess.Popen([*KIMI, "run", "--model", str(small_ckpt), "x", "-n", "100000",
                             "--raw", "-t", "0"], env=env, stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        ready, _, _ = select.select([proc.stdout], [], [], 60)
        assert ready, "no output within 60 s"
        assert os.read(proc.stdout.fileno(), 1)
        time.sleep(0.2)  # well inside the decode loop
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    stderr = err.decode(errors="replace")
    assert proc.returncode == 130, stderr
    assert "interrupted" in stderr
    assert "Traceback" not in stderr


# The demo model and meta commands


def test_demo_model_is_built_once_and_says_its_weights_are_random(env):
    first = kimi("run", "--model", "demo", "hi", "-t", "0", "-n", "4", env=env)
    assert first.returncode == 0, first.stderr
    assert "random" in first.stderr
    assert "building" in first.stderr
    [built] = (Path(env["XDG_CACHE_HOME"]) / "kimi-mlx" / "demo").iterdir()
    mtime = (built / "config.json").stat().st_mtime_ns

    second = kimi("run", "--model", "demo", "hi", "-t", "0", "-n", "4", env=env)
    assert second.returncode == 0, second.stderr
    assert "random" in second.stderr
    assert "building" not in second.stderr
    assert (built / "config.json").stat().st_mtime_ns == mtime


def test_version_and_help(env):
    version = kimi("--version", env=env)
    assert version.returncode == 0
    assert __version__ in version.stdout
    top = kimi("--help", env=env)
    assert top.returncode == 0
    assert "run" in top.stdout
    sub = kimi("run", "--help", env=env)
    assert sub.returncode == 0
    assert "--model" in sub.stdout and "--format" in sub.stdout
