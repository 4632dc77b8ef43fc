"""Model-supplied text made safe to show on a terminal: control characters, bidi overrides and
zero-width characters become visible escapes, so a prompt shows exactly what will run.
"""

from __future__ import annotations

import re

_NAMED = {"\x1b": "\\x1b", "\r": "\\r", "\b": "\\b", "\t": "\\t", "\x7f": "\\x7f"}
# C0 (but newline) and C1 controls, DEL, bidi embeddings/overrides/isolates and marks,
# zero-width and invisible formatting characters.
_HIDDEN = re.compile("[\x00-\x09\x0b-\x1f\x7f-\x9f\u061c\u180e\u200b-\u200f\u202a-\u202e"
                     "\u2060-\u2069\ufeff]")
_HIDDEN_NO_TAB = re.compile(_HIDDEN.pattern.replace("\x00-\x09", "\x00-\x08"))


def _escape(m: re.Match) -> str:
    c = m.group(0)
    if c in _NAMED:
        return _NAMED[c]
    return f"\\x{ord(c):02x}" if ord(c) < 0x100 else f"\\u{ord(c):04x}"


def visible(text: str, tabs: bool = False) -> str:
    """`text` with every invisible or cursor-moving character written as an escape (`\\x1b`,
    `\\r`, `\\u202e`…); newlines stay, and tabs too when `tabs` (tool output, diffs)."""
    return (_HIDDEN_NO_TAB if tabs else _HIDDEN).sub(_escape, text)


def json_safe(doc: str) -> str:
    """A JSON text (from json.dumps(ensure_ascii=False)) with C1 controls, bidi and zero-width
    characters as \\u escapes too; json.dumps escapes only C0 controls."""
    return _HIDDEN.sub(lambda m: f"\\u{ord(m.group(0)):04x}", doc)
