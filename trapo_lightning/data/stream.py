"""A rank-sharded stream of prompt batches.

The stream does the batching itself and yields whole `PromptBatch`es: a prompt whose tokens exceed the maximum
prompt length, or whose expert solution (+EOS) exceeds the maximum response length, is skipped and counted here,
and the running counts travel with every batch to the module's logs. Each epoch reshuffles with (seed, epoch);
every rank sees the same permutation and takes its own slice, trimmed to equal size so no rank waits on another.
"""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Iterator, Sequence

from torch.utils.data import IterableDataset
from transformers import PreTrainedTokenizerBase

from trapo_lightning.data.prompts import PromptTemplate
from trapo_lightning.data.records import MathRecord, PromptBatch, PromptRecord


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
        self.records = list(records)
        self.tokenizer = tokenizer
        self.template = template
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

    def __iter__(self) -> Iterator[PromptBatch]:
        order = list(range(len(self.records)))
        if self.shuffle:
            random.Random(f"{self.seed}/{self.epoch}").shuffle(order)
        self.epoch += 1
        per_rank = len(order) // self.world_size
        mine = order[self.rank * per_rank : (self.rank + 1) * per_rank]
        batch: list[PromptRecord] = []
        for index in mine:
            prompt = self._prompt(self.records[index])
            if prompt is None:
                continue
            batch.append(prompt)
            if len(batch) == self.batch_size:
                yield PromptBatch(batch, dict(self.skipped))
                batch = []
        if batch and not self.drop_last:
            yield PromptBatch(batch, dict(self.skipped))

    def _prompt(self, record: MathRecord) -> PromptRecord | None:
        prompt_ids = self.template.token_ids(self.tokenizer, record.problem)
        if len(prompt_ids) > self.max_prompt_tokens:
            self.skipped["prompt_too_long"] += 1
            return None
        if record.solution and len(self.tokenizer(record.solution)["input_ids"]) + 1 > self.max_response_tokens:
            self.skipped["solution_too_long"] += 1
            return None
        return PromptRecord(prompt_ids, record.problem, record.solution, record.answer, record.source)
