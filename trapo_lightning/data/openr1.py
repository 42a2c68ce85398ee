"""The OpenR1-Math layout, the data the paper trains on (TRAPO.md, "Settings": OpenR1-Math-46k-8192, DeepSeek-R1
traces, only the text inside <think>...</think> is the expert trace).

A row of OpenR1-Math-220k (and of its subsets that keep its columns) holds a `problem`, its reference `answer`, a
list of R1 `generations` and, aligned with them, `correctness_math_verify`: whether math-verify found each
generation's final answer correct. The expert solutions of a row are made from the first two generations marked
correct (a strict `True`; `None`, as left where the llama judge was used instead, is not a mark), one if only one
is: as in the authors' code, the first guides the partial prefixes and the second the whole-solution micro-group
(trapo_lightning/data/records.py; `expert_traces: 1` keeps the first only). Each is made the same way:
- its text inside `<think>...</think>`: R1's reasoning without the summary written after it. The opening tag may
  be missing (some dumps leave it to the chat template); the closing tag must be there.
- `\\boxed{answer}` appended after a blank line when that text has no `\\boxed{}` of its own, because a rollout
  guided by the whole solution (prefix ratio 1) must earn its reward: the verifier grades the last `\\boxed{}`.
  The reference answer is used, not the summary's, so the appended answer verifies by construction. With
  `append_answer: false` such a row is malformed instead (`trace_without_boxed`).
A malformed second trace makes the row malformed as a malformed first one does (the message says which), rather
than being passed over without a word.
The validation split (and a benchmark) needs `problem` and `answer` only.

Files are read by their kind: `.jsonl`, `.parquet`, or a folder written by `Dataset.save_to_disk`. Rows are
validated as in every other source (trapo_lightning/data/sources.py): problem and answer by `record_from_row`, the
answer parsed as the reward will (`unparseable_answer`), and a malformed row names where it is and the field, or
is counted per reason with `skip_invalid`.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from trapo_lightning.data.records import EXPERT_TRACES, MathRecord
from trapo_lightning.data.sources import (
    FieldMap,
    InvalidRecord,
    RowSource,
    dataset_rows,
    decode_json_row,
    field_label,
    field_value,
    jsonl_lines,
    parquet_rows,
    record_from_row,
)
from trapo_lightning.errors import DataError
from trapo_lightning.reward import last_boxed

THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
_ORDINALS = ("first", "second")


@dataclass(frozen=True)
class OpenR1Fields:
    """Which columns hold the problem, the reference answer, the generations and their correctness marks."""

    problem: str = "problem"
    answer: str = "answer"
    generations: str = "generations"
    correctness: str = "correctness_math_verify"


class OpenR1MathSource(RowSource):
    """OpenR1-Math rows: the expert solutions are the reasoning of the first generations marked correct."""

    def __init__(
        self,
        train_files: list[str] | None = None,
        val_files: list[str] | None = None,
        fields: OpenR1Fields | None = None,
        skip_invalid: bool = False,
        append_answer: bool = True,
        expert_traces: int = EXPERT_TRACES,
    ) -> None:
        """
        Args:
            train_files: Training split: `.jsonl` or `.parquet` files, or folders written by `Dataset.save_to_disk`.
            val_files: Validation split or benchmark, the same kinds (its rows need `problem` and `answer` only).
            fields: Mapping from our field names to the columns of your files.
            skip_invalid: Skip malformed rows and count them per reason instead of failing on the first one.
            append_answer: Append `\\boxed{answer}` to a reasoning trace that has no \\boxed{} (else such a row is
                malformed, `trace_without_boxed`), so a rollout guided by the whole trace verifies.
            expert_traces: Correct generations made into expert solutions, 1 or 2: the first guides the partial
                prefixes, the second (where a row has two) the whole-solution micro-group, as the authors.
        """
        if not 1 <= expert_traces <= EXPERT_TRACES:
            raise ValueError(f"expert_traces must be 1 or {EXPERT_TRACES}, got {expert_traces}")
        super().__init__(train_files, val_files, skip_invalid)
        self.fields = fields or OpenR1Fields()
        self.append_answer = append_answer
        self.expert_traces = expert_traces

    def _rows(self, name: str) -> Iterator[tuple[str, Any]]:
        path = Path(name)
        if path.is_dir():
            return dataset_rows(name, builder=None)
        if path.suffix == ".parquet":
            return parquet_rows(path)
        if path.suffix == ".jsonl":
            return jsonl_lines(path)
        raise DataError(f"{name}: expected a .jsonl or .parquet file, or a folder written by Dataset.save_to_disk")

    def _record(self, row: Any, where: str, train: bool) -> MathRecord:
        if isinstance(row, bytes):  # a JSONL line, decoded here so that a bad one is a bad row like any other
            row = decode_json_row(row, where)
        return openr1_record(
            row, where, self.fields, need_solution=train, append_answer=self.append_answer, traces=self.expert_traces
        )


def openr1_record(
    row: Any, where: str, fields: OpenR1Fields, need_solution: bool, append_answer: bool = True,
    traces: int = EXPERT_TRACES,
) -> MathRecord:
    """One OpenR1-Math row to a record with the traces of its first `traces` correct generations (see the module
    docstring), or `InvalidRecord` naming the place and field."""
    record = record_from_row(row, where, FieldMap(problem=fields.problem, answer=fields.answer), need_solution=False)
    if not need_solution:
        return record
    solutions = []
    for which, generation in zip(_ORDINALS, correct_generations(row, where, fields, traces)):
        trace = think_text(generation, where, fields, which)
        if last_boxed(trace) is None:
            if not append_answer:
                raise InvalidRecord(
                    where, "trace_without_boxed",
                    f"the reasoning of the {which} correct generation has no \\boxed{{}} answer (append_answer is off)",
                )
            trace = f"{trace}\n\n\\boxed{{{record.answer}}}"
        solutions.append(trace)
    return replace(record, solutions=tuple(solutions))


def correct_generations(row: Mapping, where: str, fields: OpenR1Fields, count: int) -> list[str]:
    """The first `count` generations whose correctness mark is True (fewer if fewer are; at least one)."""
    generations = _list_field(row, fields.generations, "generations", where)
    marks = _list_field(row, fields.correctness, "correctness", where)
    if len(marks) != len(generations):
        raise InvalidRecord(
            where, "correctness_length_mismatch",
            f"field '{fields.correctness}' has {len(marks)} marks for {len(generations)} generations in "
            f"'{fields.generations}'",
        )
    correct = [index for index, mark in enumerate(marks) if mark is True][:count]
    if not correct:
        raise InvalidRecord(
            where, "no_correct_generation",
            f"no generation in '{fields.generations}' is marked True in '{fields.correctness}'",
        )
    for index in correct:
        if not isinstance(generations[index], str):
            raise InvalidRecord(
                where, "non_string_generation",
                f"field '{fields.generations}'[{index}] must be a string, got {type(generations[index]).__name__}",
            )
    return [generations[index] for index in correct]


def think_text(generation: str, where: str, fields: OpenR1Fields, which: str = "first") -> str:
    """The text inside `<think>...</think>`, stripped; the opening tag may be missing, the closing one may not.
    `which` names the generation in errors ("first" or "second" correct one)."""
    end = generation.find(THINK_CLOSE)
    if end < 0:
        raise InvalidRecord(
            where, "unclosed_think", f"the {which} correct generation in '{fields.generations}' has no {THINK_CLOSE}"
        )
    start = generation.find(THINK_OPEN, 0, end)
    text = generation[start + len(THINK_OPEN) if start >= 0 else 0 : end].strip()
    if not text:
        raise InvalidRecord(
            where, "empty_trace",
            f"the {which} correct generation in '{fields.generations}' has nothing inside {THINK_OPEN}{THINK_CLOSE}",
        )
    return text


def _list_field(row: Mapping, key: str, name: str, where: str) -> Sequence:
    value = field_value(row, key, name, where)
    if not isinstance(value, (list, tuple)):
        raise InvalidRecord(
            where, f"non_list_{name}",
            f"field {field_label(key, name)} must be a list, got {type(value).__name__} {value!r:.40}",
        )
    return value
