"""Typed records that flow from the data sources to the training step.

A source yields `MathRecord`s (text only). The stream turns each into a `PromptRecord` by applying the prompt
template through the tokenizer's chat template (TRAPO.md, "Settings": the paper's system and user prompt) and
carrying the expert solution's token ids, which the expert prefix is cut from (`trapo_lightning/prefix.py`), and a
`PromptBatch` carries the prompts of one optimizer step together with the stream's running skip counts, so the
module can log what the data layer dropped without reaching back into it.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class MathRecord:
    """One problem with an expert solution (the guidance source) and its final answer (the verifier's key)."""

    problem: str
    solution: str
    answer: str
    source: str = ""
    """Where the record came from, e.g. `train.jsonl:17`; used in error messages."""


@dataclass(frozen=True)
class PromptRecord:
    """A record with its prompt already tokenized (chat template applied, generation prompt appended) and its
    expert solution's token ids."""

    prompt_ids: tuple[int, ...]
    problem: str
    solution: str
    answer: str
    source: str = ""
    solution_ids: tuple[int, ...] = ()
    """The solution tokenized once without special tokens; every expert prefix is a prefix of these ids."""

    def __post_init__(self) -> None:
        if self.solution and not self.solution_ids:  # else a guided rollout would silently start from nothing
            raise ValueError(f"record {self.source or self.problem[:40]!r} has a solution but no solution_ids")


@dataclass(frozen=True)
class StreamPosition:
    """Where a stream stands just after a batch: its epoch, batches yielded in that epoch, skip counts so far."""

    epoch: int
    batches: int
    skipped: dict[str, int] = field(default_factory=dict)

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "batches": self.batches, "skipped": dict(self.skipped)}

    @classmethod
    def from_state_dict(cls, state: dict) -> StreamPosition:
        return cls(int(state["epoch"]), int(state["batches"]), dict(state["skipped"]))


@dataclass
class PromptBatch:
    """The prompts of one step, plus cumulative per-reason skip counts of the stream that produced them and the
    stream position just after this batch (what a checkpoint taken after training on it must resume from)."""

    records: list[PromptRecord]
    skipped: dict[str, int] = field(default_factory=dict)
    position: StreamPosition | None = None

    def __len__(self) -> int:
        return len(self.records)
