"""Update rules of the schedules and controllers that tune TRAPO during training (pure functions of scalars).

- `scheduled_value`: constant / linear / cosine interpolation from a start to an end value over a number of steps
  (the trust-region alpha schedule, UFT's hint-ratio anneal).
- `adaptive_kl_coef`: the classic PPO adaptive KL controller (Ziegler et al. 2019): the coefficient is multiplied
  by 1 + clip(KL / target - 1, -0.2, 0.2) * steps / horizon, so it grows when the policy drifts faster than the
  target and shrinks when it drifts slower.
- `adaptive_alpha`: the same proportional, clipped multiplicative controller for TrSFT's alpha, holding the share
  of expert-prefix tokens outside the trust region (p < alpha) near a target: too many outside lowers alpha (their
  gradients are attenuated), too few raises it. TRAPO.md: the TrSFT optimum prunes expert modes with probability
  below alpha, so the share outside is the knob users reason about.
- `pooled_mean`: the measurement a controller acts on when every rank measured a mean over its own tokens: the mean
  over all ranks' tokens, so ranks agree and the decision is the one a single process would take on the same data.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from enum import Enum


class ScheduleShape(str, Enum):
    constant = "constant"
    linear = "linear"
    cosine = "cosine"


def scheduled_value(step: int, start: float, end: float, steps: int, shape: ScheduleShape) -> float:
    """`start` at step 0, `end` from step `steps` on; linear or half-cosine in between; `start` throughout if
    constant."""
    shape = ScheduleShape(shape)
    if steps < 0:
        raise ValueError(f"schedule length must be >= 0 steps, got {steps}")
    if shape is ScheduleShape.constant:
        return start
    if step >= steps:
        return end
    progress = max(step, 0) / steps
    if shape is ScheduleShape.linear:
        return start + (end - start) * progress
    return end + (start - end) * 0.5 * (1.0 + math.cos(math.pi * progress))


def adaptive_kl_coef(coef: float, kl: float, target: float, horizon: float, steps: int = 1) -> float:
    """PPO's adaptive KL coefficient after `steps` optimizer steps at measured per-token `kl`."""
    if target <= 0 or horizon <= 0:
        raise ValueError(f"target KL and horizon must be > 0, got {target} and {horizon}")
    error = min(max(kl / target - 1.0, -0.2), 0.2)
    return coef * (1.0 + error * steps / horizon)


def adaptive_alpha(
    alpha: float, outside: float, target: float, gain: float, low: float, high: float
) -> float:
    """TrSFT alpha after one step at measured share `outside` of expert tokens with p < alpha.

    alpha * exp(-gain * clip(outside - target, -0.2, 0.2)), kept in [low, high]."""
    if not 0 < low <= high <= 1:
        raise ValueError(f"alpha bounds must satisfy 0 < low <= high <= 1, got {low}, {high}")
    error = min(max(outside - target, -0.2), 0.2)
    return min(max(alpha * math.exp(-gain * error), low), high)


def pooled_mean(means: Sequence[float], counts: Sequence[float]) -> float | None:
    """The mean over all tokens of all ranks, from each rank's mean over its own `counts[r]` tokens:
    sum(means * counts) / sum(counts). A rank without tokens adds nothing (whatever its mean says); None when no
    rank had any, i.e. nothing was measured."""
    if len(means) != len(counts) or any(c < 0 for c in counts):
        raise ValueError(f"need one count >= 0 per mean, got means {list(means)} and counts {list(counts)}")
    total = sum(counts)
    if total == 0:
        return None
    return sum(m * c for m, c in zip(means, counts) if c) / total
