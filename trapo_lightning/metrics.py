"""What a step logs, computed from the samples and the per-micro-batch loss records.

`train/reward` is the mean reward of unguided samples, the number the paper reports; `train/accuracy` counts
every sample the loss saw, guided ones included. Guidance is logged as the share of samples at each prefix
ratio, and the trust-region diagnostic as the share of expert-prefix tokens with p < alpha.
"""

from __future__ import annotations

from collections.abc import Sequence

from trapo_lightning.losses import TrapoLoss
from trapo_lightning.reward import RewardResult, Verdict
from trapo_lightning.rollout.base import Generation
from trapo_lightning.sampling import Sample


def _mean(values: Sequence[float]) -> float:
    return sum(values) / len(values) if values else 0.0


def _weighted(values: Sequence[float], weights: Sequence[float]) -> float:
    total = sum(weights)
    return sum(v * w for v, w in zip(values, weights)) / total if total else 0.0


def step_metrics(samples: Sequence[Sample], losses: Sequence[TrapoLoss]) -> dict[str, float]:
    unguided = [s.reward for s in samples if not s.guided]
    metrics = {
        "train/reward": _mean(unguided),
        "train/accuracy": _mean([float(s.verdict is Verdict.correct) for s in samples]),
        "train/reward_all": _mean([s.reward for s in samples]),
        "train/guided_fraction": _mean([float(s.guided) for s in samples]),
        "train/response_length": _mean([float(len(s.response_ids)) for s in samples]),
        "train/policy_tokens": _mean([float(len(s.response_ids) - s.prefix_len) for s in samples]),
        "train/truncated_fraction": _mean([float(not s.finished) for s in samples]),
    }
    for ratio in sorted({s.prefix_ratio for s in samples}):
        metrics[f"train/guidance_{ratio:.2f}"] = _mean([float(s.prefix_ratio == ratio) for s in samples])
    for verdict in (Verdict.wrong, Verdict.unparseable, Verdict.timeout):
        metrics[f"train/{verdict.value}_fraction"] = _mean([float(s.verdict is verdict) for s in samples])
    metrics.update(_loss_metrics(losses))
    return metrics


def _loss_metrics(losses: Sequence[TrapoLoss]) -> dict[str, float]:
    """Micro-batch losses are normalised by step totals, so sums add up; ratios are token-weighted."""
    expert = [float(l.expert_tokens) for l in losses]
    policy = [float(l.policy_tokens) for l in losses]
    return {
        "train/loss": sum(float(l.loss.detach()) for l in losses),
        "train/sft_loss": sum(float(l.sft_loss) for l in losses),
        "train/policy_loss": sum(float(l.policy_loss) for l in losses),
        "train/kl": sum(float(l.kl) for l in losses),
        "train/kl_per_token": _weighted([float(l.kl_per_token) for l in losses], policy),
        "train/entropy": _weighted([float(l.entropy) for l in losses], [e + p for e, p in zip(expert, policy)]),
        "train/outside_trust_region": _weighted([float(l.outside_trust_region) for l in losses], expert),
        "train/clip_fraction": _weighted([float(l.clip_fraction) for l in losses], policy),
        "train/expert_tokens": sum(expert),
    }


def validation_metrics(results: Sequence[RewardResult], generations: Sequence[Generation], split: str) -> dict:
    metrics = {
        f"{split}/accuracy": _mean([float(r.verdict is Verdict.correct) for r in results]),
        f"{split}/response_length": _mean([float(len(g.token_ids)) for g in generations]),
        f"{split}/truncated_fraction": _mean([float(not g.finished) for g in generations]),
    }
    for verdict in (Verdict.wrong, Verdict.unparseable, Verdict.timeout):
        metrics[f"{split}/{verdict.value}_fraction"] = _mean([float(r.verdict is verdict) for r in results])
    return metrics
