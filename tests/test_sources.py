"""Data sources: a malformed row names where it is (`file:line`, `file:row i`) and the field, or is skipped and
counted per reason.

A bad row must never become an empty prompt or a silently zero reward later on, so each failure mode is written
to a real file and read back through `JsonlSource` (and `parse_row` for the single-row contract); Parquet and
Hugging Face datasets (skipped without the `data` extra) must keep the same contract.
"""

import re
import sys
from collections import Counter

import pytest

from trapo_lightning.data.answers import AnswerCheck, prose_problem
from trapo_lightning.data.records import MathRecord
from trapo_lightning.data.sources import (
    FieldMap,
    HFDatasetSource,
    InvalidRecord,
    JsonlSource,
    ParquetSource,
    parse_row,
)
from trapo_lightning.reward import MathVerifyReward

GOOD = {"problem": "Compute 1 + 2.", "solution": "1 + 2 = 3\n\n\\boxed{3}", "answer": "3"}

# (bad row, skip reason, text the message must contain besides file:line)
BAD_ROWS = [
    ({"problem": "Compute 1 + 2.", "solution": "1 + 2 = 3"}, "missing_answer", "'answer'"),
    ({"problem": "Compute 1 + 2.", "solution": "", "answer": "3"}, "empty_solution", "'solution'"),
    ({"problem": "Compute 1 + 2.", "solution": " \n\n ", "answer": "3"}, "empty_solution", "'solution'"),
    ({"problem": "Compute 1 + 2.", "solution": "1 + 2 = 3", "answer": 42}, "non_string_answer", "'answer'"),
    ({"problem": None, "solution": "1 + 2 = 3", "answer": "3"}, "non_string_problem", "'problem'"),
    ('{"problem": "Compute 1 + 2.", "answer": ', "undecodable", "not a valid UTF-8 JSON line"),
    (b'{"problem": "Compute \xff", "solution": "x", "answer": "3"}', "undecodable", "not a valid UTF-8 JSON line"),
    ("[1, 2, 3]", "not_an_object", "expected a JSON object"),
]


@pytest.mark.parametrize("bad, reason, mentions", BAD_ROWS)
def test_bad_row_names_file_line_and_field(write_jsonl, bad, reason, mentions):
    path = write_jsonl("train.jsonl", [GOOD, bad, GOOD])
    with pytest.raises(InvalidRecord, match=r"train\.jsonl:2: ") as raised:
        JsonlSource([path]).load("train")
    assert mentions in str(raised.value)
    assert raised.value.reason == reason
    assert isinstance(raised.value, ValueError)


def test_skip_invalid_counts_per_reason_and_keeps_valid_rows(write_jsonl):
    good_rows = [dict(GOOD, problem=f"Compute {i} + 2.") for i in range(3)]
    rows = [good_rows[0], *(bad for bad, _, _ in BAD_ROWS), good_rows[1], good_rows[2]]
    path = write_jsonl("train.jsonl", rows)
    records, skipped = JsonlSource([path], skip_invalid=True).load("train")
    assert [r.problem for r in records] == [r["problem"] for r in good_rows]
    assert skipped == Counter(
        missing_answer=1, empty_solution=2, non_string_answer=1, non_string_problem=1, undecodable=2, not_an_object=1
    )
    # the good rows sit on lines 1, 10 and 11 (eight bad rows between)
    assert [r.source for r in records] == [f"{path}:1", f"{path}:10", f"{path}:11"]


def test_a_solution_without_boxed_answer_is_malformed_when_required(write_jsonl):
    unboxed = dict(GOOD, solution="1 + 2 = 3, so the answer is 3")
    path = write_jsonl("train.jsonl", [GOOD, unboxed])
    assert len(JsonlSource([path]).load("train")[0]) == 2  # not required by default
    with pytest.raises(InvalidRecord, match=r"train\.jsonl:2: field 'solution' has no \\boxed") as raised:
        JsonlSource([path], require_boxed_solution=True).load("train")
    assert raised.value.reason == "solution_without_boxed"
    records, skipped = JsonlSource([path], require_boxed_solution=True, skip_invalid=True).load("train")
    assert len(records) == 1 and skipped == Counter(solution_without_boxed=1)


