"""Data sources: where {problem, solutions, answer} records come from.

`SyntheticSource` is the embedded default. The others read a user's files, with field names mapped in YAML:
`JsonlSource` (JSON Lines), `ParquetSource`, and `HFDatasetSource` (Hugging Face `datasets`: folders written by
`save_to_disk`, or local files read by a packaged builder such as `json` or `parquet`); trapo_lightning/data/openr1.py
reads the OpenR1-Math layout. A malformed row is an error that names where it is (`file:line` in JSONL,
`file:row i` in tables, i counted from 0 as in `dataset[i]`) and the field, or, with `skip_invalid: true`, a
counted skip with the reason; it never turns into an empty prompt or a silently zero reward later on. Every
format goes through the same row validation (`record_from_row`), so the contract is the same whatever the format,
and every reference answer is parsed as the reward will parse it (trapo_lightning/data/answers.py): one it could
never grade against is a malformed row too (`unparseable_answer`).

A training row gives its expert solution as one string (`solution`) or several as a list of strings
(`solutions`, the primary first; trapo_lightning/data/records.py says which guides what), not both: a row with
both is ambiguous (`ambiguous_solutions`) unless the config maps one of the two fields away (`null`).

Parquet and `datasets` are an optional extra (`pip install 'trapo-lightning[data]'`), imported only when used.
"""

from __future__ import annotations

import abc
import importlib
import json
from collections import Counter
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from trapo_lightning.data.answers import AnswerCheck
from trapo_lightning.data.records import MathRecord
from trapo_lightning.data.synthetic import SyntheticArithmetic
from trapo_lightning.errors import DataError, MissingExtraError
from trapo_lightning.reward import last_boxed


class DataSource(abc.ABC):
    """Loads the records of a split, and reports per-reason counts of rows it skipped."""

    @abc.abstractmethod
    def load(self, split: str) -> tuple[list[MathRecord], Counter]:
        """All records of `split` ("train" or "val") and a Counter of skipped rows by reason."""


class SyntheticSource(DataSource):
    """The offline default: `SyntheticArithmetic` problems, a training split and a disjoint held-out split."""

    def __init__(self, task: SyntheticArithmetic | None = None, train_size: int = 20000, val_size: int = 128) -> None:
        """
        Args:
            task: The problem generator and its difficulty.
            train_size: Number of training problems (one epoch).
            val_size: Number of held-out problems used for validation.
        """
        if train_size < 1 or val_size < 1:
            raise ValueError(f"train_size and val_size must be >= 1, got {train_size} and {val_size}")
        self.task = task or SyntheticArithmetic()
        self.sizes = {"train": train_size, "val": val_size}

    def load(self, split: str) -> tuple[list[MathRecord], Counter]:
        return self.task.records(split, self.sizes[split]), Counter()


@dataclass(frozen=True)
class FieldMap:
    """Which keys (JSON keys, or table columns) hold the problem, the expert solution(s) and the final answer."""

    problem: str = "problem"
    """The problem statement."""
    solution: str | None = "solution"
    """One expert solution, a string; null: rows give theirs in `solutions` only."""
    answer: str = "answer"
    """The final answer, a string."""
    solutions: str | None = "solutions"
    """Several expert solutions of the problem, a list of strings, the primary first; null: `solution` only."""

    def __post_init__(self) -> None:
        if self.solution is None and self.solutions is None:
            raise ValueError("FieldMap: map `solution` or `solutions` (or both); training rows need a solution")


class InvalidRecord(DataError):
    """A row that cannot be used; `reason` is the skip-counter key."""

    def __init__(self, where: str, reason: str, message: str) -> None:
        super().__init__(f"{where}: {message}")
        self.reason = reason


