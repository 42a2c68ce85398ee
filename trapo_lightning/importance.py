"""Rollout importance-sampling correction of the RL term (issue 12): the sampler is not pi_old.

The RL loss treats the policy's tokens as drawn from pi_old, but they were drawn by the rollout engine: a vLLM copy of
the weights that lags the policy (refreshed every n > 1 steps, `max_rollout_staleness`), runs in bf16 against a
float32 trainer, or uses other kernels. The importance weight pi_old / pi_rollout, from the sampler's own log-probs,
corrects for that on the policy's tokens (expert-prefix tokens keep TrSFT: their behaviour policy is the expert, not
the sampler). Raw weights have unbounded variance, so they are bounded, as in TRL's
`vllm_importance_sampling_correction`, verl's `rollout_is` and NeMo-RL / prime-rl:
- level `token`: w_t = pi_old(y_t) / pi_rollout(y_t); level `sequence`: w = prod_t of those, one per sequence;
- mode `truncate` (TIS): w = min(w, cap); mode `mask` (MIS): tokens (or whole sequences) with w outside
  [lower, cap] get weight 0, the others keep w.
Weights are constants (detached). Computed in log space, so a sequence-level product over 8k tokens cannot overflow.
"""

from __future__ import annotations

import math
from enum import Enum
from typing import NamedTuple

import torch
from torch import Tensor


class ISLevel(str, Enum):
    """What one importance weight covers."""

    token = "token"
    sequence = "sequence"


class ISMode(str, Enum):
    """How weights outside the trusted range are bounded."""

    truncate = "truncate"
    mask = "mask"


class ImportanceWeights(NamedTuple):
    weights: Tensor
    """`[B, T]` float32 weight of each policy token (0 elsewhere), detached."""
    rejected: Tensor
    """`[B, T]` bool: policy tokens whose weight was truncated (truncate) or set to 0 (mask)."""


def rollout_importance_weights(
    old_logp: Tensor,
    rollout_logp: Tensor,
    policy_mask: Tensor,
    level: ISLevel = ISLevel.token,
    mode: ISMode = ISMode.truncate,
    cap: float = 2.0,
    lower: float | None = None,
) -> ImportanceWeights:
    """Bounded importance weights pi_old / pi_rollout of the policy's tokens.

    Args:
        old_logp: `[B, T]` log pi_old of the sampled tokens (the trainer's).
        rollout_logp: `[B, T]` the sampler's log-probs of the same tokens.
        policy_mask: `[B, T]` bool, the policy's own tokens.
        level: one weight per token, or one per sequence (the product over its policy tokens).
        mode: truncate at `cap`, or mask weights outside `[lower, cap]`.
        cap: upper bound, >= 1.
        lower: lower bound of the mask mode, in (0, 1] (default 1 / cap); unused by truncate.
    """
    if cap < 1.0:
        raise ValueError(f"the importance-weight cap must be >= 1, got {cap}")
    lower = 1.0 / cap if lower is None else lower
    if not 0.0 < lower <= 1.0:
        raise ValueError(f"the importance-weight lower bound must be in (0, 1], got {lower}")
    log_ratio = torch.where(policy_mask, old_logp.detach() - rollout_logp.detach(), 0.0).float()  # [B, T]
    if ISLevel(level) is ISLevel.sequence:
        log_ratio = log_ratio.sum(dim=1, keepdim=True).expand_as(log_ratio)  # [B, T]: the sequence's on each token
    log_cap = math.log(cap)
    if ISMode(mode) is ISMode.truncate:
        rejected = policy_mask & (log_ratio > log_cap)
        weights = log_ratio.clamp(max=log_cap).exp()
    else:
        rejected = policy_mask & ((log_ratio > log_cap) | (log_ratio < math.log(lower)))
        weights = torch.where(rejected, 0.0, log_ratio.clamp(max=log_cap).exp())
    return ImportanceWeights(torch.where(policy_mask, weights, 0.0), rejected)


class RolloutCorrection:
    """Importance-sampling correction of the RL term for rollouts that were not drawn from pi_old (see the module
    docstring); a `model.loss` setting."""

    def __init__(
        self, level: ISLevel = ISLevel.token, mode: ISMode = ISMode.truncate, cap: float = 2.0,
        lower: float | None = None,
    ) -> None:
        """
        Args:
            level: token (one weight per token) or sequence (the product over the sequence's policy tokens).
            mode: truncate (TIS: w = min(w, cap)) or mask (MIS: weights outside [lower, cap] become 0).
            cap: Upper bound of the weights, >= 1 (TRL: 3.0 for its sequence mask; verl: 2.0).
            lower: Lower bound of the mask mode, in (0, 1] (default: 1 / cap).
        """
        rollout_importance_weights(torch.zeros(1, 1), torch.zeros(1, 1), torch.ones(1, 1, dtype=torch.bool),
                                   level, mode, cap, lower)  # validates the settings
        self.level, self.mode, self.cap, self.lower = ISLevel(level), ISMode(mode), cap, lower

    def __call__(self, old_logp: Tensor, rollout_logp: Tensor, policy_mask: Tensor) -> ImportanceWeights:
        return rollout_importance_weights(old_logp, rollout_logp, policy_mask, self.level, self.mode, self.cap,
                                          self.lower)