def test_field_mapping(write_jsonl):
    row = {"question": "Compute 4 - 1.", "reasoning": "4 - 1 = 3\n\n\\boxed{3}", "final": "3", "extra": 1}
    path = write_jsonl("mapped.jsonl", [row])
    fields = FieldMap(problem="question", solution="reasoning", answer="final")
    records, skipped = JsonlSource([path], fields=fields).load("train")
    assert records == [MathRecord("Compute 4 - 1.", ("4 - 1 = 3\n\n\\boxed{3}",), "3", source=f"{path}:1")]
    assert not skipped


def test_mapped_field_error_names_both_keys(write_jsonl):
    path = write_jsonl("mapped.jsonl", [{"question": "Compute 4 - 1.", "reasoning": "4 - 1 = 3", "answer": "3"}])
    fields = FieldMap(problem="question", solution="reasoning", answer="final")
    with pytest.raises(InvalidRecord, match=r"mapped\.jsonl:1: field 'final' \(the answer field\) is missing"):
        JsonlSource([path], fields=fields).load("train")


def test_blank_lines_are_ignored_but_line_numbers_kept(write_jsonl):
    path = write_jsonl("train.jsonl", [GOOD, "", "   ", dict(GOOD, answer=7)])
    with pytest.raises(InvalidRecord, match=r"train\.jsonl:4: "):
        JsonlSource([path]).load("train")
    path = write_jsonl("train.jsonl", ["", GOOD, "\t", GOOD, ""])
    records, skipped = JsonlSource([path]).load("train")
    assert [r.source for r in records] == [f"{path}:2", f"{path}:4"]
    assert not skipped


def test_several_files_in_order(write_jsonl):
    first = write_jsonl("a.jsonl", [dict(GOOD, problem="A")])
    second = write_jsonl("b.jsonl", [dict(GOOD, problem="B"), dict(GOOD, problem="C")])
    records, _ = JsonlSource([first, second]).load("train")
    assert [r.problem for r in records] == ["A", "B", "C"]


def test_missing_file(tmp_path):
    missing = tmp_path / "nope.jsonl"
    with pytest.raises(FileNotFoundError, match=re.escape(str(missing))):
        JsonlSource([str(missing)]).load("train")


def test_val_rows_need_no_solution(write_jsonl):
    train = write_jsonl("train.jsonl", [GOOD])
    val = write_jsonl("val.jsonl", [{"problem": "Compute 5 + 5.", "answer": "10"}])
    source = JsonlSource([train], val_files=[val])
    records, skipped = source.load("val")
    assert [(r.problem, r.answer) for r in records] == [("Compute 5 + 5.", "10")]
    assert not skipped
    # the same row is not a training row: training needs the expert solution
    with pytest.raises(InvalidRecord, match=r"val\.jsonl:1: field 'solution' is missing"):
        JsonlSource([val]).load("train")
    # a val row still needs its answer, the verifier's key
    bad_val = write_jsonl("bad_val.jsonl", [{"problem": "Compute 5 + 5."}])
    with pytest.raises(InvalidRecord, match=r"bad_val\.jsonl:1: field 'answer' is missing"):
        JsonlSource([train], val_files=[bad_val]).load("val")


def test_parse_row_directly():
    raw = b'{"problem": "p", "solution": "s", "answer": "a"}'
    assert parse_row(raw, "x.jsonl:3", FieldMap(), need_solution=True) == MathRecord("p", ("s",), "a", "x.jsonl:3")
    with pytest.raises(InvalidRecord, match=r"^x\.jsonl:3: field 'answer' must be a string, got int 42$"):
        parse_row(b'{"problem": "p", "solution": "s", "answer": 42}', "x.jsonl:3", FieldMap(), need_solution=True)


# -- several expert solutions: a `solutions` list instead of one `solution` -------------------------------------------
SECOND = "2 + 1 = 3\n\n\\boxed{3}"
LISTED = {"problem": "Compute 1 + 2.", "solutions": [GOOD["solution"], SECOND], "answer": "3"}

