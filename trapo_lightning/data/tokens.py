"""Every record's prompt and expert-solution ids, from one batched tokenization pass over a split at setup.

The stream needs each record's lengths before it streams, to skip the over-long ones and to say up front how many
there are, and the ids of the ones it keeps. One pass tokenizes the split in batches (a fast tokenizer spreads a
batch over the cores) and keeps the ids packed, 4 bytes a token, so nothing is tokenized twice, a step's batch
costs no tokenizing, and a resumed stream fast-forwards without tokenizing. Cost at the paper's scale
(docs/prefix_cuts.md): 46k rows of ~4k-token solutions are ~0.77 GB of ids per rank and ~320 CPU-seconds of
tokenizing (0.6M tokens per CPU-second measured), spread over the cores.

One tokenization rule for every length check and for what the policy sees: text is tokenized without special
tokens (`add_special_tokens=False`). A prompt is the chat template's text as is (the template writes its own
special tokens); a response is the solution's ids followed by EOS. A tokenizer that adds BOS by default (Llama's)
would otherwise count one token the rollout never sees.

A record's solutions beyond the first `EXPERT_TRACES` never guide anything (trapo_lightning/data/records.py), so
they are not tokenized: a second solution per record about doubles the solution ids kept, a third adds nothing.
"""

from __future__ import annotations

from array import array
from collections.abc import Iterable, Sequence

from transformers import PreTrainedTokenizerBase

from trapo_lightning.data.prompts import PromptTemplate
from trapo_lightning.data.records import EXPERT_TRACES, MathRecord, PromptRecord

_CHUNK = 256  # rows per batched call: a chunk's ids pass through Python lists (~36 bytes a token) before packing


class PackedIds:
    """Token id sequences of varying length in one flat array of 4-byte ids, with their offsets."""

    def __init__(self) -> None:
        self.ids = array("i")
        self.offsets = array("q", [0])

    def extend(self, sequences: Iterable[Sequence[int]]) -> None:
        for sequence in sequences:
            self.ids.extend(sequence)
            self.offsets.append(len(self.ids))

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getitem__(self, index: int) -> tuple[int, ...]:
        return tuple(self.ids[self.offsets[index] : self.offsets[index + 1]])

    def length(self, index: int) -> int:
        return self.offsets[index + 1] - self.offsets[index]


class TokenizedSplit:
    """The records of a split with their prompt and solution ids, tokenized once in batches."""

    def __init__(
        self, records: Sequence[MathRecord], tokenizer: PreTrainedTokenizerBase, template: PromptTemplate
    ) -> None:
        self.records = list(records)
        self.prompts = PackedIds()
        self.solutions = [PackedIds() for _ in range(EXPERT_TRACES)]
        """`solutions[k][i]`: the ids of record i's solution k, () where it has fewer than k + 1."""
        for start in range(0, len(self.records), _CHUNK):
            chunk = self.records[start : start + _CHUNK]
            self.prompts.extend(_encode(tokenizer, [template.text(tokenizer, r.problem) for r in chunk]))
            for k, packed in enumerate(self.solutions):
                present = [r.solutions[k] for r in chunk if len(r.solutions) > k]
                encoded = iter(_encode(tokenizer, present) if present else [])
                packed.extend(next(encoded) if len(r.solutions) > k else () for r in chunk)

    def __len__(self) -> int:
        return len(self.records)

    def traces(self, index: int) -> int:
        """How many of record `index`'s solutions were tokenized (at most `EXPERT_TRACES`)."""
        return min(len(self.records[index].solutions), EXPERT_TRACES)

    def trace_length(self, index: int, trace: int) -> int:
        return self.solutions[trace].length(index)

    def prompt_record(self, index: int, traces: Sequence[int] | None = None) -> PromptRecord:
        """Record `index` with the solutions numbered `traces` (default: every tokenized one), in that order."""
        record = self.records[index]
        traces = range(self.traces(index)) if traces is None else traces
        return PromptRecord(
            self.prompts[index], record.problem, tuple(record.solutions[k] for k in traces), record.answer,
            record.source, tuple(self.solutions[k][index] for k in traces),
        )


def _encode(tokenizer: PreTrainedTokenizerBase, texts: list[str]) -> list[list[int]]:
    return tokenizer(texts, add_special_tokens=False, return_attention_mask=False)["input_ids"]
