"""Settings, XDG paths and defaults: the one place every default lives.

Never touches ~/.kimi (Moonshot's own kimi-cli uses it).
"""

from __future__ import annotations

import os
from pathlib import Path

APP_NAME = "kimi-mlx"
DEFAULT_REPO = "moonshotai/Kimi-K2-Thinking"
CONTEXT_LENGTH = 262144

# Generation defaults (Moonshot's recommendation for the thinking model).
DEFAULT_TEMPERATURE = 1.0
DEFAULT_TOP_P = 1.0
DEFAULT_MIN_P = 0.0
DEFAULT_TOP_K = 0
DEFAULT_MAX_TOKENS = 32768
DEMO_MAX_TOKENS = 64  # the demo's random weights: a first run that ends in seconds
SEED_MAX = 2**64 - 1  # MLX seeds are unsigned 64-bit
# Context assumed when sizing memory (KV cache) for fit reports and the automatic expert cache.
FIT_CONTEXT = 32768
# Seconds `kimi run PROMPT` waits for a piped stdin to deliver context (data or EOF) before
# ignoring it: a pipe nobody writes to must not hang the run.
STDIN_CONTEXT_WAIT = 1.0
# Several machines (kimi_cli.distributed): seconds a rank waits for the others to join the
# group before it gives up with one message (KIMI_DIST_CONNECT_TIMEOUT overrides it), and how
# many KV caches a following rank keeps.
DIST_CONNECT_TIMEOUT = 60.0
# Seconds rank 0 waits for one pipeline step (a 512-token prefill chunk through every rank,
# expert-cache misses included) before it takes the other ranks for gone
# (KIMI_DIST_STEP_TIMEOUT overrides it).
DIST_STEP_TIMEOUT = 600.0
DIST_SIGTERM_GRACE = 3.0  # s a rank stuck in MLX gets after mlx.launch's SIGTERM, then killed
DIST_FOLLOWER_CACHES = 4
# Tokens per forward pass during prefill: bounds activation memory on long prompts.
PREFILL_CHUNK = 512
# Heavy mode (kimi run --heavy): trajectories rolled out together, as in the model card.
HEAVY_TRAJECTORIES = 8

DEFAULT_SYSTEM_PROMPT = "You are Kimi, an AI assistant created by Moonshot AI."

# Agent runs (kimi run --agent). The model is trained for 200-300 sequential tool calls.
AGENT_MAX_STEPS = 300
AGENT_TOOL_OUTPUT_CAP = 20_000  # characters of one tool result the model sees
AGENT_SHELL_TIMEOUT = 120  # seconds, when the model gives none
AGENT_SHELL_MAX_TIMEOUT = 300  # the most a model may ask for; --max-command-timeout raises it
AGENT_GREP_TIMEOUT = 5.0  # seconds for one grep call: Python's re can backtrack for ever
AGENT_REPEAT_WARN = 3  # identical tool calls in a row: the model is told ...
AGENT_REPEAT_STOP = 5  # ... and then the run stops
EXIT_AGENT_STEP_LIMIT = 3  # the agent used --max-steps without answering
EXIT_AGENT_REPEATING = 4  # the agent kept repeating the same tool call
# What shell commands get of kimi's environment (plus LC_* and what --env names); the rest, such
# as tokens, keys, DATABASE_URL, SSH_AUTH_SOCK or DBUS_SESSION_BUS_ADDRESS, stays with kimi.
AGENT_ENV_ALLOW = ("PATH", "HOME", "USER", "LOGNAME", "SHELL", "LANG", "LANGUAGE", "TERM", "TZ",
                   "TMPDIR", "PWD", "COLUMNS", "LINES", "SOURCE_DATE_EPOCH")
# System directories the Linux sandbox shows read-only (those that exist; symlinks stay links).
SANDBOX_SYSTEM_PATHS = ("/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32", "/etc",
                        "/opt", "/nix")


def _xdg(var: str, fallback: str) -> Path:
    override = os.environ.get("KIMI_MLX_HOME")
    if override:
        return Path(override) / fallback.rsplit("/", 1)[-1]
    base = os.environ.get(var) or str(Path.home() / fallback)
    return Path(base) / APP_NAME


def config_dir() -> Path:
    return _xdg("XDG_CONFIG_HOME", ".config")


def state_dir() -> Path:
    return _xdg("XDG_STATE_HOME", ".local/state")


def cache_dir() -> Path:
    return _xdg("XDG_CACHE_HOME", ".cache")


# `kimi serve`: the HTTP front end.
SERVE_HOST = "127.0.0.1"  # loopback unless the user asks for more
SERVE_PORT = 8000
SERVE_MODEL_NAME = "kimi-k2-thinking"  # the id clients send (Moonshot's API name for the model)
SERVE_MAX_QUEUE = 16  # requests waiting for the engine; one more gets 503
SERVE_MIN_CONTEXT = 4096  # `kimi serve` shrinks its default context to fit, but not below this
SERVE_PARALLEL = 4  # sequences `kimi serve` decodes at once (continuous batching)
SERVE_MAX_BODY = 64 * 1024 * 1024  # bytes of one request body
