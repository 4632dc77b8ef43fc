"""Start `kimi serve` as a subprocess on a free loopback port, and always stop it.

`--port 0` lets the server pick the port; the URL is read from its announcement on stderr,
which a thread keeps draining (one log line per request) so the pipe never fills.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

_SCRIPT = Path(sys.executable).with_name("kimi")
KIMI = [str(_SCRIPT)] if _SCRIPT.exists() else [sys.executable, "-m", "kimi_cli.cli"]
URL = re.compile(r"serving \S+ at (http://\S+)/v1 ")

ANSWER = "<think>Compare 9.11 and 9.9: 9.90 > 9.11.</think>9.9 is bigger."
SHELL_CALL = ("<think>I should list the files.</think><|tool_calls_section_begin|>"
              "<|tool_call_begin|>functions.shell:0<|tool_call_argument_begin|>"
              '{"command": "ls -la"}<|tool_call_end|><|tool_calls_section_end|>')
# The call starts inside the reasoning, without </think> (users of every server report it).
CALL_IN_REASONING = ("<think>Let me look at the file first.<|tool_calls_section_begin|>"
                     "<|tool_call_begin|>functions.read_file:0<|tool_call_argument_begin|>"
                     '{"path": "notes.txt"}<|tool_call_end|><|tool_calls_section_end|>')
# The same call after reasoning the model began without <think> and never closed.
CALL_WITHOUT_THINK = ("Let me look at the file first.<|tool_calls_section_begin|>"
                      "<|tool_call_begin|>functions.read_file:0<|tool_call_argument_begin|>"
                      '{"path": "notes.txt"}<|tool_call_end|><|tool_calls_section_end|>')
# The singular section markers, which are not special tokens: they arrive as plain text.
CALL_SINGULAR_SECTION = ("<think>Let me look at the file first.</think>"
                         "<|tool_call_section_begin|><|tool_call_begin|>functions.read_file:0"
                         '<|tool_call_argument_begin|>{"path": "notes.txt"}<|tool_call_end|>'
                         "<|tool_call_section_end|>")
TWO_CALLS = ("<think>Both files.</think><|tool_calls_section_begin|>"
             "<|tool_call_begin|>functions.read_file:0<|tool_call_argument_begin|>"
             '{"path": "a.txt"}<|tool_call_end|>'
             "<|tool_call_begin|>functions.read_file:1<|tool_call_argument_begin|>"
             '{"path": "b.txt"}<|tool_call_end|><|tool_calls_section_end|>')
AFTER_TOOL = "<think>The listing shows two files.</think>There are two files: a.txt and b.txt."


def serve_env(root: Path) -> dict[str, str]:
    """A fresh user's environment: private XDG dirs, offline Hugging Face cache."""
    e = {k: v for k, v in os.environ.items()
         if k not in ("KIMI_MODEL", "KIMI_MLX_HOME", "KIMI_API_KEY", "HF_HUB_CACHE")}
    for var in ("XDG_CACHE_HOME", "XDG_STATE_HOME", "XDG_CONFIG_HOME", "HF_HOME"):
        (root / var).mkdir(parents=True, exist_ok=True)
        e[var] = str(root / var)
    e["HF_HUB_OFFLINE"] = "1"
    return e


class ServeProcess:
    def __init__(self, args: list[str], env: dict[str, str], timeout: float = 90):
        self.proc = subprocess.Popen([*KIMI, "serve", "--port", "0", *args], env=env,
                                     stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True)
        self.lines: list[str] = []
        self._announced = threading.Event()
        self.url = ""
        threading.Thread(target=self._drain, daemon=True).start()
        if not self._announced.wait(timeout) or not self.url:
            self.stop()
            raise AssertionError("kimi serve did not start:\n" + "".join(self.lines))
        self.base = self.url + "/v1"

    def _drain(self) -> None:
        for line in self.proc.stderr:
            self.lines.append(line)
            m = URL.search(line)
            if m and not self.url:
                self.url = m.group(1)
                self._announced.set()
        self._announced.set()  # it exited

    def log(self) -> str:
        return "".join(self.lines)

    def wait_for_log(self, pattern: str, timeout: float = 20) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for line in list(self.lines):
                if re.search(pattern, line):
                    return line
            time.sleep(0.05)
        raise AssertionError(f"no log line matching {pattern!r}:\n{self.log()}")

    def stop(self, sig: int = signal.SIGINT, timeout: float = 20) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        return self.proc.returncode


def script_file(directory: Path, outputs: list[str]) -> str:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "script.json"
    path.write_text(json.dumps(outputs))
    return f"scripted:{path}"
