"""The aggregation turn of heavy mode: the user message that shows the model N candidate answers.

Ours (Moonshot did not publish theirs): final answers only, unattributed and in order, framed as
independent attempts to check rather than votes to count; the model answers the question itself.
"""

from __future__ import annotations

INSTRUCTIONS = """\
Below are {n} candidate answers to the question above, written independently by separate \
attempts at it. Each shows only its final answer, not its reasoning. They may agree, \
disagree or all be wrong; an answer that several share is not right for that reason alone.

Work out the correct answer yourself: compare the candidates, find where they differ, check \
the disputed points (and any claim that looks doubtful) on their merits, and take the best \
parts of each. Then write the final answer to the original question as a complete reply to \
the user, in the language of the question. Do not mention the candidates or this comparison."""

UNFINISHED = "(this attempt stopped before giving a final answer)"


def aggregation_message(question: str, answers: list[str | None]) -> str:
    """The aggregation turn's user message: the question, then each candidate's final answer
    (None or empty: the attempt gave none)."""
    parts = [f"Question:\n{question.strip()}", INSTRUCTIONS.format(n=len(answers))]
    for i, answer in enumerate(answers, 1):
        body = answer.strip() if answer and answer.strip() else UNFINISHED
        parts.append(f"<candidate {i}>\n{body}\n</candidate {i}>")
    return "\n\n".join(parts)