# (bad row, skip reason, text the message must contain besides file:line)
BAD_LISTS = [
    (dict(LISTED, solutions=GOOD["solution"]), "non_list_solutions",
     "field 'solutions' must be a list of strings, got str"),
    (dict(LISTED, solutions=[]), "empty_solutions", "field 'solutions' is an empty list"),
    (dict(LISTED, solutions=[GOOD["solution"], 3]), "non_string_solutions",
     "field 'solutions'[1] must be a string, got int 3"),
    (dict(LISTED, solutions=[GOOD["solution"], " \n "]), "empty_solutions", "field 'solutions'[1] is empty"),
    (dict(LISTED, solution=GOOD["solution"]), "ambiguous_solutions",
     "the row has both 'solution' and 'solutions'; give one, or map the other away"),
    ({"problem": "Compute 1 + 2.", "answer": "3"}, "missing_solution",
     "field 'solution' is missing (or 'solutions', a list of them)"),
]


def test_a_solutions_list_gives_every_solution_in_order(write_jsonl):
    three = dict(LISTED, solutions=[*LISTED["solutions"], "3 = 3\n\n\\boxed{3}"])
    path = write_jsonl("train.jsonl", [GOOD, LISTED, three, dict(LISTED, solutions=[SECOND])])
    records, skipped = JsonlSource([path]).load("train")
    assert [r.solutions for r in records] == [
        (GOOD["solution"],), (GOOD["solution"], SECOND), (GOOD["solution"], SECOND, "3 = 3\n\n\\boxed{3}"), (SECOND,)
    ]
    assert records[1] == MathRecord("Compute 1 + 2.", (GOOD["solution"], SECOND), "3", f"{path}:2")
    assert records[1].solution == GOOD["solution"]  # the primary
    assert not skipped
    # a null list is an absent one: a table with both columns fills one per row
    records, _ = JsonlSource([write_jsonl("nulls.jsonl", [dict(GOOD, solutions=None)])]).load("train")
    assert records[0].solutions == (GOOD["solution"],)


@pytest.mark.parametrize("bad, reason, mentions", BAD_LISTS)
def test_a_bad_solutions_list_names_file_line_and_field(write_jsonl, bad, reason, mentions):
    path = write_jsonl("train.jsonl", [LISTED, bad, LISTED])
    with pytest.raises(InvalidRecord, match=r"train\.jsonl:2: ") as raised:
        JsonlSource([path]).load("train")
    assert mentions in str(raised.value)
    assert raised.value.reason == reason
    records, skipped = JsonlSource([path], skip_invalid=True).load("train")
    assert [r.source for r in records] == [f"{path}:1", f"{path}:3"] and skipped == Counter({reason: 1})


def test_mapped_solutions_and_mapping_one_field_away(write_jsonl):
    def load(name, rows, fields=None):
        return JsonlSource([write_jsonl(name, rows)], fields=fields).load("train")[0]

    row = {"question": "Compute 1 + 2.", "solution": "a human's", "traces": [SECOND], "final": "3"}
    fields = FieldMap(problem="question", solution=None, solutions="traces", answer="final")
    assert load("mapped.jsonl", [row], fields)[0].solutions == (SECOND,)  # 'solution' is mapped away, not read
    without = {key: value for key, value in row.items() if key != "traces"}
    with pytest.raises(InvalidRecord, match=r"field 'traces' \(the solutions field\) is missing") as raised:
        load("none.jsonl", [without], fields)
    assert raised.value.reason == "missing_solutions"
    both = dict(LISTED, solution="x")
    with pytest.raises(InvalidRecord, match="both 'solution' and 'solutions'"):
        load("both.jsonl", [both])
    assert load("both.jsonl", [both], FieldMap(solutions=None))[0].solutions == ("x",)  # the list is not read
    with pytest.raises(ValueError, match="map `solution` or `solutions`"):
        FieldMap(solution=None, solutions=None)


def test_every_listed_solution_needs_its_boxed_answer_when_required(write_jsonl):
    path = write_jsonl("train.jsonl", [LISTED, dict(LISTED, solutions=[GOOD["solution"], "2 + 1 is 3"])])
    with pytest.raises(InvalidRecord, match=r"train\.jsonl:2: field 'solutions'\[1\] has no \\boxed") as raised:
        JsonlSource([path], require_boxed_solution=True).load("train")
    assert raised.value.reason == "solution_without_boxed"


