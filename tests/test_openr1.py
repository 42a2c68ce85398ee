"""The OpenR1-Math layout: the expert traces are the <think> text of the first two generations marked correct.

Rows are written in OpenR1-Math-220k's columns (problem, answer, generations, correctness_math_verify) to real
.jsonl, .parquet and `save_to_disk` files and read back through `OpenR1MathSource`; a bad row must name where it is
and the field, or be a counted skip, as in every other source.
"""

from collections import Counter

import pytest

from trapo_lightning.data.openr1 import OpenR1Fields, OpenR1MathSource, openr1_record
from trapo_lightning.data.records import MathRecord
from trapo_lightning.data.sources import InvalidRecord
from trapo_lightning.reward import MathVerifyReward, Verdict

R1_WRONG = "<think>\n7 + 5 = 13\n</think>\n\nThe answer is \\boxed{13}."
R1_RIGHT = "<think>\nFirst, 7 + 5 = 12.\n\nCheck: 12 - 5 = 7.\n</think>\n\nSo 7 + 5 = \\boxed{12}."
R1_ALSO_RIGHT = "<think>\n7 + 5 is 12.\n</think>\n\n\\boxed{12}"
# the trace of R1_RIGHT, with the reference answer appended because the thinking itself boxes nothing
TRACE = "First, 7 + 5 = 12.\n\nCheck: 12 - 5 = 7.\n\n\\boxed{12}"
R1_WRONG_TRACE = "7 + 5 = 13\n\n\\boxed{12}"  # marked correct in some tests: marks are trusted, not re-graded
ALSO_TRACE = "7 + 5 is 12.\n\n\\boxed{12}"  # R1_ALSO_RIGHT's, the same way


def openr1_row(**overrides) -> dict:
    row = {
        "problem": "Compute 7 + 5.",
        "solution": "A human solution, not R1's.",
        "answer": "12",
        "generations": [R1_WRONG, R1_RIGHT, R1_ALSO_RIGHT],
        "correctness_math_verify": [False, True, True],
    }
    return row | overrides


def record_of(row, **kwargs) -> MathRecord:
    return openr1_record(row, "x.parquet:row 0", OpenR1Fields(), need_solution=True, **kwargs)


def test_the_traces_are_the_thinking_of_the_first_two_correct_generations_plus_the_answer():
    expected = MathRecord("Compute 7 + 5.", (TRACE, ALSO_TRACE), "12", source="x.parquet:row 0")
    assert record_of(openr1_row()) == expected
    assert record_of(openr1_row(), traces=1) == MathRecord("Compute 7 + 5.", (TRACE,), "12", source="x.parquet:row 0")


@pytest.mark.parametrize(
    "marks, expected",
    [
        ([False, True, False], (TRACE,)),  # one correct: one solution, as before
        ([True, None, True], (R1_WRONG_TRACE, ALSO_TRACE)),  # None is no mark: the first two True ones
        ([True, True, True], (R1_WRONG_TRACE, TRACE)),  # a third correct one is not used
    ],
)
def test_one_solution_per_correct_generation_up_to_two(marks, expected):
    assert record_of(openr1_row(correctness_math_verify=marks)).solutions == expected


def test_every_trace_verifies_against_the_answer():
    record = record_of(openr1_row())
    results = MathVerifyReward(isolate=False)(list(record.solutions), [record.answer] * 2)
    assert [r.verdict for r in results] == [Verdict.correct] * 2


@pytest.mark.parametrize("traces", [0, 3])
def test_expert_traces_is_one_or_two(traces):
    with pytest.raises(ValueError, match="expert_traces must be 1 or 2"):
        OpenR1MathSource(expert_traces=traces)


def test_a_trace_that_boxes_its_answer_is_kept_as_it_is():
    boxed = "<think>\n7 + 5 = 12, so \\boxed{12}\n</think>\n\nDone: \\boxed{12}"
    record = record_of(openr1_row(generations=[boxed], correctness_math_verify=[True]))
    assert record.solution == "7 + 5 = 12, so \\boxed{12}"


def test_a_missing_opening_tag_is_tolerated_and_none_is_not_a_mark():
    # None marks a generation the llama judge graded instead of math-verify: not a correctness mark
    untagged = "7 + 5 = 12.\n</think>\n\n\\boxed{12}"
    row = openr1_row(generations=[R1_RIGHT, untagged], correctness_math_verify=[None, True])
    assert record_of(row).solution == "7 + 5 = 12.\n\n\\boxed{12}"


