"""A rank-sharded stream of prompt batches.

The stream does the batching itself and yields whole `PromptBatch`es: a prompt whose tokens exceed the maximum
prompt length, or whose expert solution (+EOS) exceeds the maximum response length, is skipped and counted here,
and the running counts travel with every batch to the module's logs. The split is tokenized once, up front
(`TokenizedSplit`), so which records are too long is known before streaming and `summary` says so at setup. Each
epoch reshuffles with (seed, epoch); every rank sees the same permutation and takes its own slice, trimmed to equal
size so no rank waits on another.

Resume: every batch carries the position just after it (epoch, batches into the epoch, skip counts). Ranks
consume batches in lockstep, so the batch count is the same on every rank even where their skips differ; a
resumed stream replays its epoch's permutation and fast-forwards that many batches without counting skips again
(and without tokenizing anything: the ids are already there).
A position at the very end of an epoch continues with the next epoch's first batch (never an empty epoch).

Several expert solutions (trapo_lightning/data/records.py): a solution whose ids (+EOS) exceed the maximum response
length never guides. It is dropped and counted while the record stays with the solutions that fit, the first of
them now the primary; a record none of whose solutions fit is skipped (`solution_too_long`), as with one solution.
"""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence

from torch.utils.data import IterableDataset
from transformers import PreTrainedTokenizerBase

from trapo_lightning.data.prompts import PromptTemplate
from trapo_lightning.data.records import EXPERT_TRACES, MathRecord, PromptBatch, PromptRecord, StreamPosition
from trapo_lightning.data.tokens import TokenizedSplit


class PromptStream(IterableDataset):
    def __init__(
        self,
        records: Sequence[MathRecord],
        tokenizer: PreTrainedTokenizerBase,
        template: PromptTemplate,
        batch_size: int,
        max_prompt_tokens: int,
        max_response_tokens: int,
        shuffle: bool,
        drop_last: bool,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        self.tokens = TokenizedSplit(records, tokenizer, template)
        self.batch_size = batch_size
        self.max_prompt_tokens = max_prompt_tokens
        self.max_response_tokens = max_response_tokens
        self.shuffle = shuffle
        self.drop_last = drop_last
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.epoch = 0
        self.skipped: Counter = Counter()
        self._resume: StreamPosition | None = None
        self.fitting = [self._fitting(index) for index in range(len(self.tokens))]  # solutions within the budget
        self.skip_reasons = [self._too_long(index) for index in range(len(self.tokens))]  # skip reason, or None

    def _fitting(self, index: int) -> tuple[int, ...]:
        """The numbers of record `index`'s tokenized solutions whose ids + EOS fit in a response."""
        traces = range(self.tokens.traces(index))
        return tuple(k for k in traces if self.tokens.trace_length(index, k) + 1 <= self.max_response_tokens)

    def _too_long(self, index: int) -> str | None:
        if self.tokens.prompts.length(index) > self.max_prompt_tokens:
            return "prompt_too_long"
        if self.tokens.traces(index) and not self.fitting[index]:  # a record without solutions is never too long
            return "solution_too_long"
        return None

    def summary(self, split: str, malformed: Mapping[str, int]) -> str:
        """What the data layer kept of `split` and what it skipped, by reason, over all ranks and one epoch."""
        too_long = Counter(reason for reason in self.skip_reasons if reason)
        read, kept = len(self.tokens) + sum(malformed.values()), len(self.tokens) - sum(too_long.values())
        parts = [f"{split} data: {read} rows read, {kept} kept"]
        if malformed:
            parts.append(f"{sum(malformed.values())} malformed skipped ({_by_reason(malformed)})")
        if too_long:
            parts.append(
                f"{sum(too_long.values())} too long skipped ({_by_reason(too_long)}; limits: prompt "
                f"{self.max_prompt_tokens} tokens, solution + EOS {self.max_response_tokens})"
            )
        if traces := self._traces_summary():
            parts.append(traces)
        return "; ".join(parts)

    def _traces_summary(self) -> str:
        """How many kept records carry a second solution, and what of their solutions goes unused; "" when no
        record has more than one."""
        kept = [i for i, reason in enumerate(self.skip_reasons) if reason is None]
        second = sum(len(self.fitting[i]) > 1 for i in kept)
        dropped = sum(self.tokens.traces(i) - len(self.fitting[i]) for i in kept)
        unused = sum(max(0, len(record.solutions) - EXPERT_TRACES) for record in self.tokens.records)
        if not (second or dropped or unused):
            return ""
        notes = [f"{dropped} over-long solutions dropped, their records kept with the one that fits"] if dropped else []
        notes += [f"{unused} solutions beyond the first {EXPERT_TRACES} of a record unused"] if unused else []
        return f"{second} kept records carry a second expert solution, for the whole-solution micro-group" + (
            f" ({'; '.join(notes)})" if notes else ""
        )

    def resume_from(self, position: StreamPosition) -> None:
        """Make the next iteration start just after the batch that carried `position`."""
        self._resume = position
        self.skipped = Counter(position.skipped)

    def __iter__(self) -> Iterator[PromptBatch]:
        epoch, done = (self._resume.epoch, self._resume.batches) if self._resume else (self.epoch, 0)
        self._resume = None
        yielded = False
        for batch in self._epoch(epoch, fast_forward=done):
            yielded = True
            yield batch
        self.epoch = epoch + 1
        if done and not yielded:  # resumed exactly at the end of an epoch: this iteration is the next epoch
            yield from self._epoch(self.epoch, fast_forward=0)
            self.epoch += 1

    def _epoch(self, epoch: int, fast_forward: int) -> Iterator[PromptBatch]:
        number = 0
        for number, batch in enumerate(self._batches(epoch, fast_forward), start=1):
            if number > fast_forward:
                yield PromptBatch(batch, dict(self.skipped), StreamPosition(epoch, number, dict(self.skipped)))
        if number == 0:  # Lightning would start empty epochs forever: a hang, not an error
            raise ValueError(
                f"rank {self.rank}'s share of {len(self.tokens)} records gave no batch of {self.batch_size} prompts "
                f"(skipped so far: {dict(self.skipped)}); raise model.max_prompt_tokens / max_response_tokens or "
                "add data"
            )

    def _batches(self, epoch: int, fast_forward: int) -> Iterator[list[PromptRecord]]:
        """This rank's batches of `epoch`; skips are counted only past the first `fast_forward` batches."""
        order = list(range(len(self.tokens)))
        if self.shuffle:
            random.Random(f"{self.seed}/{epoch}").shuffle(order)
        per_rank = len(order) // self.world_size
        batch: list[PromptRecord] = []
        made = 0
        for index in order[self.rank * per_rank : (self.rank + 1) * per_rank]:
            reason = self.skip_reasons[index]
            if reason is not None:
                self.skipped[reason] += made >= fast_forward
                continue
            batch.append(self.tokens.prompt_record(index, self.fitting[index]))
            if len(batch) == self.batch_size:
                made += 1
                yield batch
                batch = []
        if batch and not self.drop_last:
            yield batch


def _by_reason(counts: Mapping[str, int]) -> str:
    return ", ".join(f"{reason}: {count}" for reason, count in sorted(counts.items()))
