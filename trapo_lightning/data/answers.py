"""Reference answers checked when the data is loaded (issue 15): a row whose answer no completion could ever be
graded against is a malformed row, named by `file:line` (or a counted `unparseable_answer` skip with
`skip_invalid`), not an error minutes into a run nor a prompt that is graded wrong forever.

Two rules, in this order:
- Prose. math-verify reads letters as variables, so "see the solution" parses, as the product s*e*e*t*h*e*...,
  which no mathematical answer equals. An answer with two words in a row (runs of two or more letters separated
  by spaces, outside LaTeX commands and `\\text{...}`) is prose. Single words ("Yes", "odd"), point names
  ("AB = AC"), products ("ab + bc") and text the author marked (`\\text{no solution}`) pass.
- The reward's own parse (`MathVerifyReward.reference_problem`): math-verify raises on the answer, finds no
  expression in it, or takes longer than `ANSWER_PARSE_TIMEOUT_S`. It is the very parse the reward runs on the
  reference, so "accepted at load" means "the reward can grade it".

Time. Setup runs on the main thread, where the parse runs in-process under math-verify's own `signal.alarm` limit
(`isolate=False`): 3000 nested braces stop at the limit instead of the ~45 s they take unbounded. An alarm that
fires while the garbage collector runs a finalizer is raised inside the finalizer, where Python drops it, and the
parse runs on unbounded: measured after the evaluation tests had left garbage behind, 46 s at a 1 s limit. So the
reward pauses the collector during every in-process check (1.0 s then, the same heap). The reward's worker process, whose limit is
hard, would cost 1.3x the time per answer (measured, 1500 distinct answers); off the main thread the reward uses
it anyway.

Cost. Each distinct answer is parsed once per load (datasets repeat their small integers many times): about 1 ms
for an integer or a fraction, 25 ms for a tuple. Measured on 46,000 JSONL rows with 9,267 distinct answers of
mixed kinds, on this 2-core CPU: loading takes 35 s with the check and 0.8 s without it (1,300 rows/s); each rank
checks its own copy, in parallel.
"""

from __future__ import annotations

import re

from trapo_lightning.reward import MathVerifyReward

ANSWER_PARSE_TIMEOUT_S = 5.0
"""Longest parse of one reference answer; the reward's default time limit for a whole check."""

_MARKED_TEXT = re.compile(r"\\(?:text|textbf|textit|textrm|mathrm|mbox|operatorname)\s*\{[^{}]*\}")
_COMMAND = re.compile(r"\\[A-Za-z]+")
_WORDS_IN_A_ROW = re.compile(r"[A-Za-z]{2,}\s+[A-Za-z]{2,}")


def prose_problem(answer: str) -> str | None:
    """Why `answer` is prose rather than a mathematical answer (see the module docstring), or None."""
    words = _WORDS_IN_A_ROW.search(_COMMAND.sub(" ", _MARKED_TEXT.sub(" ", answer)))
    if words is None:
        return None
    return (
        f"it reads as prose ('{words.group()}'): math-verify would take its letters for variables, so no answer "
        "could match it; give the final answer itself, or wrap deliberate text in \\text{...}"
    )


class AnswerCheck:
    """Checks reference answers, each distinct one once; `close()` stops the reward's worker if one was started."""

    def __init__(self, timeout_s: float = ANSWER_PARSE_TIMEOUT_S) -> None:
        self._reward = MathVerifyReward(timeout_s=timeout_s, isolate=False)
        self._problems: dict[str, str | None] = {}

    def problem(self, answer: str) -> str | None:
        """Why the reward could never grade a completion against `answer`, or None if it can."""
        if answer not in self._problems:
            self._problems[answer] = prose_problem(answer) or self._parse_problem(answer)
        return self._problems[answer]

    def _parse_problem(self, answer: str) -> str | None:
        return self._reward.reference_problem(answer)  # in-process on the main thread, with a signal time limit

    def close(self) -> None:
        self._reward.close()
