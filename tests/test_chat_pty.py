"""`kimi chat` (and `kimi run` on a terminal) driven through a real pseudo-terminal.

Keys go in through pexpect; what comes out is played into a pyte terminal emulator, so the tests
read the screen a person would see (scrollback included), and a failing test prints it.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import pexpect
import pyte
import pytest

_SCRIPT = Path(sys.executable).parent / "kimi"
KIMI, KIMI_ARGS = ((str(_SCRIPT), []) if _SCRIPT.exists()
                   else (sys.executable, ["-m", "kimi_cli.cli"]))
COLS, ROWS = 100, 40

REASONING = "The user greets me. I will answer briefly and kindly."
ANSWER = "Hello! **Nice** to meet you."
GREETING = f"<think>{REASONING}</think>{ANSWER}<|im_end|>"


class Term:
    """A `kimi` process on a pty and the screen it draws."""

    def __init__(self, args: list[str], env: dict[str, str]):
        self.screen = pyte.HistoryScreen(COLS, ROWS, history=5000)
        self.stream = pyte.ByteStream(self.screen)
        self.child = pexpect.spawn(KIMI, [*KIMI_ARGS, *args], env=env, dimensions=(ROWS, COLS),
                                   timeout=5)
        self.eof = False

    def pump(self, timeout: float = 0.05) -> None:
        try:
            data = self.child.read_nonblocking(1 << 16, timeout)
        except pexpect.TIMEOUT:
            return
        except pexpect.EOF:
            self.eof = True
            return
        # prompt-toolkit asks where the cursor is; answer as a terminal would.
        while b"\x1b[6n" in data:
            before, _, data = data.partition(b"\x1b[6n")
            self.stream.feed(before)
            c = self.screen.cursor
            self.child.send(f"\x1b[{c.y + 1};{c.x + 1}R")
        self.stream.feed(data)

    def text(self) -> str:
        def row(line) -> str:
            return "".join(line[x].data for x in range(COLS)).rstrip()
        return "\n".join([row(line) for line in self.screen.history.top]
                         + [line.rstrip() for line in self.screen.display])

    def capture(self) -> str:
        body = "\n".join(line for line in self.text().splitlines())
        return f"\n----- screen ({COLS}x{ROWS}, with scrollback) -----\n{body}\n" + "-" * 40

    def wait_for(self, needle: str, timeout: float = 30, count: int = 1) -> None:
        deadline = time.monotonic() + timeout
        while self.text().count(needle) < count:
            if self.eof or time.monotonic() > deadline:
                raise AssertionError(f"{needle!r} (x{count}) not on the screen"
                                     f"{' (the process ended)' if self.eof else ''}"
                                     + self.capture())
            self.pump()

    def settle(self, seconds: float = 0.3) -> None:
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            self.pump()

    def prompts(self) -> int:
        return sum(1 for line in self.text().splitlines() if line.startswith("›"))

    def prompt_ready(self, n: int, timeout: float = 30) -> None:
        """Wait for the n-th input prompt (lines starting with `›`, resumed ones included)."""
        deadline = time.monotonic() + timeout
        while self.prompts() < n:
            if self.eof or time.monotonic() > deadline:
                raise AssertionError(f"no prompt #{n} on the screen" + self.capture())
            self.pump()
        self.settle(0.2)

    def send(self, keys: str) -> None:
        self.child.send(keys)

    def line(self, text: str) -> None:
        self.child.send(text + "\r")

    def exit_status(self, timeout: float = 30) -> int:
        deadline = time.monotonic() + timeout
        while not self.eof:
            if time.monotonic() > deadline:
                raise AssertionError("still running" + self.capture())
            self.pump()
        self.child.close()
        return self.child.exitstatus

    def close(self) -> None:
        if self.child.isalive():
            self.child.terminate(force=True)


@pytest.fixture(scope="module")
def shared_cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("xdg-cache")  # the scripted tokenizer is built once here


@pytest.fixture
def env(tmp_path: Path, shared_cache: Path) -> dict[str, str]:
    e = {k: v for k, v in os.environ.items()
         if k not in ("KIMI_MODEL", "KIMI_MLX_HOME", "NO_COLOR", "FORCE_COLOR",
                      "KIMI_NO_HISTORY", "VISUAL", "EDITOR")}
    for var in ("XDG_STATE_HOME", "XDG_CONFIG_HOME", "HF_HOME"):
        (tmp_path / var).mkdir()
        e[var] = str(tmp_path / var)
    e.update(XDG_CACHE_HOME=str(shared_cache), HF_HUB_OFFLINE="1", TERM="xterm-256color",
             COLUMNS=str(COLS), LINES=str(ROWS))
    return e


@pytest.fixture
def term_factory():
    terms: list[Term] = []

    def start(args: list[str], env: dict[str, str]) -> Term:
        t = Term(args, env)
        terms.append(t)
        return t

    yield start
    for t in terms:
        if os.environ.get("KIMI_SHOW_SCREENS"):  # look at the screens: pytest -s
            print(t.capture())
        t.close()


def script(tmp_path: Path, outputs: list[str], rate: float = 0) -> str:
    path = tmp_path / "script.json"
    path.write_text(json.dumps(outputs))
    return f"scripted:{path}" + (f"@{rate}" if rate else "")


def sessions(env: dict[str, str]) -> list[Path]:
    return sorted((Path(env["XDG_STATE_HOME"]) / "kimi-mlx" / "sessions").glob("*.jsonl"))


def session_lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def torn_panels(screen: str) -> list[str]:
    """Panels whose borders do not pair up: a top border with no bottom border before the next
    top border, or a bottom border with no top one."""
    torn, open_at = [], None
    for n, line in enumerate(screen.splitlines()):
        if line.startswith("╭"):
            if open_at is not None:
                torn.append(f"line {open_at}: top border without a bottom")
            open_at = n
        elif line.startswith("╰"):
            if open_at is None:
                torn.append(f"line {n}: bottom border without a top")
            open_at = None
    return torn


def test_reasoning_and_answer_stream_in_separate_panels(tmp_path, env, term_factory):
    t = term_factory(["chat", "--model", script(tmp_path, [GREETING], rate=200)], env)
    t.prompt_ready(1)
    t.line("hello there")
    t.wait_for("Nice to meet you.")
    t.prompt_ready(2)
    screen = t.text()
    lines = screen.splitlines()
    top = [i for i, s in enumerate(lines) if s.startswith("╭─ ")]
    assert [lines[i].split()[1] for i in top] == ["thinking", "Kimi"], t.capture()
    thinking, kimi = top
    assert REASONING in "\n".join(lines[thinking:kimi]), t.capture()
    assert "thought for" in "\n".join(lines[thinking:kimi]), t.capture()
    assert "Hello! Nice to meet you." in "\n".join(lines[kimi:]), t.capture()
    assert "**" not in screen, "Markdown is rendered, not shown raw" + t.capture()
    assert "context " in screen and "/256K · " in screen and " reused)" in screen, t.capture()
    t.line("/exit")
    assert t.exit_status() == 0, t.capture()
    [saved] = sessions(env)
    header, user, assistant = session_lines(saved)
    assert header["type"] == "session" and header["model"].startswith("scripted:")
    assert user["role"] == "user" and user["content"] == "hello there"
    assert assistant["content"] == ANSWER and assistant["reasoning_content"] == REASONING
    assert assistant["finish_reason"] == "stop" and "time" in assistant


def test_slash_commands_work_and_mistakes_get_a_one_line_hint(tmp_path, env, term_factory):
    outputs = [f"<think>r{i}</think>answer {i}" for i in range(4)]
    editor = tmp_path / "editor.sh"
    editor.write_text("#!/bin/sh\nprintf 'typed in the editor' > \"$1\"\n")
    editor.chmod(0o755)
    t = term_factory(["chat", "--model", script(tmp_path, outputs)], {**env, "VISUAL": str(editor)})
    t.prompt_ready(1)
    steps = [  # (command, what the screen then shows)
        ("/help", "/retry"),
        ("/set temperature 0.5", "temperature = 0.5"),
        ("/set temperature warm", "/set temperature: expected a number >= 0"),
        ("/set nonsense 1", "unknown setting 'nonsense'"),
        ("/think hide", "reasoning display: hide (remembered)"),
        ("/unknown", "unknown command /unknown"),
        ("/stats", "no reply yet"),
    ]
    for n, (command, shown) in enumerate(steps, 2):
        t.line(command)
        t.wait_for(shown)
        t.prompt_ready(n)
    t.send("\x12nonsen")  # Ctrl-R searches the history; Enter takes the match, Enter sends
    t.settle(0.3)
    t.send("\r")
    t.settle(0.3)
    t.send("\r")
    t.wait_for("unknown setting 'nonsense'", count=2)
    # Multiline input: a \"\"\" block, Alt-Enter, and a bracketed paste, each one message.
    t.send('"""\r')
    t.send("first line\rsecond line\r")
    t.send('"""\r')
    t.wait_for("answer 0")
    t.send("alpha\x1b\rbeta\r")
    t.wait_for("answer 1")
    t.send("\x1b[200~pasted one\npasted two\x1b[201~\r")
    t.wait_for("answer 2")
    t.send("\x18\x05")  # Ctrl-X Ctrl-E: $VISUAL writes the message, which is sent
    t.wait_for("answer 3")
    assert "r0" not in t.text(), "/think hide hides the reasoning" + t.capture()
    t.line("/stats")
    t.wait_for("last reply:")
    t.line("/clear")
    t.wait_for("new conversation")
    t.line("/exit")
    assert t.exit_status() == 0, t.capture()
    assert "Traceback" not in t.text(), t.capture()

    [saved] = sessions(env)
    users = [m["content"] for m in session_lines(saved) if m.get("role") == "user"]
    assert users == ["first line\nsecond line", "alpha\nbeta", "pasted one\npasted two",
                     "typed in the editor"]
    header = session_lines(saved)[0]
    assert header["settings"]["temperature"] == 0.5
    config = Path(env["XDG_CONFIG_HOME"]) / "kimi-mlx" / "config.toml"
    assert 'think = "hide"' in config.read_text()
    history = (Path(env["XDG_STATE_HOME"]) / "kimi-mlx" / "history").read_text()
    assert "/set temperature 0.5" in history


