"""Data sources: where {problem, solution, answer} records come from.

`SyntheticSource` is the embedded default. `JsonlSource` reads a user's files with field names mapped in YAML.
A malformed row is an error that names `file:line` and the field, or, with `skip_invalid: true`, a counted skip
with the reason; it never turns into an empty prompt or a silently zero reward later on.
"""

from __future__ import annotations

import abc
import json
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from trapo_lightning.data.records import MathRecord
from trapo_lightning.data.synthetic import SyntheticArithmetic
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
    """Which JSON keys hold the problem, the expert solution and the final answer."""

    problem: str = "problem"
    solution: str = "solution"
    answer: str = "answer"


class InvalidRecord(ValueError):
    """A row that cannot be used; `reason` is the skip-counter key."""

    def __init__(self, where: str, reason: str, message: str) -> None:
        super().__init__(f"{where}: {message}")
        self.reason = reason


class JsonlSource(DataSource):
    """JSON Lines files, one record per line; blank lines are ignored."""

    def __init__(
        self,
        train_files: list[str],
        val_files: list[str] | None = None,
        fields: FieldMap | None = None,
        skip_invalid: bool = False,
        require_boxed_solution: bool = False,
    ) -> None:
        """
        Args:
            train_files: JSONL files of the training split.
            val_files: JSONL files of the validation split (its rows need `problem` and `answer` only).
            fields: Mapping from our field names to the keys in your files.
            skip_invalid: Skip malformed rows and count them per reason instead of failing on the first one.
            require_boxed_solution: A training solution must end its work in a \\boxed{...} answer (as the
                synthetic task and most curated sets do); one without is malformed (`solution_without_boxed`).
        """
        self.files = {"train": list(train_files), "val": list(val_files or [])}
        self.fields = fields or FieldMap()
        self.skip_invalid = skip_invalid
        self.require_boxed_solution = require_boxed_solution

    def load(self, split: str) -> tuple[list[MathRecord], Counter]:
        records: list[MathRecord] = []
        skipped: Counter = Counter()
        for name in self.files[split]:
            for where, line in _lines(Path(name)):
                try:
                    record = parse_row(line, where, self.fields, need_solution=split == "train")
                    if split == "train" and self.require_boxed_solution:
                        _check_boxed(record, where, self.fields)
                    records.append(record)
                except InvalidRecord as bad:
                    if not self.skip_invalid:
                        raise
                    skipped[bad.reason] += 1
        return records, skipped


def _lines(path: Path):
    if not path.is_file():
        raise FileNotFoundError(f"data file {path} does not exist; check `data.source.init_args` in your config")
    with path.open("rb") as handle:
        for number, raw in enumerate(handle, start=1):
            if raw.strip():
                yield f"{path}:{number}", raw


def parse_row(raw: bytes, where: str, fields: FieldMap, need_solution: bool) -> MathRecord:
    """One JSONL line to a record, or `InvalidRecord` naming the place and the field."""
    try:
        row = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise InvalidRecord(where, "undecodable", f"not a valid UTF-8 JSON line ({err})") from None
    if not isinstance(row, dict):
        raise InvalidRecord(where, "not_an_object", f"expected a JSON object, got {type(row).__name__}")
    wanted = [("problem", fields.problem), ("answer", fields.answer)]
    if need_solution:
        wanted.append(("solution", fields.solution))
    values = {name: _string_field(row, key, name, where) for name, key in wanted}
    return MathRecord(values["problem"], values.get("solution", ""), values["answer"], source=where)


def _check_boxed(record: MathRecord, where: str, fields: FieldMap) -> None:
    if last_boxed(record.solution) is None:
        raise InvalidRecord(
            where, "solution_without_boxed",
            f"field '{fields.solution}' has no \\boxed{{...}} answer (require_boxed_solution is on)",
        )


def _string_field(row: dict, key: str, name: str, where: str) -> str:
    mapped = f"'{key}'" + ("" if key == name else f" (the {name} field)")
    if key not in row:
        raise InvalidRecord(where, f"missing_{name}", f"field {mapped} is missing; map it with data.source.fields")
    value = row[key]
    if not isinstance(value, str):
        raise InvalidRecord(
            where, f"non_string_{name}", f"field {mapped} must be a string, got {type(value).__name__} {value!r:.40}"
        )
    if not value.strip():
        raise InvalidRecord(where, f"empty_{name}", f"field {mapped} is empty")
    return value
