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
# Tokens per forward pass during prefill: bounds activation memory on long prompts.
PREFILL_CHUNK = 512

DEFAULT_SYSTEM_PROMPT = "You are Kimi, an AI assistant created by Moonshot AI."


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
