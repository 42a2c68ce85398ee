"""The embedded synthetic task: chained integer arithmetic, column work per paragraph, and a boxed answer.

Every solution paragraph and every column in it is re-checked with integer arithmetic parsed by a regex (never
`eval`), so the expert solutions the policy is trained on are right, and the prefix cut has real "\\n\\n"
boundaries to snap to.
"""

import re

import pytest

from trapo_lightning.data.sources import SyntheticSource
from trapo_lightning.data.synthetic import SyntheticArithmetic, alternative_order
from trapo_lightning.reward import MathVerifyReward, Verdict

PROBLEM = re.compile(r"^Compute (\d+(?: [+-] \d+)+)\.$")
STEP = re.compile(r"^(\d+)([+-])(\d+): (.+), so (\d+)$")
COLUMN = re.compile(r"^(\d+)([+-])(\d)(?:([+-])1)?=(\d+)$")
BOXED = re.compile(r"^\\boxed\{(\d+)\}$")


def rebuild_from_columns(work: str, op: str) -> int:
    """Check each column (`7+8=15`, `4+3+1=8`, `15-9=6`, `8-1-1=6`) and read the result off its digits."""
    digits, carry = [], 0
    for column in work.split(", "):
        match = COLUMN.match(column)
        assert match, column
        top, column_op, bottom, pay, result = match.groups()
        assert column_op == op and (pay is None or pay == op)
        value = int(top) + int(bottom) if op == "+" else int(top) - int(bottom)
        value += (1 if op == "+" else -1) * (pay is not None)
        assert int(result) == value and 0 <= value
        assert (pay is not None) == bool(carry)  # a carry/borrow is paid exactly where one was owed
        carry = value // 10 if op == "+" else int(int(top) >= 10)
        digits.append(value)
    *low, high = digits
    return int(str(high) + "".join(str(d % 10) for d in reversed(low)))


def check_record(record, task: SyntheticArithmetic) -> None:
    """Parse the problem and each solution line, and redo the arithmetic with ints."""
    expression = PROBLEM.match(record.problem)
    assert expression, record.problem
    tokens = expression.group(1).split(" ")
    operands, operators = [int(t) for t in tokens[::2]], tokens[1::2]
    assert len(operands) == task.num_operands
    assert all(0 <= value < 10**task.digits for value in operands)
    assert set(operators) <= set("+-")

    *steps, last = record.solution.split("\n\n")
    assert len(steps) == task.num_operands - 1
    total = operands[0]
    for line, value, op in zip(steps, operands[1:], operators):
        step = STEP.match(line)
        assert step, f"not 'a op b: columns, so c': {line!r}"  # \d+ also rules out a negative anywhere
        a, step_op, b, c = int(step.group(1)), step.group(2), int(step.group(3)), int(step.group(5))
        assert (a, step_op, b) == (total, op, value)  # the line continues from the previous result
        assert c == (a + b if step_op == "+" else a - b)
        assert c >= 0
        assert rebuild_from_columns(step.group(4), step_op) == c
        total = c
    boxed = BOXED.match(last)
    assert boxed, last
    assert record.solution.endswith(f"\\boxed{{{record.answer}}}")
    assert record.answer == boxed.group(1) == str(total)


@pytest.mark.parametrize(
    "kwargs",
    [
        {},
        {"num_operands": 2, "digits": 1},
        {"num_operands": 5, "digits": 3},
        {"operations": "+"},
        {"operations": "-", "num_operands": 4},
    ],
)
def test_every_step_is_correct_integer_arithmetic(kwargs):
    task = SyntheticArithmetic(**kwargs)
    for split in ("train", "val"):
        for record in task.records(split, 100):
            check_record(record, task)


def test_solution_layout():
    # seed 0, train, index 0 is "Compute 35 + 54 + 56.": 35 + 54 = 89, 89 + 56 = 145
    record = SyntheticArithmetic().record("train", 0)
    assert record.problem == "Compute 35 + 54 + 56."
    assert record.solution == "35+54: 5+4=9, 3+5=8, so 89\n\n89+56: 9+6=15, 8+5+1=14, so 145\n\n\\boxed{145}"
    assert record.answer == "145"
    assert record.source == "synthetic:train:0"


