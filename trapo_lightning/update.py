"""The policy update of a step: the rollout batch in micro-batches, scored and backpropagated, one optimizer step
per mini-batch (issues 11 and 12).

`accumulate` runs one optimizer step's forward and backward: its rows go through `batch.micro_batches` (each padded
to its own width, optionally packed by a token budget), are scored through the chunked LM head, and each
micro-batch's loss is normalised by the whole update's totals, so the summed gradient is the full batch's exactly.

Around it, PPO's schedule (`update_rows`): `ppo_epochs` passes over the rollout batch, each split into
`mini_batches_per_step` mini-batches of whole prompts, one optimizer step each. The paper takes one (ratio 1). With
more, pi_old of the sampled tokens must be fixed before the first update: `old_logprobs` scores them with the
policy under no_grad, or, by option, they are the sampler's own log-probs.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from enum import Enum
from typing import NamedTuple

import torch
from torch import Tensor

from trapo_lightning.batch import TrainBatch, build_train_batch, micro_batches, padded_tokens
from trapo_lightning.losses import LossTerms, TrapoLoss
from trapo_lightning.sampling import Sample
from trapo_lightning.timing import PhaseTimer

Scorer = Callable[[TrainBatch], tuple[Tensor, Tensor]]  # a micro-batch -> ([b, T] log-probs, [b, T] entropies)


class OldLogpSource(str, Enum):
    """Where pi_old comes from when a rollout batch feeds several updates."""

    policy = "policy"
    rollout = "rollout"


class RolloutBatch(NamedTuple):
    """A step's training data, decided over the whole step before it is split."""

    samples: list[Sample]
    advantages: Tensor
    """`[N]` float32."""
    carriers: Tensor
    """`[N]` bool: rows that carry their shared expert prefix's SFT loss (`batch.step_prefix_carriers`)."""
    rl_rows: Tensor
    """`[N]` bool: rows whose policy tokens carry the RL loss."""
    old_logprobs: list[tuple[float, ...]] | None = None
    """Per sample, log pi_old of its policy tokens; None: each update's own forward (ratio 1 on the first)."""


@dataclass(frozen=True)
class MicroBatching:
    micro_batch_size: int
    max_tokens: int | None
    pad_id: int

    def plan(self, samples: Sequence[Sample]) -> list[list[int]]:
        return micro_batches([len(s.prompt_ids) for s in samples], [len(s.response_ids) for s in samples],
                             self.micro_batch_size, self.max_tokens)


class Totals(NamedTuple):
    """What one update's losses are normalised by: its sequences and loss tokens, as the mean over ranks."""

    num_sequences: float
    num_loss_tokens: float


class Accumulated(NamedTuple):
    """What one update's forward and backward produced."""

    losses: list[LossTerms]
    """One record per micro-batch; their losses add up to the update's loss."""
    mismatch_sum: float
    """Sum over policy tokens of |log p_trainer - log p_sampler|."""
    policy_tokens: int
    real_tokens: int
    forwarded_tokens: int
    """Tokens the forwards processed, padding included."""


def update_rows(prompt_index: Sequence[int], mini_batches: int) -> list[list[int]]:
    """Row indices of each mini-batch of one pass: the prompts in order, split into `mini_batches` equal parts,
    each with all of its prompts' rows (a prompt's group stays whole)."""
    prompts = list(dict.fromkeys(prompt_index))
    if len(prompts) % mini_batches:
        raise ValueError(
            f"{len(prompts)} prompts per step cannot be split into {mini_batches} equal mini-batches; make "
            "data.prompts_per_step a multiple of model.mini_batches_per_step"
        )
    size = len(prompts) // mini_batches
    parts = [set(prompts[k * size : (k + 1) * size]) for k in range(mini_batches)]
    return [[row for row, p in enumerate(prompt_index) if p in part] for part in parts]


def _micro_batch(data: RolloutBatch, rows: list[int], pad_id: int, device: torch.device) -> TrainBatch:
    old = None if data.old_logprobs is None else [data.old_logprobs[i] for i in rows]
    return build_train_batch(
        [data.samples[i] for i in rows], data.advantages[rows], pad_id, data.carriers[rows], data.rl_rows[rows], old
    ).to(device)


def loss_tokens(data: RolloutBatch, rows: Sequence[int]) -> int:
    """Tokens of `rows` that carry a loss: carried expert prefixes and kept policy tokens."""
    carriers, rl_rows = data.carriers.tolist(), data.rl_rows.tolist()
    return sum(
        (data.samples[i].prefix_len if carriers[i] else 0)
        + (len(data.samples[i].response_ids) - data.samples[i].prefix_len if rl_rows[i] else 0)
        for i in rows
    )


def accumulate(
    data: RolloutBatch,
    rows: list[int],
    totals: Totals,
    micro: MicroBatching,
    loss: TrapoLoss,
    max_response_tokens: int,
    score: Scorer,
    reference_score: Scorer | None,
    backward: Callable[[Tensor], None],
    device: torch.device,
    timer: PhaseTimer,
) -> Accumulated:
    """Forward and backward of one optimizer step over `rows` of the rollout batch (gradients accumulate), its
    losses normalised by `totals` (the update's counts over all ranks, `Totals`)."""
    subset = [data.samples[i] for i in rows]
    losses, mismatch, policy_tokens, forwarded = [], 0.0, 0, 0
    for local in micro.plan(subset):
        chunk_rows = [rows[i] for i in local]
        chunk = _micro_batch(data, chunk_rows, micro.pad_id, device)
        forwarded += padded_tokens([len(subset[i].prompt_ids) for i in local],
                                   [len(subset[i].response_ids) for i in local])
        with timer.phase("forward"):
            logp, entropy = score(chunk)
            ref_logp = reference_score(chunk) if reference_score is not None else None
        mismatch += float(((logp.detach() - chunk.rollout_logp).abs() * chunk.policy_mask).sum())
        policy_tokens += int(chunk.policy_mask.sum())
        terms = loss(
            logp, logp.detach() if chunk.old_logp is None else chunk.old_logp, entropy, chunk.advantages,
            chunk.expert_mask, chunk.policy_mask, ref_logp=ref_logp, rollout_logp=chunk.rollout_logp,
            max_response_tokens=max_response_tokens, **totals._asdict(),
        )
        with timer.phase("backward"):
            backward(terms.loss)
        losses.append(terms)
    real = sum(len(s.prompt_ids) + len(s.response_ids) for s in subset)
    return Accumulated(losses, mismatch, policy_tokens, real, forwarded)


@torch.no_grad()
def old_logprobs(
    data: RolloutBatch, micro: MicroBatching, score: Scorer, device: torch.device
) -> list[tuple[float, ...]]:
    """log pi_old of every sample's policy tokens, from the current policy, micro-batch by micro-batch."""
    out: list[tuple[float, ...]] = [()] * len(data.samples)
    for rows in micro.plan(data.samples):
        chunk = _micro_batch(data, rows, micro.pad_id, device)
        logp, _ = score(chunk)
        for row, i in enumerate(rows):
            sample = data.samples[i]
            out[i] = tuple(logp[row, sample.prefix_len : len(sample.response_ids)].tolist())
    return out
