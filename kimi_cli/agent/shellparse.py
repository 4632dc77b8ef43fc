"""Split a bash command into the simple commands it runs (bash's quoting rules, `$(…)` followed),
for approval and the hard-deny list; what it cannot follow is `Unparsable`, never a guess.

Words known only at run time (expansions, globs, braces, tildes, substitutions) mark their
segment `opaque`: callers ask for it.
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
    raw: list[str] = field(default_factory=list)  # each word's source text, quotes and all
    opaque: bool = False  # a word or target is only known at run time, or a comment follows

    def writes(self) -> list[str]:
        """Files this segment's redirections write (not fd duplications)."""
        return [t for op, t in self.redirects if ">" in op and not t.startswith("&")]


SUBSTITUTION = "$(…)"
_BREAK = set(" \t\n;&|()<>")
_KEYWORDS = {"if", "then", "else", "elif", "fi", "for", "while", "until", "do", "done", "case",
             "esac", "function", "select", "{", "}", "((", "[[", "]]", "coproc"}
_FD_REDIRECT = re.compile(r"\d*(>>|>\||>&|<>|<&|>|<)")
_SIMPLE_PARAM = re.compile(r"\$\{([A-Za-z_]\w*|\d+|[@*#?$!-])\}")
_NAME_PARAM = re.compile(r"\$([A-Za-z_]\w*|[0-9@*#?$!-])")
# Characters that print nothing or move the cursor: a command holding one is never "plain".
_INVISIBLE = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\u200b-\u200f\u202a-\u202e\u2060-\u2069"
                        "\ufeff]")


def split_command(command: str) -> list[Segment]:
    """The simple commands in `command`, outer ones first, nested substitutions after."""
    if _INVISIBLE.search(command):
        raise Unparsable("control or invisible characters")
    parser = _Parser(command)
    parser.sequence(terminator=None)
    segments = [s for s in parser.segments if s.words or s.redirects]
    if any(s.opaque and not (s.words or s.redirects) for s in parser.segments):
        for s in segments:  # a comment after an operator hides text from every segment
            s.opaque = True
    return segments


class _Parser:
    def __init__(self, text: str) -> None:
        self.s = text
        self.pos = 0
        self.segments: list[Segment] = []
        self.literal = True  # the word being read has a value known before it runs

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
            if c in ";\n" or two in ("&&", "||", "|&"):
                self.pos += 2 if two in ("&&", "||", "|&") else 1
                current = next_segment()
            elif c == "|":
                self.pos += 1
                current = next_segment()
            elif c == "&" and self._peek(1) != ">":
                self.pos += 1
                current = next_segment()
            elif c == "#":  # at the start of a word: a comment to the end of the line
                current.opaque = True
                while self._peek() and self._peek() != "\n":
                    self.pos += 1
            elif c in "()":
                raise Unparsable("subshells and groups are not followed")
            elif c in "<>" or (c == "&" and self._peek(1) == ">") or self._fd_redirect():
                self._redirect(current)
            else:
                start = self.pos
                word, literal = self._word()
                if not current.words and not current.redirects and word in _KEYWORDS:
                    raise Unparsable(f"shell keyword {word!r}")
                current.words.append(word)
                current.raw.append(self.s[start:self.pos])
                current.opaque |= not literal

    def _fd_redirect(self) -> bool:
        return re.match(r"\d+[<>]", self.s[self.pos:]) is not None

    def _redirect(self, segment: Segment) -> None:
        rest = self.s[self.pos:]
        if re.match(r"\d*<<", rest):
            raise Unparsable("here-documents and here-strings are not followed")
        if rest.startswith(("<(", ">(")):
            self.pos += 2
            self.sequence(terminator=")")
            segment.words.append(SUBSTITUTION)
            segment.raw.append(SUBSTITUTION)
            segment.opaque = True
            return
        if rest.startswith("&>>") or rest.startswith("&>"):
            op = "&>>" if rest.startswith("&>>") else "&>"
        else:
            op = _FD_REDIRECT.match(rest).group(0)
        self.pos += len(op)
        while self._peek() in (" ", "\t"):
            self.pos += 1
        if self._peek() in ("", "\n", ";", "&", "|", "<", ">", "(", ")"):
            raise Unparsable(f"redirection {op!r} without a target")
        target, literal = self._word()
        # `>&2` duplicates a descriptor, but `>&FILE` (and `1>&FILE`) writes FILE, like `&>`.
        if op.endswith("<&") or (op.endswith(">&") and re.fullmatch(r"\d+-?|-", target)):
            target = "&" + target
        segment.redirects.append((op, target))
        segment.opaque |= not literal

    def _word(self) -> tuple[str, bool]:
        """One word with quotes removed, and whether its value is known before it runs."""
        buf: list[str] = []
        self.literal = True
        while True:
            c = self._peek()
            if not c or c in _BREAK:
                break
            if c == "\\":
                nxt = self._peek(1)
                if nxt in ("", "\n"):
                    raise Unparsable("backslash at the end of a line")
                buf.append(nxt)
                self.pos += 2
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
            elif c == "$":
                if self._peek(1) in ("'", '"'):
                    raise Unparsable("$'…' and $\"…\" quoting")
                buf.append(self._dollar())
            else:
                if c in "*?[{~":  # globs, brace expansion, tilde: known only when it runs
                    self.literal = False
                buf.append(c)
                self.pos += 1
        return "".join(buf), self.literal

    def _double_quoted(self) -> str:
        buf: list[str] = []
        while True:
            c = self._peek()
            if not c:
                raise Unparsable("unbalanced double quote")
            if c == '"':
                self.pos += 1
                return "".join(buf)
            if c == "\\" and self._peek(1) == "\n":
                raise Unparsable("backslash-newline")
            if c == "\\" and self._peek(1) in ('"', "\\", "$", "`"):
                buf.append(self._peek(1))
                self.pos += 2
            elif c == "`":
                buf.append(self._backticks())
            elif c == "$":
                buf.append(self._dollar())
            else:
                buf.append(c)
                self.pos += 1

    def _dollar(self) -> str:
        """`$…` at the cursor: a substitution (followed), a plain parameter (opaque) or `$`."""
        rest = self.s[self.pos:self.pos + 3]
        if rest.startswith("$((") or rest.startswith("$["):
            raise Unparsable("arithmetic expansion")
        if rest.startswith("$("):
            self.pos += 2
            self.sequence(terminator=")")
            self.literal = False  # after the inner words, which reset it
            return SUBSTITUTION
        if rest.startswith("${"):
            m = _SIMPLE_PARAM.match(self.s, self.pos)
            if not m:  # ${x:-…}, ${x/…}, ${!x}, ${#x}, ${x[…]}: bash runs code in some of them
                raise Unparsable("parameter expansion with an operator")
        else:
            m = _NAME_PARAM.match(self.s, self.pos)
            if not m:
                self.pos += 1
                return "$"
        self.literal = False
        self.pos = m.end()
        return m.group(0)

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
        self.literal = False
        nested = _Parser(inner)
        nested.sequence(terminator=None)
        self.segments.extend(nested.segments)
        return SUBSTITUTION