def test_subtraction_below_zero_becomes_addition():
    # operations "-" only: a "+" appears exactly where subtracting would have gone below zero
    task = SyntheticArithmetic(operations="-", num_operands=4)
    records = task.records("train", 200)
    plus_lines = 0
    for record in records:
        for line in record.solution.split("\n\n")[:-1]:
            a, op, b, _, _ = STEP.match(line).groups()
            if op == "+":
                plus_lines += 1
                assert int(b) > int(a)
            else:
                assert int(b) <= int(a)
    assert plus_lines > 0  # the rule was exercised


def test_deterministic_by_seed():
    first = SyntheticArithmetic(seed=3).records("train", 50)
    assert SyntheticArithmetic(seed=3).records("train", 50) == first
    assert SyntheticArithmetic(seed=3).record("train", 17) == first[17]  # a pure function of (seed, split, index)
    other = SyntheticArithmetic(seed=4).records("train", 50)
    assert [r.problem for r in other] != [r.problem for r in first]


def test_train_and_val_are_disjoint():
    task = SyntheticArithmetic()
    train = {r.problem for r in task.records("train", 2000)}
    val = {r.problem for r in task.records("val", 200)}
    assert len(val) > 150  # mostly distinct problems, so disjointness is not vacuous
    assert not train & val


