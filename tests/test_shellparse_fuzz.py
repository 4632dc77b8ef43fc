"""The shell parser under attack: a command substitution in every syntactic position bash allows
is never "the same as an approved program", and what the parser does approve runs nothing in bash.

An exhaustive grid (payload × position) and a seeded random mix; bash itself is the oracle for
every command the policy would let through.
"""

from __future__ import annotations

import random
import shutil
import subprocess

import pytest

from kimi_cli.agent.approval import Mode, Policy, Request, command_prefixes
from kimi_cli.agent.shellparse import split_command

# Programs a user approved "for this session" (their read-only uses are covered).
APPROVED = {("ls",), ("echo",), ("cat",), ("find",), ("sed",), ("grep",), ("git", "status"),
            ("awk",), ("head",), ("wc",)}

# Ways to run `touch X` from inside a word.
PAYLOADS = ["$(touch X)", "`touch X`", "<(touch X)", ">(touch X)", "${x:-$(touch X)}",
            "${x:=`touch X`}", "${x/a/$(touch X)}", "${!x}$(touch X)", "$((1+$(touch X)))",
            "$[1+$(touch X)]", "$'\\x41'$(touch X)", '$"$(touch X)"', "\"$(touch X)\"",
            "\"`touch X`\"", "$( (touch X) )", "$(touch X;)", "\\$(touch X)$(touch X)"]

# Where a word (or a whole command) can go; {} is the payload.
POSITIONS = [
    "ls {}", "ls -la {} a", "ls a{}b", "ls --color={}", 'ls "{}"', 'ls "a {} b"', "ls > {}",
    "ls < {}", "ls 2> {}", "ls >> {}", "ls &> {}", "X={} ls", "X=a Y={} ls", "ls <<EOF\n{}\nEOF",
    "ls <<< {}", "a[{}]=1; ls", "ls $'a'{}", "ls $'\\''{}", "ls {{a,{}}}", "ls {a,b}{}",
    "case x in {}) ls;; esac", "ls | cat {}", "ls && echo {}", "ls; {}", "ls || {}", "ls & {}",
    "ls #\n{}", "ls \\\n{}", "echo {} | ls", "ls `echo {}`", "find . -name {}", "sed -n {} f",
    "grep -e {} f", "git status {}", "awk {} f", "ls $(echo {})", "ls ${{x:-{}}}", "ls ~{}",
    "ls *{}", "for f in {}; do ls; done", "[[ -n {} ]] && ls", "ls $(( {} ))", "ls \"${{x}}{}\"",
    "eval ls {}", "ls\t{}", "ls;{}", "head -n 1 {}", "wc -l {} < f",
]


def allowed(command: str) -> bool:
    policy = Policy(Mode.ask, approver=None, prefixes=set(APPROVED))
    return policy.decide(Request("id", "shell", "exec", command, ""), command).allowed


@pytest.mark.parametrize("position", POSITIONS)
def test_a_substitution_in_any_position_is_never_covered_by_an_approved_program(position):
    for payload in PAYLOADS:
        if payload.startswith(("<(", ">(")) and position.count('"') == 2:
            continue  # inside double quotes `<(` is two plain characters
        command = position.replace("{}", payload)
        assert not allowed(command), command
        assert command_prefixes(command) is None, command


def test_the_approved_programs_themselves_are_covered():
    # The grid above is not vacuous: the same commands with a harmless word are let through.
    for command in ("ls a", "ls -la a b", "ls --color=never", "ls 2> /dev/null", "ls | cat f",
                    "ls && echo hi", "find . -name x", "sed -n 1p f", "git status -s", "wc -l f"):
        assert allowed(command), command


PIECES = ["a", "-l", "'q t'", '"d q"', "\\ ", "\\$x", "$x", "${y}", "*", "?", "[ab]", "{a,b}",
          "~", "..", "/etc", ";", "&&", "||", "|", "&", ">", "<", "2>&1", "#", "\n", "(", ")",
          "=", "X=1", "$'", "'", '"', "`", "\\", "$((", "${", "}", "<<", "<(", ">(", "$(", "\t",
          # The payload made harmless by quoting: the parser may approve these, bash checks it.
          "'$(touch X)'", '"\\$(touch X)"', "'`touch X`'", '"<(touch X)"', "'${x:-$(touch X)}'"]
STARTS = ["ls", "echo", "cat", "find .", "sed -n 1p", "grep x", "git status", "head", "wc"]


def _random_commands(n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        words = [rng.choice(STARTS)]
        for _ in range(rng.randint(0, 6)):
            words.append(rng.choice(PIECES + PAYLOADS) if rng.random() < 0.8
                         else rng.choice(PAYLOADS))
        sep = rng.choice([" ", " ", "", "\t"])
        out.append(sep.join(words) if sep else " ".join(words[:1]) + " " + "".join(words[1:]))
    return out


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash as the oracle")
def test_what_the_parser_approves_runs_nothing_in_bash(tmp_path):
    """Every command of a seeded random mix that the policy lets through, run by bash in an
    empty directory: none creates X."""
    candidates = [c for c in _random_commands(2500, seed=16) + [
        p.replace("{}", "'$(touch X)'") for p in POSITIONS] if allowed(c)]
    # The random mix reaches approved commands holding the (quoted) payload, not only refusals.
    assert sum("touch X" in c for c in candidates) > 20
    for command in candidates:
        (tmp_path / "f").write_text("a\n")
        subprocess.run(["bash", "-c", command], cwd=tmp_path, stdin=subprocess.DEVNULL,
                       capture_output=True, timeout=10)
        assert not (tmp_path / "X").exists(), command


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash as the oracle")
def test_word_splitting_agrees_with_bash_on_plain_commands(tmp_path):
    commands = ["echo a 'b c' \"d e\" f\\ g", "echo 'it'\"'\"'s' x", "echo \"a\\\"b\" 'c\\'",
                "echo a\"b\"'c'd", "echo \"\\$x \\\\ \\` \\q\"", "echo --opt=\"v w\" -x"]
    for command in commands:
        words = split_command(command)[0].words[1:]
        shown = subprocess.run(["bash", "-c", command.replace("echo", "printf '%s\\n'", 1)],
                               cwd=tmp_path, capture_output=True, text=True).stdout
        assert shown.splitlines() == words, command
