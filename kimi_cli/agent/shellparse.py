"""Split a shell command into the simple commands it runs, for approval and the hard-deny list.

Segments are separated by `;`, `&&`, `||`, `|`, `&` and newlines; `$(…)`, backticks and `<(…)`
become segments of their own. Anything this cannot follow (heredocs, subshells, control flow,
unbalanced quotes) raises `Unparsable`: callers then ask, never assume.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field


class Unparsable(ValueError):
    pass


@dataclass
class Segment:
    words: list[str] = field(default_factory=list)  # quotes removed; substitutions as "$(…)"
    redirects: list[tuple[str, str]] = field(default_factory=list)  # (operator, target)

    def writes(self) -> list[str]:
        """Files this segment's redirections write (not fd duplications)."""
        return [t for op, t in self.redirects if ">" in op and not t.startswith("&")]


SUBSTITUTION = "$(…)"
_BREAK = set(" \t\n;&|()<>")
_KEYWORDS = {"if", "then", "else", "elif", "fi", "for", "while", "until", "do", "done", "case",
             "esac", "function", "select", "{", "}", "((", "coproc"}
_FD_REDIRECT = re.compile(r"\d*(>>|>\||>&|<>|<&|>|<)")


def split_command(command: str) -> list[Segment]:
    """The simple commands in `command`, outer ones first, nested substitutions after."""
    parser = _Parser(command)
    parser.sequence(terminator=None)
    return [s for s in parser.segments if s.words or s.redirects]


def segment_prefix(words: list[str]) -> tuple[str, ...]:
    """What "approve this prefix" remembers: the program, plus a subcommand (`git status`)."""
    if len(words) >= 2 and re.fullmatch(r"[A-Za-z][\w.-]*", words[1]):
        return tuple(words[:2])
    return tuple(words[:1])


class _Parser:
    def __init__(self, text: str) -> None:
        self.s = text
        self.pos = 0
        self.segments: list[Segment] = []

    def _peek(self, n: int = 0) -> str:
        i = self.pos + n
        return self.s[i] if i < len(self.s) else ""

    def sequence(self, terminator: str | None) -> None:
        """Segments up to `terminator` (`)` of a substitution) or the end of the text."""
        current = Segment()
        self.segments.append(current)

        def next_segment() -> Segment:
            seg = Segment()
            self.segments.append(seg)
            return seg

        while True:
            while self._peek() in (" ", "\t"):
                self.pos += 1
            c = self._peek()
            if not c:
                if terminator:
                    raise Unparsable(f"missing {terminator!r}")
                return
            if terminator and c == terminator:
                self.pos += 1
                return
            two = self.s[self.pos:self.pos + 2]
            if c in ";\n" or two in ("&&", "||"):
                self.pos += 2 if two in ("&&", "||") else 1
                current = next_segment()
            elif two == "|&":
                self.pos += 2
                current = next_segment()
            elif c == "|":
                self.pos += 1
                current = next_segment()
            elif c == "&" and self._peek(1) != ">":
                self.pos += 1
                current = next_segment()
            elif c == "#" and (self.pos == 0 or self.s[self.pos - 1] in " \t\n;&|"):
                while self._peek() and self._peek() != "\n":
                    self.pos += 1
            elif c in "()":
                raise Unparsable("subshells and groups are not followed")
            elif c in "<>" or (c == "&" and self._peek(1) == ">") or self._fd_redirect():
                self._redirect(current)
            else:
                word = self._word()
                if not current.words and not current.redirects and word in _KEYWORDS:
                    raise Unparsable(f"shell keyword {word!r}")
                current.words.append(word)

    def _fd_redirect(self) -> bool:
        m = re.match(r"\d+[<>]", self.s[self.pos:])
        return m is not None

    def _redirect(self, segment: Segment) -> None:
        rest = self.s[self.pos:]
        if rest.startswith("<<<"):
            self.pos += 3
            op = "<<<"
        elif re.match(r"\d*<<", rest):
            raise Unparsable("heredocs are not followed")
        elif rest.startswith(("<(", ">(")):
            self.pos += 2
            self.sequence(terminator=")")
            segment.words.append(SUBSTITUTION)
            return
        elif rest.startswith("&>>") or rest.startswith("&>"):
            op = "&>>" if rest.startswith("&>>") else "&>"
            self.pos += len(op)
        else:
            m = _FD_REDIRECT.match(rest)
            op = m.group(0)
            self.pos += len(op)
        while self._peek() in (" ", "\t"):
            self.pos += 1
        if op in (">&", "<&") or op.endswith((">&", "<&")):
            target = "&" + self._word()
        else:
            target = self._word()
        if not target or target == "&":
            raise Unparsable(f"redirection {op!r} without a target")
        segment.redirects.append((op, target))

    def _word(self) -> str:
        buf: list[str] = []
        while True:
            c = self._peek()
            if not c or c in _BREAK:
                break
            if c == "\\":
                nxt = self._peek(1)
                self.pos += 2
                if nxt != "\n":
                    buf.append(nxt)
            elif c == "'":
                end = self.s.find("'", self.pos + 1)
                if end < 0:
                    raise Unparsable("unbalanced single quote")
                buf.append(self.s[self.pos + 1:end])
                self.pos = end + 1
            elif c == '"':
                self.pos += 1
                buf.append(self._double_quoted())
            elif c == "`":
                buf.append(self._backticks())
            elif c == "$" and self._peek(1) == "(":
                buf.append(self._substitution())
            elif c == "$" and self._peek(1) == "{":
                end = self.s.find("}", self.pos)
                if end < 0:
                    raise Unparsable("unbalanced ${")
                buf.append(self.s[self.pos:end + 1])
                self.pos = end + 1
            else:
                buf.append(c)
                self.pos += 1
        return "".join(buf)

    def _double_quoted(self) -> str:
        buf: list[str] = []
        while True:
            c = self._peek()
            if not c:
                raise Unparsable("unbalanced double quote")
            if c == '"':
                self.pos += 1
                return "".join(buf)
            if c == "\\" and self._peek(1) in ('"', "\\", "$", "`", "\n"):
                if self._peek(1) != "\n":
                    buf.append(self._peek(1))
                self.pos += 2
            elif c == "`":
                buf.append(self._backticks())
            elif c == "$" and self._peek(1) == "(":
                buf.append(self._substitution())
            else:
                buf.append(c)
                self.pos += 1

    def _substitution(self) -> str:
        """`$(…)`: its commands are parsed (and checked) like the outer ones."""
        if self._peek(2) == "(":
            raise Unparsable("arithmetic expansion")
        self.pos += 2
        self.sequence(terminator=")")
        return SUBSTITUTION

    def _backticks(self) -> str:
        end = self.pos + 1
        while True:
            if end >= len(self.s):
                raise Unparsable("unbalanced backtick")
            if self.s[end] == "\\":
                end += 2
                continue
            if self.s[end] == "`":
                break
            end += 1
        inner = re.sub(r"\\([`\\$])", r"\1", self.s[self.pos + 1:end])
        self.pos = end + 1
        nested = _Parser(inner)
        nested.sequence(terminator=None)
        self.segments.extend(nested.segments)
        return SUBSTITUTION