def test_synthetic_source_sizes():
    source = SyntheticSource(SyntheticArithmetic(seed=1), train_size=7, val_size=3)
    train, skipped = source.load("train")
    val, _ = source.load("val")
    assert (len(train), len(val), skipped) == (7, 3, {})
    assert train == SyntheticArithmetic(seed=1).records("train", 7)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"num_operands": 1}, "num_operands"),
        ({"digits": 0}, "digits"),
        ({"digits": 7}, "digits"),
        ({"operations": ""}, "operations"),
        ({"operations": "+*"}, "operations"),
        ({"val_fraction": 0.0}, "val_fraction"),
        ({"val_fraction": 1.0}, "val_fraction"),
        ({"alternatives": 2}, "alternatives must be 0 or 1"),
        ({"alternatives": -1}, "alternatives must be 0 or 1"),
    ],
)
def test_argument_validation(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SyntheticArithmetic(**kwargs)


def test_unknown_split_and_empty_source():
    with pytest.raises(ValueError, match="split must be one of"):
        SyntheticArithmetic().record("test", 0)
    with pytest.raises(ValueError, match="train_size and val_size"):
        SyntheticSource(train_size=0)
    with pytest.raises(ValueError, match="train_size and val_size"):
        SyntheticSource(val_size=0)


DIRECT_STEP = re.compile(r"^(\d+)([+-])(\d+)=(\d+)$")


def test_direct_work_writes_one_checked_line_per_operation():
    # "direct": `4+6=10`, `10+7=17`, then `\boxed{17}`; each line continues from the previous result
    task = SyntheticArithmetic(digits=1, work="direct")
    for record in task.records("train", 200):
        *lines, last = record.solution.split("\n\n")
        operands = [int(t) for t in PROBLEM.match(record.problem).group(1).split(" ")[::2]]
        total = operands[0]
        for line, value in zip(lines, operands[1:]):
            a, op, b, c = DIRECT_STEP.match(line).groups()
            assert (int(a), int(b)) == (total, value)
            assert int(c) == (int(a) + int(b) if op == "+" else int(a) - int(b)) >= 0
            total = int(c)
        assert last == f"\\boxed{{{total}}}" and record.answer == str(total)


def test_unknown_work_style_is_rejected():
    with pytest.raises(ValueError, match="work must be one of"):
        SyntheticArithmetic(work="essay")


# -- alternatives: a second solution doing the same operations in another valid order --------------------------------
@pytest.mark.parametrize(
    "operands, operators, expected",
    [
        ([47, 19, 38], ["-", "+"], ([47, 38, 19], ["+", "-"])),  # additions first: 47 + 38 = 85, 85 - 19 = 66
        ([47, 38, 19], ["+", "-"], ([38, 47, 19], ["+", "-"])),  # already so: the additions rotated
        ([9, 2, 3], ["-", "-"], ([9, 3, 2], ["-", "-"])),  # one addition: the subtractions rotated
        ([5, 5, 1, 2], ["+", "-", "-"], ([5, 5, 2, 1], ["+", "-", "-"])),  # equal additions: the subtractions
        ([3, 3, 3], ["+", "+"], None),  # no other order
        ([9, 2, 2], ["-", "-"], None),
    ],
)
def test_alternative_order_by_hand(operands, operators, expected):
    assert alternative_order(operands, operators) == expected


def test_alternative_solution_layout():
    # "Compute 35 + 54 + 56." is written additions first, so the alternative rotates them: 54 + 56 = 110 (4+6=10,
    # carry, 5+5+1=11), then 110 + 35 = 145 (0+5=5, 1+3=4, 1+0=1)
    record = SyntheticArithmetic(alternatives=1).record("train", 0)
    assert record.solutions == (
        "35+54: 5+4=9, 3+5=8, so 89\n\n89+56: 9+6=15, 8+5+1=14, so 145\n\n\\boxed{145}",
        "54+56: 4+6=10, 5+5+1=11, so 110\n\n110+35: 0+5=5, 1+3=4, 1+0=1, so 145\n\n\\boxed{145}",
    )
    assert record.answer == "145"


def check_alternative(record, task: SyntheticArithmetic) -> None:
    """The second solution: the problem's signed terms in another order, each step checked column by column, never
    below zero, ending in the same boxed answer."""
    tokens = PROBLEM.match(record.problem).group(1).split(" ")
    terms = sorted([("+", int(tokens[0])), *zip(tokens[1::2], map(int, tokens[2::2]))])
    *steps, last = record.solutions[1].split("\n\n")
    total, used = None, []
    for line in steps:
        a, op, b, work, c = STEP.match(line).groups()
        assert total is None or int(a) == total  # continues from the previous result
        used += [("+", int(a))] if total is None else []
        used.append((op, int(b)))
        assert int(c) == (int(a) + int(b) if op == "+" else int(a) - int(b)) >= 0
        assert rebuild_from_columns(work, op) == int(c)
        total = int(c)
    assert sorted(used) == terms and record.solutions[1] != record.solutions[0]
    assert last == f"\\boxed{{{record.answer}}}" and str(total) == record.answer


@pytest.mark.parametrize("kwargs", [{}, {"num_operands": 5, "digits": 3}, {"operations": "-", "num_operands": 4}])
def test_alternatives_are_correct_other_orders_and_leave_the_primary_alone(kwargs):
    task = SyntheticArithmetic(alternatives=1, **kwargs)
    records = task.records("train", 200)
    assert [r.solution for r in records] == [r.solution for r in SyntheticArithmetic(**kwargs).records("train", 200)]
    assert task.records("train", 200) == records  # deterministic
    with_two = [r for r in records if len(r.solutions) == 2]
    assert len(with_two) > 150
    for record in records:
        check_record(record, task)
        if len(record.solutions) == 2:
            check_alternative(record, task)
        else:  # only a problem with no other order keeps one solution
            tokens = PROBLEM.match(record.problem).group(1).split(" ")
            assert alternative_order([int(t) for t in tokens[::2]], tokens[1::2]) is None


def test_math_verify_grades_every_alternative_correct():
    records = SyntheticArithmetic(alternatives=1, digits=1, work="direct").records("train", 50)
    alternatives = [r.solutions[1] for r in records if len(r.solutions) == 2]
    results = MathVerifyReward(isolate=False)(alternatives, [r.answer for r in records if len(r.solutions) == 2])
    assert len(results) > 40 and {r.verdict for r in results} == {Verdict.correct}


def test_the_embedded_tokenizer_writes_alternatives_as_it_writes_primaries(tiny_tokenizer):
    # the default config's task: an alternative is the same kind of text, one token per digit, sign and blank line,
    # as long as the primary give or take a digit, so within model.max_response_tokens (24) like every primary
    task = SyntheticArithmetic(num_operands=3, digits=1, work="direct", alternatives=1)
    record = task.record("train", 0)
    assert record.problem == "Compute 4 + 6 + 7."  # additions first already: rotated, 6 + 7 = 13, 13 + 4 = 17
    assert record.solutions[1] == "6+7=13\n\n13+4=17\n\n\\boxed{17}"
    ids = tiny_tokenizer(record.solutions[1], add_special_tokens=False)["input_ids"]
    pieces = [tiny_tokenizer.decode([i]) for i in ids]
    assert pieces == [*"6+7=13", "\n\n", *"13+4=17", "\n\n", "\\boxed", "{", "1", "7", "}"]
    for record in task.records("train", 500):
        lengths = [len(tiny_tokenizer(s, add_special_tokens=False)["input_ids"]) for s in record.solutions]
        assert max(lengths) + 1 <= 24 and max(lengths) - min(lengths) <= 2