def test_the_full_trace_verifies_against_the_answer():
    # a rollout guided by the whole trace (prefix ratio 1) must earn its reward: the appended \boxed is graded
    record = record_of(openr1_row(answer="\\frac{1}{2}", generations=["<think>\nHalf of one.\n</think> \\boxed{0.5}"],
                                  correctness_math_verify=[True]))
    assert record.solution == "Half of one.\n\n\\boxed{\\frac{1}{2}}"
    (result,) = MathVerifyReward()([record.solution], [record.answer])
    assert result.verdict is Verdict.correct


def test_without_append_answer_an_unboxed_trace_is_malformed():
    with pytest.raises(InvalidRecord, match=r"^x\.parquet:row 0: .* has no \\boxed\{\} answer") as raised:
        record_of(openr1_row(), append_answer=False)
    assert raised.value.reason == "trace_without_boxed"


def test_without_append_answer_an_unboxed_second_trace_is_malformed():
    boxed = "<think>\n7 + 5 = 12, so \\boxed{12}\n</think>\n\n\\boxed{12}"
    row = openr1_row(generations=[boxed, R1_ALSO_RIGHT], correctness_math_verify=[True, True])
    with pytest.raises(InvalidRecord, match=r"the reasoning of the second correct generation has no \\boxed\{\}"):
        record_of(row, append_answer=False)
    assert record_of(row, append_answer=False, traces=1).solutions == ("7 + 5 = 12, so \\boxed{12}",)


# (row overrides, skip reason, text the message must contain besides the place)
BAD_ROWS = [
    (dict(correctness_math_verify=[False, False, None]), "no_correct_generation",
     "no generation in 'generations' is marked True in 'correctness_math_verify'"),
    (dict(correctness_math_verify=[True]), "correctness_length_mismatch",
     "'correctness_math_verify' has 1 marks for 3 generations"),
    (dict(generations=["no thinking at all \\boxed{12}"], correctness_math_verify=[True]), "unclosed_think",
     "has no </think>"),
    (dict(generations=["<think> \n </think> \\boxed{12}"], correctness_math_verify=[True]), "empty_trace",
     "nothing inside <think></think>"),
    (dict(generations="<think>x</think>"), "non_list_generations", "field 'generations' must be a list, got str"),
    (dict(generations=[None, 3], correctness_math_verify=[False, True]), "non_string_generation",
     "field 'generations'[1] must be a string, got int"),
    # a malformed second trace makes the row malformed as a first one would, naming which it is
    (dict(generations=[R1_RIGHT, "no thinking \\boxed{12}"], correctness_math_verify=[True, True]), "unclosed_think",
     "the second correct generation in 'generations' has no </think>"),
    (dict(generations=[R1_RIGHT, "<think></think>"], correctness_math_verify=[True, True]), "empty_trace",
     "the second correct generation in 'generations' has nothing inside"),
    (dict(generations=[R1_RIGHT, None, 3], correctness_math_verify=[True, None, True]), "non_string_generation",
     "field 'generations'[2] must be a string, got int"),
    (dict(answer=""), "empty_answer", "field 'answer' is empty"),
    (dict(problem=None), "non_string_problem", "field 'problem' must be a string"),
    (dict(answer="\\frac{1}{"), "unparseable_answer", "field 'answer' is \"\\frac{1}{\": math-verify cannot parse it"),
    (dict(answer="see the solution"), "unparseable_answer", "'answer' is \"see the solution\": it reads as prose"),
]


@pytest.mark.parametrize("overrides, reason, mentions", BAD_ROWS)
def test_a_bad_row_names_the_place_and_the_field(write_jsonl, overrides, reason, mentions):
    path = write_jsonl("openr1.jsonl", [openr1_row(), openr1_row(**overrides)])
    with pytest.raises(InvalidRecord, match=r"openr1\.jsonl:2: ") as raised:
        OpenR1MathSource([path]).load("train")
    assert mentions in str(raised.value)
    assert raised.value.reason == reason