# -- Parquet and Hugging Face datasets: the same contract, rows named `file:row i` ----------------------------------
def parquet_file(path, rows):
    pyarrow = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    pq.write_table(pyarrow.Table.from_pylist(rows), path)
    return str(path)


def disk_folder(path, rows):
    datasets = pytest.importorskip("datasets")
    datasets.Dataset.from_list(rows).save_to_disk(str(path))
    return str(path)


def write_format(kind, tmp_path, write_jsonl, rows):
    """`rows` in one of the formats; returns (source class, its extra arguments, the file, where row 2 is)."""
    if kind == "jsonl":
        path = write_jsonl("rows.jsonl", rows)
        return JsonlSource, {}, path, f"{path}:2"
    if kind == "parquet":
        path = parquet_file(tmp_path / "rows.parquet", rows)
        return ParquetSource, {}, path, f"{path}:row 1"
    if kind == "disk":
        path = disk_folder(tmp_path / "rows_disk", rows)
        return HFDatasetSource, {}, path, f"{path}:row 1"
    pytest.importorskip("datasets")
    builder, path = kind.split("-")[1], parquet_file(tmp_path / "rows.parquet", rows)
    if builder == "json":
        path = write_jsonl("rows.jsonl", rows)
    return HFDatasetSource, {"builder": builder}, path, f"{path}:row 1"


FORMATS = ["jsonl", "parquet", "disk", "stream-json", "stream-parquet"]
# bad rows every format can hold (a table column has one type; a value can be null or empty)
TABLE_BAD_ROWS = [
    (dict(GOOD, solution=""), "empty_solution", "field 'solution' is empty"),
    (dict(GOOD, problem=None), "non_string_problem", "field 'problem' must be a string, got NoneType None"),
    (dict(GOOD, answer="  "), "empty_answer", "field 'answer' is empty"),
]


@pytest.mark.parametrize("kind", FORMATS)
@pytest.mark.parametrize("bad, reason, mentions", TABLE_BAD_ROWS)
def test_every_format_names_the_bad_row_and_field(kind, tmp_path, write_jsonl, bad, reason, mentions):
    source_class, extra, path, where = write_format(kind, tmp_path, write_jsonl, [GOOD, bad, GOOD])
    with pytest.raises(InvalidRecord) as raised:
        source_class([path], **extra).load("train")
    assert str(raised.value) == f"{where}: {mentions}"
    assert raised.value.reason == reason
    records, skipped = source_class([path], skip_invalid=True, **extra).load("train")
    assert len(records) == 2 and skipped == Counter({reason: 1})


@pytest.mark.parametrize("kind", FORMATS)
def test_every_format_reads_mapped_columns_in_order(kind, tmp_path, write_jsonl):
    rows = [{"question": f"Compute {i} - 1.", "reasoning": f"{i} - 1\n\n\\boxed{{{i - 1}}}", "final": str(i - 1)}
            for i in range(1, 4)]
    source_class, extra, path, _ = write_format(kind, tmp_path, write_jsonl, rows)
    fields = FieldMap(problem="question", solution="reasoning", answer="final")
    records, skipped = source_class([path], fields=fields, **extra).load("train")
    assert [(r.problem, r.solution, r.answer) for r in records] == [tuple(row.values()) for row in rows]
    assert not skipped
    # the validation split of the same files needs no solution column mapping
    val, _ = source_class(val_files=[path], fields=FieldMap(problem="question", answer="final"), **extra).load("val")
    assert [(r.problem, r.solution) for r in val] == [(row["question"], "") for row in rows]


@pytest.mark.parametrize("kind", FORMATS)
def test_every_format_reads_solution_lists_beside_single_solutions(kind, tmp_path, write_jsonl):
    # one table with both columns, each row filling one (the other null), as a merged dataset would
    rows = [dict(GOOD, solutions=None), dict(LISTED, solution=None), dict(LISTED, solution=None, solutions=[SECOND])]
    source_class, extra, path, where = write_format(kind, tmp_path, write_jsonl, rows)
    records, skipped = source_class([path], **extra).load("train")
    assert [r.solutions for r in records] == [(GOOD["solution"],), (GOOD["solution"], SECOND), (SECOND,)]
    assert not skipped
    _, _, path, where = write_format(kind, tmp_path, write_jsonl, [rows[1], dict(LISTED, solution=None, solutions=[])])
    with pytest.raises(InvalidRecord) as raised:
        source_class([path], **extra).load("train")
    assert str(raised.value) == f"{where}: field 'solutions' is an empty list"


