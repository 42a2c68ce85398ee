"""From samples to the padded tensors of one training forward.

Prompts are left-padded to a common width and responses right-padded after them, so every response starts at
the same column: the logits of the response tokens are then the last T + 1 positions of the forward (the model is
asked for only those, which skips the LM head over the prompt), and one slice serves every row. Position ids
count real tokens only, as in generation, so the trainer scores exactly the sequence the sampler saw.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
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

    @property
    def response_width(self) -> int:
        return self.targets.shape[1]

    @property
    def prompt_width(self) -> int:
        return self.input_ids.shape[1] - self.response_width

    def chunks(self, size: int) -> Iterator[TrainBatch]:
        """Row slices of at most `size` sequences (micro-batches of one optimizer step)."""
        for start in range(0, self.input_ids.shape[0], size):
            yield TrainBatch(*(t[start : start + size] for t in self))

    def to(self, device: torch.device) -> TrainBatch:
        return TrainBatch(*(t.to(device) for t in self))


def build_train_batch(samples: Sequence[Sample], advantages: torch.Tensor, pad_id: int) -> TrainBatch:
    """`samples` and `advantages` `[N]` in the same order."""
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
    prefix_len = torch.tensor([s.prefix_len for s in samples])
    carriers = prefix_loss_carriers(
        torch.tensor([s.prompt_index for s in samples]), torch.tensor([s.micro_group for s in samples]), prefix_len
    )
    masks = response_masks(prefix_len, torch.tensor([len(s.response_ids) for s in samples]), carriers, width)
    rollout_logp = torch.zeros((n, width))
    for row, s in enumerate(samples):
        rollout_logp[row, s.prefix_len : s.prefix_len + len(s.rollout_logprobs)] = torch.tensor(s.rollout_logprobs)
    return TrainBatch(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=position_ids,
        targets=input_ids[:, prompt_width:],
        expert_mask=masks.expert,
        policy_mask=masks.policy,
        advantages=advantages.float(),
        rollout_logp=rollout_logp,
        prompt_index=torch.tensor([s.prompt_index for s in samples], dtype=torch.long),
    )
