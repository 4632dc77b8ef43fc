"""What a new user meets first, run as processes: help that explains, one-line usage errors,
a demo that finishes in seconds, prompts refused alike, and output kept whole on Ctrl-C.
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

from kimi_cli.clihelp import COMMAND_ORDER, command_rank

_SCRIPT = Path(sys.executable).parent / "kimi"
KIMI = [str(_SCRIPT)] if _SCRIPT.exists() else [sys.executable, "-m", "kimi_cli.cli"]
USER_TURN = re.compile(r"<\|im_user\|>user<\|im_middle\|>(.*?)<\|im_end\|>", re.DOTALL)
SAMPLING = ("--temperature", "--top-p", "--min-p", "--top-k", "--max-tokens", "--seed")


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("first-contact-home")
    e = {k: v for k, v in os.environ.items()
         if k not in ("KIMI_MODEL", "KIMI_MLX_HOME", "NO_COLOR", "FORCE_COLOR", "HF_HUB_CACHE")}
    for var in ("XDG_CACHE_HOME", "XDG_STATE_HOME", "XDG_CONFIG_HOME", "HF_HOME"):
        (root / var).mkdir()
        e[var] = str(root / var)
    e["HF_HUB_OFFLINE"] = "1"
    e["COLUMNS"] = "200"  # one help line per option
    return e


def kimi(*args: str, env: dict[str, str], input: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([*KIMI, *args], env=env, input=input, capture_output=True, text=True,
                          timeout=120, stdin=subprocess.DEVNULL if input is None else None)


def one_error_line(r: subprocess.CompletedProcess) -> str:
    assert r.stderr.startswith("kimi: error: ") and r.stderr.count("\n") == 1, r.stderr
    assert r.stdout == ""
    return r.stderr[len("kimi: error: "):].strip()


def option_line(help_text: str, flag: str) -> str:
    [line] = [ln for ln in help_text.splitlines() if re.search(rf"│ {flag}\b", ln)]
    return line


# ---------------------------------------------------------------------------------------------
# Help


def test_commands_are_listed_as_a_workflow(env):
    r = kimi("--help", env=env)
    listed = re.findall(r"^│ (\w+) ", r.stdout.split("Commands")[1], re.M)
    assert listed == [c for c in COMMAND_ORDER if c in listed]
    assert listed[:4] == ["download", "info", "convert", "run"]


def test_serve_takes_its_place_between_chat_and_bench_when_it_exists():
    names = ["bench", "run", "serve", "zzz-new", "chat", "download"]
    assert sorted(names, key=command_rank) == ["download", "run", "chat", "serve", "bench",
                                               "zzz-new"]


@pytest.mark.parametrize("command", [(), ("run",), ("chat",), ("convert",), ("download",)])
def test_flags_show_no_value_placeholder(env, command):
    r = kimi(*command, "--help", env=env)
    assert r.returncode == 0
    assert "<bool>" not in r.stdout
    assert "{src}" not in r.stdout and "[prompt]" not in r.stdout  # capitals: SRC, PROMPT


def test_run_help_groups_options_into_panels_in_workflow_order(env):
    r = kimi("run", "--help", env=env)
    panels = re.findall(r"╭─ ([\w ]+?) ─", r.stdout)
    assert panels == ["Arguments", "Options", "Generation", "Expert cache", "Agent", "Output"]
    generation = r.stdout.split("Generation")[1].split("╰")[0]
    assert all(flag in generation for flag in SAMPLING)


@pytest.mark.parametrize("command", ["run", "chat"])
def test_every_agent_flag_is_in_the_agent_panel(env, command):
    r = kimi(command, "--help", env=env)
    panels = dict(re.findall(r"╭─ ([\w ]+?) ─+╮\n(.*?)╰", r.stdout, re.S))
    outside = [line for name, body in panels.items() if name != "Agent"
               for line in body.splitlines() if "Agent:" in line]
    assert outside == []
    assert "--sandbox-allow" in panels["Agent"] and "--max-command-timeout" in panels["Agent"]


@pytest.mark.parametrize("command", ["run", "chat"])
def test_every_sampling_flag_has_a_description_and_a_default(env, command):
    r = kimi(command, "--help", env=env)
    for flag in SAMPLING:
        line = option_line(r.stdout, flag)
        words = line.split("<", 1)[1].split(">", 1)[1]  # after the metavar
        assert len(words.split()) > 3, line
        assert "[default:" in line, line
    assert "0 disables it" in option_line(r.stdout, "--top-k")


def test_run_takes_think_and_keeps_hide_reasoning_as_its_alias(env, tmp_path):
    script = tmp_path / "s.json"
    script.write_text(json.dumps(["<think>SECRET PLAN</think>answer"] * 2))
    hidden = kimi("run", "-m", f"scripted:{script}", "--think", "hide", "hi", env=env)
    alias = kimi("run", "-m", f"scripted:{script}", "--hide-reasoning", "hi", env=env)
    for r in (hidden, alias):
        assert r.returncode == 0, r.stderr
        assert r.stdout == "answer\n" and "SECRET PLAN" not in r.stderr


def test_run_follows_the_think_mode_remembered_by_chat(env, tmp_path):
    script = tmp_path / "s.json"
    script.write_text(json.dumps(["<think>SECRET PLAN</think>answer"] * 2))
    home = {**env, "XDG_CONFIG_HOME": str(tmp_path / "config")}
    shown = kimi("run", "-m", f"scripted:{script}", "hi", env=home)
    (tmp_path / "config" / "kimi-mlx").mkdir(parents=True)
    (tmp_path / "config" / "kimi-mlx" / "config.toml").write_text('think = "hide"\n')
    remembered = kimi("run", "-m", f"scripted:{script}", "hi", env=home)
    assert "SECRET PLAN" in shown.stderr
    assert remembered.returncode == 0 and "SECRET PLAN" not in remembered.stderr


def test_version_names_the_distribution(env):
    assert kimi("--version", env=env).stdout.startswith("kimi-mlx ")


# ---------------------------------------------------------------------------------------------
# Usage errors: one kimi line, exit 2


def test_a_bad_choice_is_one_line_naming_the_choices(env):
    r = kimi("run", "-f", "xml", "hi", env=env)
    assert r.returncode == 2
    assert one_error_line(r) == "--format must be text, json or jsonl"


@pytest.mark.parametrize("flag,value,says", [("--temperature", "warm", "a number"),
                                              ("--top-k", "1.5", "a whole number")])
def test_a_bad_number_is_one_line_in_kimis_words(env, flag, value, says):
    r = kimi("run", flag, value, "hi", env=env)
    assert r.returncode == 2
    message = one_error_line(r)
    assert message == f"{flag} must be {says}"


def test_missing_argument_and_unknown_option_are_one_line_each(env):
    missing = kimi("convert", env=env)
    unknown = kimi("run", "--temprature", "1", "hi", env=env)
    assert missing.returncode == unknown.returncode == 2
    assert one_error_line(missing).startswith("missing SRC")
    assert "did you mean --temperature" in one_error_line(unknown)


@pytest.mark.parametrize("seed", ["-1", "99999999999999999999"])
def test_a_seed_out_of_range_is_a_usage_error(env, seed):
    r = kimi("run", "-m", "demo", "--seed", seed, "hi", env=env)
    assert r.returncode == 2
    assert one_error_line(r).startswith("--seed must be in 0..")


def test_a_malformed_expert_cache_size_is_a_usage_error(env):
    for command in (("run", "-m", "demo", "hi"), ("info", "demo")):
        r = kimi(*command, "--expert-cache", "10XB", env=env)
        assert r.returncode == 2, r.stderr
        assert one_error_line(r).startswith("--expert-cache '10XB': use a size")


def test_layers_given_backwards_say_so(env):
    r = kimi("download", "--layers", "5-2", env=env)
    assert r.returncode == 2
    assert one_error_line(r).startswith("--layers 5-2: 5 > 2")


# ---------------------------------------------------------------------------------------------
# Prompts


@pytest.mark.parametrize("args,stdin", [(("",), None), ((" \n",), None), (("-",), ""),
                                        ((), "")])
def test_an_empty_prompt_is_refused_however_it_comes(env, args, stdin):
    r = kimi("run", "-m", "demo", *args, env=env, input=stdin)
    assert r.returncode == 2, r.stderr
    assert "empty" in one_error_line(r)


def test_dash_drops_the_newline_that_ends_stdin(env):
    r = kimi("run", "-m", "demo", "-", "--print-prompt", env=env, input="the question\n")
    assert r.returncode == 0, r.stderr
    assert USER_TURN.findall(r.stdout) == ["the question"]
    assert r.stdout.endswith("<|im_middle|>\n")  # the prompt, then a final newline


# ---------------------------------------------------------------------------------------------
# The demo and the stats line


def test_the_demo_stops_at_64_tokens_and_says_so(env):
    r = kimi("run", "--model", "demo", "Hello", env=env)
    assert r.returncode == 0, r.stderr
    assert "stops after 64 tokens unless -n" in r.stderr
    assert "| 64 generated," in r.stderr or "| stop]" in r.stderr
    capped = json.loads(kimi("run", "-m", "demo", "Hello", "-f", "json", env=env).stdout)
    assert len(capped["token_ids"]) <= 64
    longer = kimi("run", "-m", "demo", "Hello", "-n", "70", "-t", "0", "-f", "json", env=env)
    assert len(json.loads(longer.stdout)["token_ids"]) > 64


def test_a_one_token_generation_has_no_decode_rate(env, tiny_ckpt):
    r = kimi("run", "-m", str(tiny_ckpt), "-n", "1", "hi", env=env)
    assert r.returncode == 0, r.stderr
    assert "| 1 generated, — tok/s |" in r.stderr


# ---------------------------------------------------------------------------------------------
# Ctrl-C keeps the JSON output whole


def _interrupted_run(env, tmp_path: Path, fmt: str) -> tuple[int, str]:
    """A slow scripted generation, Ctrl-C well inside it: with jsonl once the first text event
    is out; with json (nothing streams) after a while, the script being long enough for it."""
    script = tmp_path / "script.json"
    script.write_text(json.dumps(["<think>a plan</think>" + "word " * 1000]))
    proc = subprocess.Popen([*KIMI, "run", "-m", f"scripted:{script}@40", "-f", fmt, "hi"],
                            env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True)
    lines: list[str] = []
    try:
        if fmt == "jsonl":
            for line in proc.stdout:
                lines.append(line)
                if '"type": "text"' in line:
                    break
        else:
            time.sleep(5)  # start-up takes 1-3 s on a loaded machine; the script lasts 25 s
        proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return proc.returncode, "".join(lines) + out


def test_ctrl_c_with_json_still_prints_the_document(env, tmp_path):
    code, out = _interrupted_run(env, tmp_path, "json")
    assert code == 130
    doc = json.loads(out)
    assert doc["finish_reason"] == "interrupted"
    assert doc["reasoning"] == "a plan" and doc["text"].startswith("word word")


def test_ctrl_c_with_jsonl_ends_with_an_interrupted_done_event(env, tmp_path):
    code, out = _interrupted_run(env, tmp_path, "jsonl")
    assert code == 130
    events = [json.loads(line) for line in out.splitlines()]
    assert events[-1] == {"type": "done", "finish_reason": "interrupted"}
    assert any(e["type"] == "text" for e in events)


def test_convert_takes_demo_as_every_other_command_does(env, tmp_path):
    r = kimi("convert", "demo", str(tmp_path / "pack"), env=env)
    assert r.returncode == 0, r.stderr
    assert r.stdout == f"{tmp_path / 'pack'}\n"
    assert kimi("convert", "--verify", str(tmp_path / "pack"), env=env).returncode == 0


# ---------------------------------------------------------------------------------------------
# The shipped scripted demo


def test_the_shipped_scripted_demo_reasons_calls_a_tool_and_answers(env, tmp_path):
    demo = Path(__file__).parent.parent / "examples" / "scripted-demo.json"
    (tmp_path / "notes.md").write_text("# notes\n")
    r = kimi("run", "--agent", "-w", str(tmp_path), "--model", f"scripted:{demo}",
             "--format", "json", "What is this project?", env=env)
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    assert doc["finish_reason"] == "answer" and doc["steps"] == 2
    [listing] = doc["tool_calls"]
    assert listing["name"] == "list_files" and listing["decision"] == "allowed"
    assert listing["ok"] is True and "notes.md" in listing["content"]
    assert doc["reasoning"] and "scripted" in doc["text"]
    first = next(m for m in doc["messages"] if m.get("tool_calls"))
    assert first["reasoning_content"].startswith("The user asks what this project is.")
