"""The embedded default task: chained integer arithmetic with step-by-step expert solutions.

It stands in for OpenR1-Math so the whole TRAPO loop runs offline on a laptop. Each problem chains several
additions and subtractions; the expert solution writes one line of work per operation, the lines separated by
blank lines ("\\n\\n") so the paragraph-snapped prefix cut (TRAPO.md, "Prefix cut") has real boundaries, and it
ends in `\\boxed{answer}` so the same math-verify reward as for real data applies.

Records are a pure function of (seed, split, index): a run is reproducible and a resumed run sees the same data.
The held-out split is disjoint from the training split by construction: a problem belongs to the split picked by
a stable hash of its text, so no validation problem is ever trained on.
"""

from __future__ import annotations

import hashlib
import random

from trapo_lightning.data.records import MathRecord

SPLITS = ("train", "val")


class SyntheticArithmetic:
    """Chained addition/subtraction problems, e.g. "Compute 47 + 38 - 19." -> 66."""

    def __init__(
        self,
        num_operands: int = 3,
        digits: int = 2,
        operations: str = "+-",
        val_fraction: float = 0.1,
        seed: int = 0,
    ) -> None:
        """
        Args:
            num_operands: Numbers per problem; the solution has `num_operands - 1` lines of work. Difficulty knob.
            digits: Largest number of digits per operand. Difficulty knob.
            operations: Operators to draw from, any of "+-". Subtractions that would go negative become additions.
            val_fraction: Share of the problem space reserved for the held-out split.
            seed: Seed of the problem generator; the same seed gives the same problems.
        """
        if num_operands < 2:
            raise ValueError(f"num_operands must be >= 2 to need any work, got {num_operands}")
        if not 1 <= digits <= 6:
            raise ValueError(f"digits must be in [1, 6], got {digits}")
        if not operations or set(operations) - set("+-"):
            raise ValueError(f"operations must be a non-empty string over '+-', got {operations!r}")
        if not 0.0 < val_fraction < 1.0:
            raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
        self.num_operands = num_operands
        self.digits = digits
        self.operations = operations
        self.val_fraction = val_fraction
        self.seed = seed

    def record(self, split: str, index: int) -> MathRecord:
        """The `index`-th problem of `split` ("train" or "val")."""
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        rng = random.Random(f"{self.seed}/{split}/{index}")
        while True:  # rejection-sample into the split's share of the problem space
            operands, operators = self._draw(rng)
            problem = "Compute " + _expression(operands, operators) + "."
            if self._split_of(problem) == split:
                break
        solution, answer = _solve(operands, operators)
        return MathRecord(problem=problem, solution=solution, answer=answer, source=f"synthetic:{split}:{index}")

    def records(self, split: str, count: int) -> list[MathRecord]:
        return [self.record(split, i) for i in range(count)]

    def _draw(self, rng: random.Random) -> tuple[list[int], list[str]]:
        high = 10**self.digits - 1
        operands = [rng.randint(0, high) for _ in range(self.num_operands)]
        operators = [rng.choice(self.operations) for _ in range(self.num_operands - 1)]
        return operands, _no_negatives(operands, operators)

    def _split_of(self, problem: str) -> str:
        bucket = int.from_bytes(hashlib.blake2b(problem.encode(), digest_size=8).digest(), "big") / 2**64
        return "val" if bucket < self.val_fraction else "train"


def _no_negatives(operands: list[int], operators: list[str]) -> list[str]:
    """Turn a subtraction into an addition wherever the running total would go below zero."""
    total, fixed = operands[0], []
    for value, op in zip(operands[1:], operators):
        op = "+" if op == "-" and value > total else op
        total = total + value if op == "+" else total - value
        fixed.append(op)
    return fixed


def _expression(operands: list[int], operators: list[str]) -> str:
    parts = [str(operands[0])]
    for value, op in zip(operands[1:], operators):
        parts += [op, str(value)]
    return " ".join(parts)


def _solve(operands: list[int], operators: list[str]) -> tuple[str, str]:
    """One line of work per operation, blank-line separated, then the boxed answer."""
    total, steps = operands[0], []
    for value, op in zip(operands[1:], operators):
        result = total + value if op == "+" else total - value
        steps.append(f"{total} {op} {value} = {result}")
        total = result
    steps.append(f"\\boxed{{{total}}}")
    return "\n\n".join(steps), str(total)