def test_a_missing_column_fails_on_the_first_row_naming_the_mapping(tmp_path):
    path = parquet_file(tmp_path / "no_answer.parquet", [{"problem": "Compute 1 + 2.", "solution": "3"}])
    with pytest.raises(InvalidRecord, match=r"no_answer\.parquet:row 0: field 'answer' is missing; map it"):
        ParquetSource([path]).load("train")


def test_table_values_are_not_coerced_to_strings(tmp_path):
    # an integer answer column is a wrong type, as in JSONL: convert it in the file rather than guess here
    path = parquet_file(tmp_path / "ints.parquet", [dict(GOOD, answer=3)])
    with pytest.raises(InvalidRecord, match=r"ints\.parquet:row 0: field 'answer' must be a string, got int 3"):
        ParquetSource([path]).load("train")


def test_a_dataset_dict_folder_asks_for_one_split(tmp_path):
    datasets = pytest.importorskip("datasets")
    folder = tmp_path / "dict"
    datasets.DatasetDict({"test": datasets.Dataset.from_list([GOOD])}).save_to_disk(str(folder))
    with pytest.raises(ValueError, match=r"DatasetDict with splits \['test'\]; give the folder of one split, e\.g\. "):
        HFDatasetSource([str(folder)]).load("train")
    records, _ = HFDatasetSource([str(folder / "test")]).load("train")
    assert records[0].source == f"{folder / 'test'}:row 0"


def test_missing_tables_and_folders_name_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"nope\.parquet does not exist"):
        ParquetSource([str(tmp_path / "nope.parquet")]).load("train")
    with pytest.raises(FileNotFoundError, match=r"dataset folder .*nope does not exist; give a folder written by"):
        HFDatasetSource([str(tmp_path / "nope")]).load("train")


def test_without_the_extra_the_error_names_it(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)  # as if pyarrow were not installed
    path = tmp_path / "rows.parquet"
    path.write_bytes(b"PAR1")
    needs_extra = r"reading Parquet files needs `pyarrow`.*pip install 'trapo-lightning\[data\]'"
    with pytest.raises(ImportError, match=needs_extra):
        ParquetSource([str(path)]).load("train")
    monkeypatch.setitem(sys.modules, "datasets", None)
    with pytest.raises(ImportError, match=r"needs `datasets`, which is in the optional `data` extra"):
        HFDatasetSource([str(tmp_path)]).load("train")
    with pytest.raises(ImportError, match=r"needs `datasets`"):
        HFDatasetSource([str(path)], builder="parquet").load("train")


# -- reference answers: parsed at load as the reward will parse them (issue 15) ----------------------------------------
# (answer, text the message must contain): each one no completion could ever be graded against
BAD_ANSWERS = [
    ("\\frac{1}{", "math-verify cannot parse it or finds no expression in it"),
    ("see the solution", "it reads as prose ('see the')"),
    ("@@", "math-verify cannot parse it or finds no expression in it"),
]


@pytest.mark.parametrize("answer, mentions", BAD_ANSWERS)
def test_an_answer_the_reward_cannot_grade_names_file_and_line(write_jsonl, answer, mentions):
    path = write_jsonl("train.jsonl", [GOOD, dict(GOOD, answer=answer), GOOD])
    with pytest.raises(InvalidRecord) as raised:
        JsonlSource([path]).load("train")
    assert str(raised.value).startswith(f'{path}:2: field \'answer\' is "{answer}": {mentions}')
    assert raised.value.reason == "unparseable_answer"