def test_ctrl_c_stops_a_reply_keeps_the_partial_answer_and_ctrl_d_exits(tmp_path, env,
                                                                        term_factory):
    words = " ".join(f"word{i}" for i in range(400))
    t = term_factory(["chat", "--think", "collapse", "--model",
                      script(tmp_path, [f"<think>short plan</think>Start: {words}"], rate=20)],
                     env)
    t.prompt_ready(1)
    t.line("write a lot")
    t.wait_for("word3")
    t.send("\x03")  # Ctrl-C while the answer streams
    t.wait_for("interrupted")
    t.prompt_ready(2)
    assert "▸ thought for" in t.text(), "collapse leaves a one-line summary" + t.capture()
    t.send("\x03")  # Ctrl-C at an empty prompt: how to leave
    t.wait_for("to leave, type /exit or press Ctrl-D")
    t.send("\x04")  # Ctrl-D
    assert t.exit_status() == 0, t.capture()

    [saved] = sessions(env)
    assistant = session_lines(saved)[-1]
    assert assistant["finish_reason"] == "interrupted"
    assert assistant["content"].startswith("Start: word0 word1 word2 word3")
    assert "word399" not in assistant["content"]


def test_continue_resumes_the_last_session_and_reuses_its_kv_cache(tiny_ckpt, env,
                                                                   term_factory):
    args = ["chat", "--model", str(tiny_ckpt), "-t", "0", "-n", "12"]
    first = term_factory(args, env)
    first.prompt_ready(1)
    first.line("remember the word pineapple")
    first.wait_for(" prompt tok (")
    first.prompt_ready(2)
    first.line("/exit")
    assert first.exit_status() == 0, first.capture()
    [saved] = sessions(env)
    kv = saved.with_name(saved.stem + ".kv.safetensors")
    assert kv.exists()

    second = term_factory([*args, "-c"], env)
    second.wait_for("restored ")
    second.prompt_ready(1)
    screen = second.text()
    assert "› remember the word pineapple" in screen, "the earlier turn is shown" + \
        second.capture()
    assert "tokens of KV cache" in screen, second.capture()
    second.line("/context")
    second.wait_for("the next turn reuses")
    reuse = second.text().split("the next turn reuses ")[1].split()[0]
    assert int(reuse.replace(",", "")) > 20, second.capture()
    second.line("and now?")
    second.wait_for(" prompt tok (")  # the status line after the reply
    second.prompt_ready(4)
    second.line("/stats")
    second.wait_for("last reply:")
    stats = second.text().split("last reply:")[1]
    reused = int(stats.split("(")[1].split()[0].replace(",", ""))
    assert reused > 20, "the restored KV cache is reused" + second.capture()
    second.send("\x04")
    assert second.exit_status() == 0, second.capture()
    assert len(sessions(env)) == 1
    assert [m["content"] for m in session_lines(saved) if m.get("role") == "user"] == [
        "remember the word pineapple", "and now?"]


def test_run_on_a_terminal_draws_the_panels(tmp_path, env, term_factory):
    t = term_factory(["run", "--model", script(tmp_path, [GREETING], rate=200), "hi"], env)
    t.wait_for("Nice to meet you.")
    assert t.exit_status() == 0, t.capture()
    screen = t.text()
    assert "╭─ thinking" in screen and "╭─ Kimi" in screen, t.capture()
    assert REASONING in screen and "prompt tokens" in screen, t.capture()



def test_keys_typed_while_run_streams_are_not_echoed_into_its_panels(tmp_path, env,
                                                                     term_factory):
    thinking = "\n".join(f"step {i} of the plan" for i in range(20))
    output = f"<think>{thinking}</think>{ANSWER}<|im_end|>"
    t = term_factory(["run", "--model", script(tmp_path, [output], rate=100), "hi"], env)
    t.wait_for("step 3 of the plan")
    t.send("typed ahead\r")
    t.wait_for("Nice to meet you.")
    assert t.exit_status() == 0, t.capture()
    screen = t.text()
    assert torn_panels(screen) == [] and "typed ahead" not in screen, t.capture()
    assert screen.count("╭─ thinking") == 1 and "step 19 of the plan" in screen, t.capture()
