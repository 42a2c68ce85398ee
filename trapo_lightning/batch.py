"""From samples to the padded tensors of one training forward, micro-batch by micro-batch.

One optimizer step's samples go through forward and backward in micro-batches (`micro_batches`), each built and
padded on its own (`build_train_batch`): a micro-batch is as wide as its own longest sequence, never the step's.
With a token budget, rows are sorted by length and packed so that rows x width stays within it, as verl's dynamic
batch size does: at the paper's shape (8k-token responses, most answers far shorter) a 300-token answer no longer
costs a ~9k-token forward and backward.

Within a micro-batch each row is its prompt followed by its response, right-padded to the longest row: the
forward's width is the longest prompt + response, so rows packed by total length waste little (a layout that
left-pads prompts to a common column would pay the longest prompt plus the longest response: on a long-tailed mix
at the 7B shape, 0.79 of the tokens are real against 0.94, `benchmarks/real_shape.py --padding`). Response token j
of row i is predicted at position `prompt_lengths[i] - 1 + j`. Position ids count real tokens from 0, as in
generation, so the trainer scores exactly the sequence the sampler saw.

Which rows carry the SFT loss of a shared expert prefix (`masks.prefix_loss_carriers`) is decided over the whole
step, before it is split, so a prefix is counted once however its micro-group's rows are spread.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch

from trapo_lightning.masks import prefix_loss_carriers, response_masks
from trapo_lightning.sampling import Sample


class TrainBatch(NamedTuple):
    input_ids: torch.Tensor  # [N, W] prompt + response, right-padded
    attention_mask: torch.Tensor  # [N, W]
    position_ids: torch.Tensor  # [N, W]
    prompt_lengths: torch.Tensor  # [N] long: row i's response starts at column prompt_lengths[i]
    targets: torch.Tensor  # [N, T] response ids, right-padded (pad where masked out)
    expert_mask: torch.Tensor  # [N, T] bool: expert-prefix tokens that carry the SFT loss
    policy_mask: torch.Tensor  # [N, T] bool: the policy's own tokens (RL loss)
    advantages: torch.Tensor  # [N]
    rollout_logp: torch.Tensor  # [N, T] the sampler's log-probs of the policy's own tokens (0 elsewhere)
    prompt_index: torch.Tensor  # [N] long: which prompt of the step the row belongs to (rows of one group share it)
    old_logp: torch.Tensor | None = None  # [N, T] log pi_old of the policy's own tokens, when not the forward's own

    @property
    def response_width(self) -> int:
        return self.targets.shape[1]

    @property
    def response_mask(self) -> torch.Tensor:
        """`[N, T]` bool: real response tokens (not padding)."""
        lengths = self.attention_mask.sum(dim=1) - self.prompt_lengths  # [N]
        return torch.arange(self.response_width, device=lengths.device)[None, :] < lengths[:, None]

    def predicting_positions(self) -> torch.Tensor:
        """`[N, T]` long: the column whose output predicts each response token (clamped into the row for padding)."""
        positions = self.prompt_lengths[:, None] - 1 + torch.arange(self.response_width, device=self.targets.device)
        return positions.clamp(max=self.input_ids.shape[1] - 1)

    def to(self, device: torch.device) -> TrainBatch:
        return TrainBatch(*(None if t is None else t.to(device) for t in self))


def step_prefix_carriers(samples: Sequence[Sample]) -> torch.Tensor:
    """`[N]` bool: which of the step's samples carry the SFT loss of their (prompt, micro-group)'s shared prefix."""
    return prefix_loss_carriers(
        torch.tensor([s.prompt_index for s in samples], dtype=torch.long),
        torch.tensor([s.micro_group for s in samples], dtype=torch.long),
        torch.tensor([s.prefix_len for s in samples], dtype=torch.long),
    )


def build_train_batch(
    samples: Sequence[Sample],
    advantages: torch.Tensor,
    pad_id: int,
    carries_prefix_loss: torch.Tensor | None = None,
    keeps_policy_loss: torch.Tensor | None = None,
    old_logprobs: Sequence[Sequence[float]] | None = None,
) -> TrainBatch:
    """The padded batch of `samples`, with `advantages` `[N]` in the same order.

    `carries_prefix_loss` `[N]` says which rows carry their shared prefix's SFT loss; pass the step-wide decision
    (`step_prefix_carriers`) when `samples` are one micro-batch of a step. Default: decided among `samples`.
    `keeps_policy_loss` `[N]`: rows whose policy tokens carry the RL loss (default all; DAPO's filters drop some).
    `old_logprobs`: per sample, log pi_old of its policy tokens (default: none, the forward's own are used).
    """
    width = max(1, max(len(s.response_ids) for s in samples))
    n = len(samples)
    input_ids = torch.full((n, max(len(s.prompt_ids) + len(s.response_ids) for s in samples)), pad_id, dtype=torch.long)
    attention_mask = torch.zeros_like(input_ids)
    targets = torch.full((n, width), pad_id, dtype=torch.long)
    for row, s in enumerate(samples):
        sequence = s.prompt_ids + s.response_ids
        input_ids[row, : len(sequence)] = torch.tensor(sequence, dtype=torch.long)
        attention_mask[row, : len(sequence)] = 1
        targets[row, : len(s.response_ids)] = torch.tensor(s.response_ids, dtype=torch.long)
    position_ids = (attention_mask.cumsum(dim=1) - 1).clamp(min=0)
    carriers = step_prefix_carriers(samples) if carries_prefix_loss is None else carries_prefix_loss
    prefix_len = torch.tensor([s.prefix_len for s in samples])
    masks = response_masks(prefix_len, torch.tensor([len(s.response_ids) for s in samples]), carriers, width)
    policy_mask = masks.policy if keeps_policy_loss is None else masks.policy & keeps_policy_loss[:, None]
    rollout_logp = _policy_token_values(samples, [s.rollout_logprobs for s in samples], width)
    return TrainBatch(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=position_ids,
        prompt_lengths=torch.tensor([len(s.prompt_ids) for s in samples], dtype=torch.long),
        targets=targets,
        expert_mask=masks.expert,
        policy_mask=policy_mask,
        advantages=advantages.float(),
        rollout_logp=rollout_logp,
        prompt_index=torch.tensor([s.prompt_index for s in samples], dtype=torch.long),
        old_logp=None if old_logprobs is None else _policy_token_values(samples, old_logprobs, width),
    )


def _policy_token_values(samples: Sequence[Sample], values: Sequence[Sequence[float]], width: int) -> torch.Tensor:
    """`[N, width]` float32: each sample's values at its policy tokens (after its prefix), 0 elsewhere."""
    out = torch.zeros((len(samples), width))
    for row, (s, row_values) in enumerate(zip(samples, values)):
        out[row, s.prefix_len : s.prefix_len + len(row_values)] = torch.tensor(row_values, dtype=torch.float32)
    return out


def micro_batches(
    prompt_lengths: Sequence[int], response_lengths: Sequence[int], max_rows: int, max_tokens: int | None = None
) -> list[list[int]]:
    """Row indices of each micro-batch of one optimizer step; every row in exactly one micro-batch.

    A micro-batch's forward is `rows x its longest prompt + response` tokens (`padded_tokens`).
    - `max_tokens` None: runs of `max_rows` consecutive rows, in step order (a prompt's group stays together, which
      the shared prompt forward exploits).
    - `max_tokens` set: rows sorted longest first (prompt + response; ties in step order), packed greedily while the
      micro-batch stays within `max_tokens` and `max_rows`. A row longer than the budget goes alone.
    """
    if max_rows < 1:
        raise ValueError(f"max_rows must be >= 1, got {max_rows}")
    if max_tokens is not None and max_tokens < 1:
        raise ValueError(f"max_tokens must be >= 1 or None, got {max_tokens}")
    if len(prompt_lengths) != len(response_lengths):
        raise ValueError(f"{len(prompt_lengths)} prompt lengths but {len(response_lengths)} response lengths")
    rows = range(len(prompt_lengths))
    if max_tokens is None:
        return [list(rows[start : start + max_rows]) for start in range(0, len(rows), max_rows)]
    order = sorted(rows, key=lambda i: -(prompt_lengths[i] + max(1, response_lengths[i])))
    batches: list[list[int]] = []
    current: list[int] = []
    longest = 0  # the first row of a micro-batch is its longest: rows come longest first
    for i in order:
        if current and (len(current) == max_rows or (len(current) + 1) * longest > max_tokens):
            batches.append(current)
            current = []
        if not current:
            longest = prompt_lengths[i] + max(1, response_lengths[i])
        current.append(i)
    if current:
        batches.append(current)
    return batches


def padded_tokens(prompt_lengths: Sequence[int], response_lengths: Sequence[int]) -> int:
    """Tokens one micro-batch of these rows sends through the forward: rows x its longest prompt + response."""
    return len(prompt_lengths) * max(p + max(1, r) for p, r in zip(prompt_lengths, response_lengths))