class RowSource(DataSource):
    """Rows of split files, each turned into a record whose reference answer must parse; a bad row raises or, with
    `skip_invalid`, is counted. Subclasses set `self.fields`, whose `answer` is the answer's key in the files."""

    def __init__(self, train_files: list[str] | None, val_files: list[str] | None, skip_invalid: bool) -> None:
        self.files = {"train": list(train_files or []), "val": list(val_files or [])}
        self.skip_invalid = skip_invalid

    def load(self, split: str) -> tuple[list[MathRecord], Counter]:
        records: list[MathRecord] = []
        skipped: Counter = Counter()
        answers = AnswerCheck()
        try:
            for name in self.files[split]:
                for where, row in self._rows(name):
                    try:
                        record = self._record(row, where, train=split == "train")
                        self._check_answer(record, answers)
                        records.append(record)
                    except InvalidRecord as bad:
                        if not self.skip_invalid:
                            raise
                        skipped[bad.reason] += 1
        finally:
            answers.close()
        return records, skipped

    def _check_answer(self, record: MathRecord, answers: AnswerCheck) -> None:
        if (problem := answers.problem(record.answer)) is not None:
            label = field_label(self.fields.answer, "answer")
            shown = record.answer if len(record.answer) <= 80 else record.answer[:80] + "..."
            raise InvalidRecord(record.source, "unparseable_answer", f"field {label} is \"{shown}\": {problem}")

    @abc.abstractmethod
    def _rows(self, name: str) -> Iterator[tuple[str, Any]]:
        """(where, row) for every row of the file or folder `name`, in order."""

    @abc.abstractmethod
    def _record(self, row: Any, where: str, train: bool) -> MathRecord:
        """The record of one row, or `InvalidRecord`."""


class FieldMapSource(RowSource):
    """Rows whose problem and answer are string fields and whose expert solutions are a string or a list of
    strings, found under the keys of a `FieldMap`."""

    def __init__(
        self,
        train_files: list[str] | None = None,
        val_files: list[str] | None = None,
        fields: FieldMap | None = None,
        skip_invalid: bool = False,
        require_boxed_solution: bool = False,
    ) -> None:
        """
        Args:
            train_files: Files of the training split.
            val_files: Files of the validation split, or of a benchmark (its rows need `problem` and `answer` only).
            fields: Mapping from our field names to the keys in your files.
            skip_invalid: Skip malformed rows and count them per reason instead of failing on the first one.
            require_boxed_solution: Every training solution must end its work in a \\boxed{...} answer (as the
                synthetic task and most curated sets do); a row with one without is malformed
                (`solution_without_boxed`).
        """
        super().__init__(train_files, val_files, skip_invalid)
        self.fields = fields or FieldMap()
        self.require_boxed_solution = require_boxed_solution

    def _record(self, row: Any, where: str, train: bool) -> MathRecord:
        record = record_from_row(row, where, self.fields, need_solution=train)
        if train and self.require_boxed_solution:
            _check_boxed(record, row, self.fields)
        return record


class JsonlSource(FieldMapSource):
    """JSON Lines files, one record per line; blank lines are ignored."""

    def _rows(self, name: str) -> Iterator[tuple[str, bytes]]:
        return jsonl_lines(Path(name))

    def _record(self, row: bytes, where: str, train: bool) -> MathRecord:
        return super()._record(decode_json_row(row, where), where, train)


class ParquetSource(FieldMapSource):
    """Parquet files, one record per row (needs the `data` extra: pyarrow)."""

    def _rows(self, name: str) -> Iterator[tuple[str, dict]]:
        return parquet_rows(Path(name))


class HFDatasetSource(FieldMapSource):
    """Hugging Face `datasets` (needs the `data` extra): folders written by `Dataset.save_to_disk`, or, with
    `builder`, local files streamed by that packaged builder. Streaming reads the files as they are, without
    writing an Arrow copy to the datasets cache."""

    def __init__(
        self,
        train_files: list[str] | None = None,
        val_files: list[str] | None = None,
        fields: FieldMap | None = None,
        skip_invalid: bool = False,
        require_boxed_solution: bool = False,
        builder: str | None = None,
    ) -> None:
        """
        Args:
            train_files: Training split: `save_to_disk` folders of one split each, or, with `builder`, data files
                (globs allowed; a glob's rows are numbered across its files).
            val_files: Validation split or benchmark, the same way (its rows need `problem` and `answer` only).
            fields: Mapping from our field names to the columns of your dataset.
            skip_invalid: Skip malformed rows and count them per reason instead of failing on the first one.
            require_boxed_solution: A training solution must end its work in a \\boxed{...} answer; one without is
                malformed (`solution_without_boxed`).
            builder: Packaged builder that streams the files, e.g. `json`, `parquet` or `csv`
                (`load_dataset(builder, data_files=..., streaming=True)`); None: the paths are `save_to_disk`
                folders. For JSON Lines prefer `JsonlSource`: it names the line of a row that is not valid JSON.
        """
        super().__init__(train_files, val_files, fields, skip_invalid, require_boxed_solution)
        self.builder = builder

    def _rows(self, name: str) -> Iterator[tuple[str, dict]]:
        return dataset_rows(name, self.builder)


