"""Typed records that flow from the data sources to the training step.

A source yields `MathRecord`s (text only). The stream turns each into a `PromptRecord` by applying the prompt
template through the tokenizer's chat template (TRAPO.md, "Settings": the paper's system and user prompt) and
carrying the expert solutions' token ids, which the expert prefix is cut from (`trapo_lightning/prefix.py`), and a
`PromptBatch` carries the prompts of one optimizer step together with the stream's running skip counts, so the
module can log what the data layer dropped without reaching back into it.

A record may carry several expert solutions of its problem (OpenR1-Math's several correct R1 generations). As in
the authors' code (`hint_input_ids_0` / `hint_input_ids_1` in trapo_src/mix_vllm_rollout.py; TRAPO.md, "one extra
trace per problem"), the partial prefixes (ratio < 1) are cut from the first, the primary trace, and the whole-
solution micro-group (ratio 1) takes the second; with one solution every ratio uses it. Only the first
`EXPERT_TRACES` solutions are ever used, so only those are tokenized.
"""

from __future__ import annotations

from dataclasses import dataclass, field

EXPERT_TRACES = 2
"""Solutions of a record that guide rollouts: the primary (prefixes) and one extra (the whole-solution group)."""


def trace_index(ratio: float, traces: int) -> int:
    """Which of a record's `traces` expert solutions a prefix of `ratio` is cut from: the second for the whole
    solution (ratio >= 1) when there is one, else the primary (index 0)."""
    return 1 if ratio >= 1.0 and traces > 1 else 0


def _check_texts(solutions: tuple[str, ...], where: str) -> None:
    if not isinstance(solutions, tuple) or not all(isinstance(s, str) and s for s in solutions):
        raise TypeError(
            f"record {where!r}: solutions must be a tuple of non-empty strings (one solution: (text,)), "
            f"got {solutions!r:.80}"
        )


@dataclass(frozen=True)
class MathRecord:
    """One problem with its expert solutions (the guidance source) and its final answer (the verifier's key)."""

    problem: str
    solutions: tuple[str, ...]
    """Expert solutions, the primary first; () for a benchmark problem."""
    answer: str
    source: str = ""
    """Where the record came from, e.g. `train.jsonl:17`; used in error messages."""

    def __post_init__(self) -> None:
        _check_texts(self.solutions, self.source or self.problem[:40])

    @property
    def solution(self) -> str:
        """The primary expert solution ("" without one)."""
        return self.solutions[0] if self.solutions else ""


@dataclass(frozen=True)
class PromptRecord:
    """A record with its prompt already tokenized (chat template applied, generation prompt appended) and the
    token ids of the expert solutions that guide it (at most `EXPERT_TRACES`, each within the response budget)."""

    prompt_ids: tuple[int, ...]
    problem: str
    solutions: tuple[str, ...]
    """The expert solutions that guide this prompt, the primary first; () for a benchmark problem."""
    answer: str
    source: str = ""
    solutions_ids: tuple[tuple[int, ...], ...] = ()
    """Each solution tokenized once without special tokens; every expert prefix is a prefix of one of these."""

    def __post_init__(self) -> None:
        where = self.source or self.problem[:40]
        _check_texts(self.solutions, where)
        # else a guided rollout would silently start from nothing, or from another solution's ids
        if len(self.solutions_ids) != len(self.solutions) or not all(self.solutions_ids):
            raise ValueError(
                f"record {where!r} has {len(self.solutions)} solutions but token ids of "
                f"{sum(map(bool, self.solutions_ids))}: every solution needs its solutions_ids"
            )
        if len(self.solutions) > EXPERT_TRACES:
            raise ValueError(f"record {where!r} carries {len(self.solutions)} solutions; at most {EXPERT_TRACES} guide")

    @property
    def solution(self) -> str:
        """The primary expert solution ("" without one)."""
        return self.solutions[0] if self.solutions else ""

    @property
    def solution_ids(self) -> tuple[int, ...]:
        """The primary solution's ids (() without one)."""
        return self.solutions_ids[0] if self.solutions_ids else ()

    def trace_ids(self, ratio: float) -> tuple[int, ...]:
        """The ids of the solution an expert prefix of `ratio` is cut from (`trace_index`)."""
        return self.solutions_ids[trace_index(ratio, len(self.solutions_ids))] if self.solutions_ids else ()


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
