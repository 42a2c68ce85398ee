"""Realistic lengths for `step_time.py --scenario realistic`: long prompts, long-tailed completions, forced alike.

The short scenario times 44-token prompts and 24-token completions, where everything that scales with length or
vocabulary is negligible. This one gives each prompt 100-300 tokens of context and each completion a length drawn
from a long-tailed mix (most a few hundred tokens, a tail at the limit), on a random Qwen2 with the real 151,936-
token vocabulary (`real_shape.write_model`).

Equal work on both sides: a random policy samples whatever it samples, so the lengths are not left to it. Each
system's `generate` gets the same extra logits processor, `ForcedLengths`, which suppresses EOS until the row's
drawn length and then forces it. The drawn length is a pure function of the row's tokens (prompt, plus the expert
prefix for a guided TRAPO row) and of how many identical rows came before it in the call, so the G rows of a prompt
get the same G lengths in our engine and in TRL's, whatever order either lays its rows out in.
"""

from __future__ import annotations

import math
import random
import zlib
from collections import Counter
from dataclasses import dataclass

import torch
from transformers import LogitsProcessor, LogitsProcessorList

from trapo_lightning.data.records import MathRecord
from trapo_lightning.data.sources import DataSource
from trapo_lightning.data.synthetic import SyntheticArithmetic


@dataclass(frozen=True)
class LengthMix:
    """Long-tailed completion lengths in tokens (EOS included): lognormal around `median_fraction` of the limit,
    plus a share `at_limit` of rows that run to the limit (the truncated tail of real reasoning traces)."""

    max_tokens: int = 2048
    median_fraction: float = 0.2
    sigma: float = 0.9
    at_limit: float = 0.08
    min_tokens: int = 16

    def draw(self, rng: random.Random) -> int:
        if rng.random() < self.at_limit:
            return self.max_tokens
        length = int(rng.lognormvariate(math.log(self.median_fraction * self.max_tokens), self.sigma))
        return max(self.min_tokens, min(self.max_tokens, length))


def row_length(mix: LengthMix, row: tuple[int, ...], occurrence: int, seed: int = 0) -> int:
    """The drawn length of the `occurrence`-th copy of `row` (its unpadded token ids) in one generate call."""
    key = zlib.crc32(torch.tensor(row, dtype=torch.int64).numpy().tobytes())
    return mix.draw(random.Random(f"{seed}/{key}/{len(row)}/{occurrence}"))


class ForcedLengths(LogitsProcessor):
    """Ends every row at exactly its drawn number of new tokens: EOS is suppressed before and forced at it.

    Args:
        mix: The length distribution.
        eos_token_id: The id to suppress and force.
        pad_token_id: Left padding, stripped before a row is keyed.
        seed: Mixed into every draw.
    """

    def __init__(self, mix: LengthMix, eos_token_id: int, pad_token_id: int, seed: int = 0) -> None:
        self.mix, self.eos, self.pad, self.seed = mix, eos_token_id, pad_token_id, seed
        self.width = -1
        self.lengths: torch.Tensor | None = None  # [N]

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        if self.lengths is None:  # first step: the input is the (left-padded) prompt of every row
            self.width = input_ids.shape[1]
            seen: Counter = Counter()
            lengths = []
            for ids in input_ids.tolist():
                row = tuple(ids[next((i for i, t in enumerate(ids) if t != self.pad), len(ids)):])
                lengths.append(row_length(self.mix, row, seen[row], self.seed))
                seen[row] += 1
            self.lengths = torch.tensor(lengths, device=scores.device)
        step = input_ids.shape[1] - self.width  # index of the new token these scores draw
        scores = scores.clone()
        scores[self.lengths - 1 > step, self.eos] = -math.inf
        ending = self.lengths - 1 == step
        scores[ending] = -math.inf
        scores[ending, self.eos] = 0.0
        return scores


def force_lengths(model: torch.nn.Module, mix: LengthMix, eos_token_id: int, pad_token_id: int) -> None:
    """Make every `model.generate` call end its rows at their drawn lengths (after the caller's own processors,
    so a sampler log-prob recorder sees the model's distribution)."""
    original = model.generate

    def generate(*args, logits_processor=None, **kwargs):
        processors = LogitsProcessorList(logits_processor or [])
        processors.append(ForcedLengths(mix, eos_token_id, pad_token_id))
        return original(*args, logits_processor=processors, **kwargs)

    model.generate = generate


class LongSource(DataSource):
    """Arithmetic problems behind 100-300 tokens of context, with expert solutions of long-tailed length.

    Args:
        mix: Draws each expert solution's length (capped below the response limit so none is skipped).
        train_size: Records in the training split.
        seed: Same seed, same records.
    """

    CONTEXT_UNIT = "12+34=46. "  # 10 tokens of the project's tokenizer
    SOLUTION_LINE = "12+34=46\n\n"
    LINE_TOKENS = 9

    def __init__(self, mix: LengthMix, train_size: int = 64, seed: int = 0) -> None:
        self.mix, self.train_size, self.seed = mix, train_size, seed
        self.task = SyntheticArithmetic(num_operands=3, digits=1, work="direct", seed=seed)

    def load(self, split: str) -> tuple[list[MathRecord], Counter]:
        size = self.train_size if split == "train" else 4
        return [self.record(split, i) for i in range(size)], Counter()

    def record(self, split: str, index: int) -> MathRecord:
        base = self.task.record(split, index)
        rng = random.Random(f"{self.seed}/{split}/{index}/long")
        units = rng.randint(5, 25)  # the templated prompt is ~50 tokens + 10 a unit: 100-300 tokens
        solution_tokens = min(self.mix.draw(rng), int(0.8 * self.mix.max_tokens)) - 30  # room for the answer lines
        solution = self.SOLUTION_LINE * max(1, solution_tokens // self.LINE_TOKENS) + base.solution
        return MathRecord(
            problem=f"Notes: {self.CONTEXT_UNIT * units}\n{base.problem}", solutions=(solution,),
            answer=base.answer, source=f"long:{split}:{index}",
        )