# -- readers: (where, row) in file order ---------------------------------------------------------------------------
def jsonl_lines(path: Path) -> Iterator[tuple[str, bytes]]:
    """Each non-blank line of a JSON Lines file, undecoded (a line that is not JSON is the caller's bad row)."""
    with _existing_file(path).open("rb") as handle:
        for number, raw in enumerate(handle, start=1):
            if raw.strip():
                yield f"{path}:{number}", raw


def parquet_rows(path: Path) -> Iterator[tuple[str, dict]]:
    """Each row of a Parquet file as a dict. Read in small batches: an OpenR1 row holds several long R1 traces, and
    pyarrow's default batch (65536 rows) of those as Python strings would take gigabytes."""
    path = _existing_file(path)
    parquet = optional_import("pyarrow.parquet", "reading Parquet files")
    index = 0
    for batch in parquet.ParquetFile(path).iter_batches(batch_size=256):
        for row in batch.to_pylist():
            yield f"{path}:row {index}", row
            index += 1


def dataset_rows(name: str, builder: str | None) -> Iterator[tuple[str, dict]]:
    """Each row of a `save_to_disk` folder (builder None), or of local files streamed by a packaged builder."""
    folder = _existing_folder(Path(name)) if builder is None else None
    datasets = optional_import("datasets", "reading Hugging Face datasets")
    if folder is not None:
        dataset = datasets.load_from_disk(str(folder))
        if isinstance(dataset, datasets.DatasetDict):
            raise DataError(
                f"{name} holds a DatasetDict with splits {list(dataset)}; give the folder of one split, e.g. "
                f"{Path(name) / next(iter(dataset))}"
            )
    else:
        dataset = datasets.load_dataset(builder, data_files=name, split="train", streaming=True)
    for index, row in enumerate(dataset):
        yield f"{name}:row {index}", row


