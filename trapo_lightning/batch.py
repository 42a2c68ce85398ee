"""From samples to the padded tensors of one training forward, micro-batch by micro-batch.

One optimizer step's samples go through forward and backward in micro-batches (`micro_batches`), each built and
padded on its own (`build_train_batch`): a micro-batch is as wide as its own longest sequence, never the step's.
With a token budget, rows are sorted by length and packed so that rows x width stays within it, as verl's dynamic
batch size does: at the paper's shape (8k-token responses, most answers far shorter) a 300-token answer no longer
costs a ~9k-token forward and backward.

Within a micro-batch, prompts are left-padded to a common width and responses right-padded after them, so every
response starts at the same column: the log-probs of the response tokens are then the last T + 1 positions of the
forward, and one slice serves every row. Position ids count real tokens only, as in generation, so the trainer
scores exactly the sequence the sampler saw.

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
    input_ids: torch.Tensor  # [N, Wp + T]
    attention_mask: torch.Tensor  # [N, Wp + T]
    position_ids: torch.Tensor  # [N, Wp + T]
    targets: torch.Tensor  # [N, T] response ids (pad where masked out)
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
    def prompt_width(self) -> int:
        return self.input_ids.shape[1] - self.response_width

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
    prompt_width = max(len(s.prompt_ids) for s in samples)
    width = max(1, max(len(s.response_ids) for s in samples))
    n = len(samples)
    input_ids = torch.full((n, prompt_width + width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros_like(input_ids)
    for row, s in enumerate(samples):
        start = prompt_width - len(s.prompt_ids)
        end = prompt_width + len(s.response_ids)
        input_ids[row, start:end] = torch.tensor(s.prompt_ids + s.response_ids, dtype=torch.long)
        attention_mask[row, start:end] = 1
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
        targets=input_ids[:, prompt_width:],
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

    A micro-batch's forward is `rows x (longest prompt + longest response)` tokens wide (`padded_tokens`).
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
    longest_prompt = longest_response = 0
    for i in order:
        prompt, response = max(longest_prompt, prompt_lengths[i]), max(longest_response, response_lengths[i], 1)
        if current and (len(current) == max_rows or (len(current) + 1) * (prompt + response) > max_tokens):
            batches.append(current)
            current, prompt, response = [], prompt_lengths[i], max(1, response_lengths[i])
        current.append(i)
        longest_prompt, longest_response = prompt, response
    if current:
        batches.append(current)
    return batches


def padded_tokens(prompt_lengths: Sequence[int], response_lengths: Sequence[int]) -> int:
    """Tokens one micro-batch of these rows sends through the forward: rows x (longest prompt + longest response)."""
    return len(prompt_lengths) * (max(prompt_lengths) + max(1, max(response_lengths)))
