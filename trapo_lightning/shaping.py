"""DAPO's (Yu et al., 2025) dynamic-sampling filter and overlong handling, as options of the RL term (issue 12).

- Dynamic sampling: a prompt whose G rewards are all equal has advantage 0 on every sample (Dr.GRPO: r - mean r),
  so its policy tokens carry no RL signal but still count in a token-mean normaliser and the entropy bonus. With
  `drop_uniform_groups` their policy tokens leave the RL term altogether and the prompts are counted. DAPO refills
  the batch by sampling more prompts; here the batch just gets smaller. Under TRAPO such a group is rare when the
  policy fails (the full expert solution earns 1, so the group is not uniform) and common when it always succeeds.
  Its expert-prefix tokens, if any, keep their TrSFT loss: the SFT term does not depend on the advantage.
- Overlong: a completion cut by the response budget has no final answer and so reward 0, a penalty for length
  rather than for being wrong. `mask` drops the policy tokens of truncated completions from the RL term (their
  rewards still count in their group's mean); `soft` adds DAPO's length penalty to the reward used for advantages:
  0 up to `max - buffer` tokens, then linearly down to -1 at the budget. Guidance decisions use the verifier's reward
  as before; only advantages see the penalty. Rows without policy tokens (the whole expert solution) are exempt.
"""

from __future__ import annotations

from enum import Enum

import torch
from torch import Tensor


class Overlong(str, Enum):
    """What happens to completions that ran out of response budget."""

    none = "none"
    mask = "mask"
    soft = "soft"


def uniform_groups(rewards: Tensor) -> Tensor:
    """`[P]` bool: prompts whose `[P, G]` rewards are all equal (zero advantage for every sample)."""
    return (rewards == rewards[:, :1]).all(dim=1)


def overlong_penalty(lengths: Tensor, max_tokens: int, buffer: int) -> Tensor:
    """DAPO's soft overlong punishment of `[N]` response lengths: 0 up to `max_tokens - buffer`, then
    ((max_tokens - buffer) - length) / buffer, down to -1 at `max_tokens` (and never below)."""
    if not 0 < buffer <= max_tokens:
        raise ValueError(f"the overlong buffer must be in (0, max_tokens = {max_tokens}], got {buffer}")
    start = max_tokens - buffer
    return ((start - lengths.float()).clamp(max=0.0) / buffer).clamp(min=-1.0)


class DapoShaping:
    """DAPO's dynamic-sampling filter and overlong handling (see the module docstring); a `model.dapo` setting."""

    def __init__(
        self, drop_uniform_groups: bool = False, overlong: Overlong = Overlong.none, overlong_buffer: int = 4096
    ) -> None:
        """
        Args:
            drop_uniform_groups: Drop the policy tokens of prompts whose rewards are all equal from the RL term
                (they have zero advantage) and count those prompts (`train/uniform_groups`).
            overlong: none; mask (truncated completions carry no RL loss); or soft (DAPO's length penalty on the
                reward used for advantages, over the last `overlong_buffer` tokens of the budget).
            overlong_buffer: Tokens before the response budget where the soft penalty ramps from 0 to -1 (DAPO: 4096
                of 20480).
        """
        if overlong_buffer < 1:
            raise ValueError(f"overlong_buffer must be >= 1, got {overlong_buffer}")
        self.drop_uniform_groups = drop_uniform_groups
        self.overlong = Overlong(overlong)
        self.overlong_buffer = overlong_buffer

    def advantage_rewards(self, rewards: Tensor, lengths: Tensor, generated: Tensor, max_tokens: int) -> Tensor:
        """`[P, G]` rewards for the advantages: with `soft`, plus the length penalty of rows that `generated`."""
        if self.overlong is not Overlong.soft:
            return rewards
        penalty = overlong_penalty(lengths, max_tokens, min(self.overlong_buffer, max_tokens))  # [P, G]
        return rewards + torch.where(generated, penalty, 0.0)

    def rl_rows(self, rewards: Tensor, finished: Tensor) -> Tensor:
        """`[P, G]` bool: samples whose policy tokens stay in the RL term."""
        keep = torch.ones_like(finished)
        if self.drop_uniform_groups:
            keep &= ~uniform_groups(rewards)[:, None]
        if self.overlong is Overlong.mask:
            keep &= finished
        return keep
