"""The embedded default task: chained integer arithmetic with step-by-step expert solutions.

It stands in for OpenR1-Math so the whole TRAPO loop runs offline on a laptop. Each problem chains several
additions and subtractions; the expert solution works each operation column by column, carries and borrows
written out, one paragraph per operation:

    47+38: 7+8=15, 4+3+1=8, so 85

    85-19: 15-9=6, 8-1-1=6, so 66

    \\boxed{66}

Column work is what makes the task learnable by a tiny model: every step is a single-digit fact plus a carry,
where writing `47 + 38 = 85` most-significant digit first would need the carry before it is computed (measured:
a 0.8M-parameter model stayed near 1% after 22k expert traces of that form). Paragraphs are separated by blank
lines ("\\n\\n") so the paragraph-snapped prefix cut (TRAPO.md, "Prefix cut") has real boundaries, and the
solution ends in `\\boxed{answer}` so the same math-verify reward as for real data applies. The work is written
without spaces because Qwen2's pre-tokenizer makes every space a token of its own.

With `alternatives: 1` a record also carries a second solution, which does the same operations in another valid
order (the data's stand-in for OpenR1-Math's several correct generations: records.py says which guides what):
the additions first, then the subtractions, each in the problem's order; for a problem already written that way,
its additions rotated by one (the first moved last), or, where they are all equal, its subtractions. Taking the
additions first keeps every running total between the answer and the sum of the additions, so no step goes
negative. A problem with no other such order (3 + 3 + 3, 9 - 2 - 2) keeps one solution. For example

    47+38: 7+8=15, 4+3+1=8, so 85        ->    38+47: 8+7=15, 3+4+1=8, so 85

    85-19: 15-9=6, 8-1-1=6, so 66              85-19: 15-9=6, 8-1-1=6, so 66

for "Compute 47 + 38 - 19.". The alternative draws nothing from the generator, so the primary solutions, and a
run with `alternatives: 0` (the default), are the same whatever the setting.

Records are a pure function of (seed, split, index): a run is reproducible and a resumed run sees the same data.
The held-out split is disjoint from the training split by construction: a problem belongs to the split picked by
a stable hash of its text, so no validation problem is ever trained on.
"""

from __future__ import annotations

import hashlib
import random

from trapo_lightning.data.records import EXPERT_TRACES, MathRecord

SPLITS = ("train", "val")
WORK_STYLES = ("columns", "direct")


class SyntheticArithmetic:
    """Chained addition/subtraction problems, e.g. "Compute 47 + 38 - 19." -> 66."""

    def __init__(
        self,
        num_operands: int = 3,
        digits: int = 2,
        operations: str = "+-",
        val_fraction: float = 0.1,
        work: str = "columns",
        seed: int = 0,
        alternatives: int = 0,
    ) -> None:
        """
        Args:
            num_operands: Numbers per problem; the solution has `num_operands - 1` lines of work. Difficulty knob.
            digits: Largest number of digits per operand. Difficulty knob.
            operations: Operators to draw from, any of "+-". Subtractions that would go negative become additions.
            val_fraction: Share of the problem space reserved for the held-out split.
            work: "columns" writes each operation column by column with its carries (`47+38: 7+8=15, 4+3+1=8,
                so 85`); "direct" writes one line per operation (`47+38=85`), which a tiny model learns from
                few examples only when the operands are single digits.
            seed: Seed of the problem generator; the same seed gives the same problems.
            alternatives: 1: each record also carries a second solution doing the operations in another valid
                order (the whole-solution micro-group's trace), where the problem has one; 0: one solution.
        """
        if num_operands < 2:
            raise ValueError(f"num_operands must be >= 2 to need any work, got {num_operands}")
        if not 1 <= digits <= 6:
            raise ValueError(f"digits must be in [1, 6], got {digits}")
        if not operations or set(operations) - set("+-"):
            raise ValueError(f"operations must be a non-empty string over '+-', got {operations!r}")
        if work not in WORK_STYLES:
            raise ValueError(f"work must be one of {WORK_STYLES}, got {work!r}")
        if not 0.0 < val_fraction < 1.0:
            raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
        if alternatives not in (0, EXPERT_TRACES - 1):
            raise ValueError(f"alternatives must be 0 or {EXPERT_TRACES - 1} (one extra solution), got {alternatives}")
        self.num_operands = num_operands
        self.digits = digits
        self.operations = operations
        self.val_fraction = val_fraction
        self.work = work
        self.seed = seed
        self.alternatives = alternatives

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
        solution, answer = _solve(operands, operators, self.work)
        solutions = (solution,)
        if self.alternatives and (order := alternative_order(operands, operators)) is not None:
            solutions += (_solve(*order, self.work)[0],)
        return MathRecord(problem=problem, solutions=solutions, answer=answer, source=f"synthetic:{split}:{index}")

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


def alternative_order(operands: list[int], operators: list[str]) -> tuple[list[int], list[str]] | None:
    """The same operations in another valid order (see the module docstring), or None where there is none."""
    terms = [("+", operands[0]), *zip(operators, operands[1:])]  # (sign, value); the first operand is added
    added, taken = [t for t in terms if t[0] == "+"], [t for t in terms if t[0] == "-"]
    order = added + taken
    if order == terms:  # already additions first: rotate one side (a rotation changes a list unless all are equal)
        if len(set(added)) > 1:
            order = added[1:] + added[:1] + taken
        elif len(set(taken)) > 1:
            order = added + taken[1:] + taken[:1]
        else:
            return None
    return [value for _, value in order], [sign for sign, _ in order[1:]]


def _expression(operands: list[int], operators: list[str]) -> str:
    parts = [str(operands[0])]
    for value, op in zip(operands[1:], operators):
        parts += [op, str(value)]
    return " ".join(parts)


def _solve(operands: list[int], operators: list[str], work: str = "columns") -> tuple[str, str]:
    """One paragraph of work per operation, then the boxed answer."""
    total, steps = operands[0], []
    for value, op in zip(operands[1:], operators):
        result = total + value if op == "+" else total - value
        if work == "direct":
            steps.append(f"{total}{op}{value}={result}")
        else:
            columns = _add_columns(total, value) if op == "+" else _subtract_columns(total, value)
            steps.append(f"{total}{op}{value}: {', '.join(columns)}, so {result}")
        total = result
    steps.append(f"\\boxed{{{total}}}")
    return "\n\n".join(steps), str(total)


def _digits(value: int, width: int) -> list[int]:
    """Least significant first, zero-padded to `width`."""
    return [(value // 10**i) % 10 for i in range(width)]


def _add_columns(a: int, b: int) -> list[str]:
    """`7+8=15`, then `4+3+1=8` with the carry; a final carry shows as the last column's two digits."""
    width = max(len(str(a)), len(str(b)))
    carry, columns = 0, []
    for x, y in zip(_digits(a, width), _digits(b, width)):
        total = x + y + carry
        columns.append(f"{x}+{y}" + ("+1" if carry else "") + f"={total}")
        carry = total // 10
    return columns


def _subtract_columns(a: int, b: int) -> list[str]:
    """`15-9=6` when the column borrows (its top digit shown plus 10), `8-1-1=6` when it pays one back."""
    width = len(str(a))
    borrow, columns = 0, []
    for x, y in zip(_digits(a, width), _digits(b, width)):
        top = x + 10 if x - borrow < y else x
        columns.append(f"{top}-{y}" + ("-1" if borrow else "") + f"={top - y - borrow}")
        borrow = 1 if top > x else 0
    return columns
