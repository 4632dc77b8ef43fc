"""Preferences remembered between runs, in `$XDG_CONFIG_HOME/kimi-mlx/config.toml`.

Only flat `key = value` lines (strings, numbers, booleans); other lines are kept as written.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from .. import config

CONFIG_FILE = "config.toml"
_LINE = re.compile(r"^\s*([A-Za-z0-9_.-]+)\s*=\s*(.*?)\s*$")


def config_path() -> Path:
    return config.config_dir() / CONFIG_FILE


def read_prefs(path: Path | None = None) -> dict:
    """The file's top-level keys; a missing or unreadable file is no preferences."""
    path = path or config_path()
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return {}
    try:
        import tomllib
    except ImportError:  # Python 3.10: the simple form this module writes
        return _parse_simple(text)
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError:
        return _parse_simple(text)
    return {k: v for k, v in data.items() if not isinstance(v, dict)}


def _parse_simple(text: str) -> dict:
    out = {}
    for line in text.splitlines():
        m = _LINE.match(line.split("#", 1)[0] if '"' not in line else line)
        if m:
            out[m.group(1)] = _value(m.group(2))
    return out


def _value(raw: str):
    if raw.startswith('"') and raw.endswith('"') and len(raw) >= 2:
        return raw[1:-1].replace('\\"', '"').replace("\\\\", "\\")
    if raw in ("true", "false"):
        return raw == "true"
    try:
        return int(raw)
    except ValueError:
        try:
            return float(raw)
        except ValueError:
            return raw


def _toml(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    return '"' + str(value).replace("\\", "\\\\").replace('"', '\\"') + '"'


def write_pref(key: str, value, path: Path | None = None) -> None:
    """Set one top-level key, keeping the file's other lines; best effort (a read-only config
    directory only means the setting is not remembered)."""
    path = path or config_path()
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError):
        lines = []
    new = f"{key} = {_toml(value)}"
    # Top-level keys come before the first [table]; replace there or insert before it.
    end = next((i for i, line in enumerate(lines) if line.lstrip().startswith("[")), len(lines))
    for i in range(end):
        m = _LINE.match(lines[i])
        if m and m.group(1) == key:
            lines[i] = new
            break
    else:
        lines.insert(end, new)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text("\n".join(lines) + "\n", encoding="utf-8")
        os.replace(tmp, path)
    except OSError:
        pass