def test_missing_columns_name_the_mapped_field(write_jsonl):
    row = openr1_row()
    del row["correctness_math_verify"]
    path = write_jsonl("openr1.jsonl", [row])
    message = r"openr1\.jsonl:1: field 'correctness_math_verify' \(the correctness field\) is missing"
    with pytest.raises(InvalidRecord, match=message) as raised:
        OpenR1MathSource([path]).load("train")
    assert raised.value.reason == "missing_correctness"
    fields = OpenR1Fields(problem="question", generations="r1_traces", correctness="verified")
    mapped = {"question": "Compute 7 + 5.", "answer": "12", "r1_traces": [R1_RIGHT]}
    path = write_jsonl("mapped.jsonl", [mapped])
    with pytest.raises(InvalidRecord, match=r"field 'verified' \(the correctness field\) is missing"):
        OpenR1MathSource([path], fields=fields).load("train")
    mapped["verified"] = [True]
    path = write_jsonl("mapped.jsonl", [mapped])
    assert OpenR1MathSource([path], fields=fields).load("train")[0][0].solution == TRACE


def test_skip_invalid_counts_per_reason_and_keeps_good_rows(write_jsonl):
    rows = [openr1_row(problem="A")] + [openr1_row(**overrides) for overrides, _, _ in BAD_ROWS]
    rows += ["{not json", openr1_row(problem="B")]
    path = write_jsonl("openr1.jsonl", rows)
    records, skipped = OpenR1MathSource([path], skip_invalid=True).load("train")
    assert [(r.problem, r.solution) for r in records] == [("A", TRACE), ("B", TRACE)]
    assert [r.source for r in records] == [f"{path}:1", f"{path}:{len(BAD_ROWS) + 3}"]
    reasons = Counter(reason for _, reason, _ in BAD_ROWS)
    assert skipped == reasons + Counter(undecodable=1)


def test_validation_rows_need_problem_and_answer_only(write_jsonl):
    path = write_jsonl("bench.jsonl", [{"problem": "Compute 7 + 5.", "answer": "12"}])
    records, _ = OpenR1MathSource(val_files=[path]).load("val")
    assert records == [MathRecord("Compute 7 + 5.", (), "12", source=f"{path}:1")]
    bad = write_jsonl("bad_bench.jsonl", [{"problem": "Compute 7 + 5.", "answer": "\\frac{1}{"}])
    with pytest.raises(InvalidRecord, match=r"bad_bench\.jsonl:1: field 'answer' is") as raised:
        OpenR1MathSource(val_files=[bad]).load("val")  # a benchmark's answers are checked too
    assert raised.value.reason == "unparseable_answer"


def test_parquet_and_save_to_disk_read_the_same_records(tmp_path, write_jsonl):
    pyarrow = pytest.importorskip("pyarrow")
    datasets = pytest.importorskip("datasets")
    import pyarrow.parquet as pq

    rows = [openr1_row(problem=f"Compute {i} + 5.") for i in range(3)]
    rows[1] = openr1_row(problem="Compute 1 + 5.", correctness_math_verify=[False, False, False])
    parquet = tmp_path / "openr1.parquet"
    pq.write_table(pyarrow.Table.from_pylist(rows), parquet)
    folder = tmp_path / "openr1_disk"
    datasets.Dataset.from_list(rows).save_to_disk(str(folder))
    jsonl = write_jsonl("openr1.jsonl", rows)
    loaded = {}
    for name, path in (("jsonl", jsonl), ("parquet", str(parquet)), ("disk", str(folder))):
        records, skipped = OpenR1MathSource([path], skip_invalid=True).load("train")
        assert skipped == Counter(no_correct_generation=1)
        loaded[name] = [(r.problem, r.solutions, r.answer) for r in records]
        assert [r.source for r in records][1].endswith(":3" if name == "jsonl" else ":row 2")
    assert loaded["jsonl"] == loaded["parquet"] == loaded["disk"]
    both = (TRACE, ALSO_TRACE)
    assert loaded["jsonl"] == [("Compute 0 + 5.", both, "12"), ("Compute 2 + 5.", both, "12")]
    records, _ = OpenR1MathSource([str(parquet)], skip_invalid=True, expert_traces=1).load("train")
    assert [r.solutions for r in records] == [(TRACE,), (TRACE,)]
    with pytest.raises(InvalidRecord, match=r"openr1\.parquet:row 1: no generation in 'generations'"):
        OpenR1MathSource([str(parquet)]).load("train")


def test_an_unknown_file_kind_is_refused(tmp_path):
    path = tmp_path / "openr1.csv"
    path.write_text("problem,answer\n")
    with pytest.raises(ValueError, match=r"openr1\.csv: expected a \.jsonl or \.parquet file"):
        OpenR1MathSource([str(path)]).load("train")