def optional_import(module: str, purpose: str):
    """`module`, or an ImportError that names the extra to install."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise MissingExtraError(
            f"{purpose} needs `{module.split('.')[0]}`, which is in the optional `data` extra: "
            "pip install 'trapo-lightning[data]'"
        ) from None


def _existing_file(path: Path) -> Path:
    if not path.is_file():
        raise FileNotFoundError(f"data file {path} does not exist; check the data source's files in your config")
    return path


def _existing_folder(path: Path) -> Path:
    if not path.is_dir():
        raise FileNotFoundError(
            f"dataset folder {path} does not exist; give a folder written by Dataset.save_to_disk, or set `builder` "
            "to stream data files"
        )
    return path


# -- validation: one contract for every format ----------------------------------------------------------------------
def parse_row(raw: bytes, where: str, fields: FieldMap, need_solution: bool) -> MathRecord:
    """One JSONL line to a record, or `InvalidRecord` naming the place and the field."""
    return record_from_row(decode_json_row(raw, where), where, fields, need_solution)


def decode_json_row(raw: bytes, where: str) -> Any:
    try:
        return json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise InvalidRecord(where, "undecodable", f"not a valid UTF-8 JSON line ({err})") from None


def record_from_row(row: Any, where: str, fields: FieldMap, need_solution: bool) -> MathRecord:
    """One row (a mapping from keys to values) to a record, or `InvalidRecord` naming the place and the field."""
    if not isinstance(row, Mapping):
        raise InvalidRecord(where, "not_an_object", f"expected a JSON object, got {type(row).__name__}")
    problem, answer = (string_field(row, key, name, where) for name, key in [
        ("problem", fields.problem), ("answer", fields.answer)
    ])
    return MathRecord(problem, solutions_field(row, where, fields) if need_solution else (), answer, source=where)


def solutions_field(row: Mapping, where: str, fields: FieldMap) -> tuple[str, ...]:
    """The row's expert solutions: its `solutions` list or its one `solution`, whichever it has. A key holding
    null counts as absent, so a table with both columns may fill one per row."""
    has_list = fields.solutions is not None and row.get(fields.solutions) is not None
    has_one = fields.solution is not None and row.get(fields.solution) is not None
    if has_list and has_one:
        raise InvalidRecord(
            where, "ambiguous_solutions",
            f"the row has both '{fields.solution}' and '{fields.solutions}'; give one, or map the other away in the "
            "source's `fields` (e.g. `solution: null` to use the list)",
        )
    if has_list or fields.solution is None:
        return string_list_field(row, fields.solutions, "solutions", where)
    if fields.solutions is not None and fields.solution not in row and fields.solutions not in row:
        one, several = field_label(fields.solution, "solution"), field_label(fields.solutions, "solutions")
        raise InvalidRecord(
            where, "missing_solution",
            f"field {one} is missing (or {several}, a list of them); map yours with the source's `fields`",
        )
    return (string_field(row, fields.solution, "solution", where),)


def string_list_field(row: Mapping, key: str, name: str, where: str) -> tuple[str, ...]:
    """`row[key]`, a non-empty list of non-blank strings."""
    mapped = field_label(key, name)
    value = field_value(row, key, name, where)
    if not isinstance(value, (list, tuple)):
        raise InvalidRecord(
            where, f"non_list_{name}",
            f"field {mapped} must be a list of strings, got {type(value).__name__} {value!r:.40}",
        )
    if not value:
        raise InvalidRecord(where, f"empty_{name}", f"field {mapped} is an empty list")
    for index, item in enumerate(value):
        if not isinstance(item, str):
            raise InvalidRecord(
                where, f"non_string_{name}",
                f"field {mapped}[{index}] must be a string, got {type(item).__name__} {item!r:.40}",
            )
        if not item.strip():
            raise InvalidRecord(where, f"empty_{name}", f"field {mapped}[{index}] is empty")
    return tuple(value)


def _check_boxed(record: MathRecord, row: Mapping, fields: FieldMap) -> None:
    listed = fields.solutions is not None and row.get(fields.solutions) is not None
    for index, solution in enumerate(record.solutions):
        if last_boxed(solution) is None:
            named = f"'{fields.solutions}'[{index}]" if listed else f"'{fields.solution}'"
            raise InvalidRecord(
                record.source, "solution_without_boxed",
                f"field {named} has no \\boxed{{...}} answer (require_boxed_solution is on)",
            )


def string_field(row: Mapping, key: str, name: str, where: str) -> str:
    """`row[key]`, a non-blank string; `name` is our name for the field (problem, solution, answer, ...)."""
    mapped = field_label(key, name)
    value = field_value(row, key, name, where)
    if not isinstance(value, str):
        raise InvalidRecord(
            where, f"non_string_{name}", f"field {mapped} must be a string, got {type(value).__name__} {value!r:.40}"
        )
    if not value.strip():
        raise InvalidRecord(where, f"empty_{name}", f"field {mapped} is empty")
    return value


def field_value(row: Mapping, key: str, name: str, where: str) -> Any:
    """`row[key]`, or `InvalidRecord` (`missing_<name>`) saying how to map the field."""
    if key not in row:
        raise InvalidRecord(
            where, f"missing_{name}", f"field {field_label(key, name)} is missing; map it with the source's `fields`"
        )
    return row[key]


def field_label(key: str, name: str) -> str:
    """How an error names a field: `'final' (the answer field)` when the key is mapped, else just `'answer'`."""
    return f"'{key}'" + ("" if key == name else f" (the {name} field)")