@pytest.mark.parametrize("answer", ["\\frac{1}{", "@@"])
def test_the_load_check_refuses_what_the_reward_would_raise_on_minutes_into_a_run(answer):
    assert AnswerCheck().problem(answer).startswith("math-verify cannot parse it")
    with pytest.raises(ValueError, match="math-verify cannot parse the reference answer"):
        MathVerifyReward(isolate=False).score("\\boxed{3}", answer)


def test_bad_answers_are_counted_with_skip_invalid_in_both_splits(write_jsonl):
    rows = [GOOD, *(dict(GOOD, answer=answer) for answer, _ in BAD_ANSWERS), dict(GOOD, answer="\\frac{1}{2}")]
    path = write_jsonl("rows.jsonl", rows)
    for split, source in (("train", JsonlSource([path], skip_invalid=True)),
                          ("val", JsonlSource(val_files=[path], skip_invalid=True))):
        records, skipped = source.load(split)
        assert [r.answer for r in records] == ["3", "\\frac{1}{2}"]
        assert skipped == Counter(unparseable_answer=3)
    with pytest.raises(InvalidRecord, match=r"rows\.jsonl:2: field 'answer' is"):
        JsonlSource(val_files=[path]).load("val")  # a benchmark's answers are checked too


def test_a_mapped_answer_field_is_named_in_the_message(write_jsonl):
    path = write_jsonl("mapped.jsonl", [{"problem": "p", "final": "see the solution"}])
    with pytest.raises(InvalidRecord, match=r"mapped\.jsonl:1: field 'final' \(the answer field\) is \"see the"):
        JsonlSource(val_files=[path], fields=FieldMap(answer="final")).load("val")


@pytest.mark.parametrize("kind", FORMATS)
def test_every_format_checks_the_answers(kind, tmp_path, write_jsonl):
    rows = [GOOD, dict(GOOD, answer="\\frac{1}{")]
    source_class, extra, path, where = write_format(kind, tmp_path, write_jsonl, rows)
    with pytest.raises(InvalidRecord) as raised:
        source_class([path], **extra).load("train")
    assert str(raised.value).startswith(f"{where}: field 'answer' is \"\\frac{{1}}{{\": math-verify cannot parse it")
    assert source_class([path], skip_invalid=True, **extra).load("train")[1] == Counter(unparseable_answer=1)


@pytest.mark.parametrize("answer", [
    "12", "\\frac{1}{2}", "(1, 2)", "x^2 + 1", "Yes", "odd", "AB = AC", "ab + bc + ca", "x = 2 or x = 3",
    "\\text{no solution}", "5 \\text{ cm}", "\\sin x \\cos x", "2\\sqrt{3}",
])
def test_mathematical_answers_and_marked_text_are_accepted(answer):
    check = AnswerCheck()
    assert check.problem(answer) is None
    assert MathVerifyReward(isolate=False).reference_problem(answer) is None  # the reward can grade them


@pytest.mark.parametrize("answer", ["see the solution", "n is odd", "all real numbers", "No solution"])
def test_prose_is_refused_though_math_verify_parses_it(answer):
    # math-verify reads prose as a product of single-letter variables, which no mathematical answer equals
    assert MathVerifyReward(isolate=False).reference_problem(answer) is None
    assert prose_problem(answer).startswith("it reads as prose")


def test_each_distinct_answer_is_parsed_once_per_load(write_jsonl, monkeypatch):
    parsed = []
    real = MathVerifyReward.reference_problem

    def spy(self, answer):
        parsed.append(answer)
        return real(self, answer)

    monkeypatch.setattr(MathVerifyReward, "reference_problem", spy)
    path = write_jsonl("train.jsonl", [dict(GOOD, answer=a) for a in ["3", "4", "3", "3", "\\frac{1}{", "\\frac{1}{"]])
    records, skipped = JsonlSource([path], skip_invalid=True).load("train")
    assert len(records) == 4 and skipped == Counter(unparseable_answer=2)
    assert parsed == ["3", "4", "\\frac{1}{"]


def test_an_answer_that_parses_too_slowly_is_unparseable():
    # 3000 nested groups take math-verify tens of seconds; the check gives up at its limit
    nested = "{" * 3000 + "1" + "}" * 3000
    assert AnswerCheck(timeout_s=1.0).problem(nested) == "math-verify did not parse it within 1 s"
