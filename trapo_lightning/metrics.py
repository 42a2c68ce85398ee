"""What a step logs, computed from the samples and the per-micro-batch loss records, and what an evaluation logs.

`train/reward` is the mean reward of unguided samples, the number the paper reports; `train/accuracy` counts
every sample the loss saw, guided ones included. Guidance is logged as the share of samples at each prefix
ratio, and the trust-region diagnostic as the share of expert-prefix tokens with p < alpha.

An evaluation samples n answers per problem of a benchmark; its metrics are `{stage}/{benchmark}/...` (stage `val`
or `test`), and `{stage}/...` for the default benchmark, the training source's held-out split, so the default
config keeps `val/accuracy`. They are torchmetrics `Metric`s with sum states, accumulated over the epoch and
reduced across ranks by summing: exact whatever each rank's share of the problems (a mean of per-rank means is not).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch
from torchmetrics.aggregation import MeanMetric

from trapo_lightning.evaluation import AverageAtK, PassAtK
from trapo_lightning.losses import LossTerms
from trapo_lightning.reward import RewardResult, Verdict
from trapo_lightning.rollout.base import Generation
from trapo_lightning.sampling import Sample

HELD_OUT = "val"
"""Name of the default benchmark: the training source's held-out split, whose metrics keep the short names."""
_FAILURES = (Verdict.wrong, Verdict.unparseable, Verdict.timeout)


def _mean(values: Sequence[float]) -> float:
    return sum(values) / len(values) if values else 0.0


def _weighted(values: Sequence[float], weights: Sequence[float]) -> float:
    total = sum(weights)
    return sum(v * w for v, w in zip(values, weights)) / total if total else 0.0


def step_metrics(samples: Sequence[Sample], updates: Sequence[Sequence[LossTerms]]) -> dict[str, float]:
    """The step's sample statistics, and its loss statistics averaged over its updates (one per optimizer step,
    each a list of micro-batch records)."""
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
    per_update = [_loss_metrics(losses) for losses in updates]
    metrics.update({key: _mean([m[key] for m in per_update]) for key in per_update[0]})
    return metrics


def _loss_metrics(losses: Sequence[LossTerms]) -> dict[str, float]:
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
        "train/expert_nll": _weighted([float(l.expert_nll) for l in losses], expert),
        "train/rollout_is_mean": _weighted([float(l.rollout_is_mean) for l in losses], policy),
        "train/rollout_is_rejected": _weighted([float(l.rollout_is_rejected) for l in losses], policy),
        "train/expert_tokens": sum(expert),
        "train/rl_tokens": sum(policy),  # the weight of the per-token means over policy tokens (kl_per_token, ...)
    }


def metric_prefix(stage: str, benchmark: str) -> str:
    """`val/aime24` for benchmark `aime24` in stage `val`; just `val` for the default held-out split."""
    return stage if benchmark == HELD_OUT else f"{stage}/{benchmark}"


class Evaluation(NamedTuple):
    """One evaluation batch: `samples` graded generations per problem, problem-major (problem i's are
    `results[i * samples : (i + 1) * samples]`)."""

    results: list[RewardResult]
    generations: list[Generation]
    samples: int

    def correct_per_problem(self) -> torch.Tensor:
        correct = torch.tensor([r.verdict is Verdict.correct for r in self.results], dtype=torch.int64)
        return correct.view(-1, self.samples).sum(dim=1)  # [P]


class BenchmarkMetrics(torch.nn.ModuleDict):
    """One benchmark's epoch metrics: `accuracy` and `avg@n` (the share of correct samples; the same number under
    its everyday and its paper name), `pass@k` per k, and per-sample means: `response_length`,
    `truncated_fraction` and the share of each failing verdict. With `expert_nll`, also the mean -log p per token
    of the problems' expert solutions (+EOS) under the policy, teacher-forced: the held-out SFT loss, on which an
    SFT stage is trained to convergence."""

    def __init__(self, samples: int, pass_at_k: Sequence[int], expert_nll: bool = False) -> None:
        super().__init__()
        self.samples = samples
        self.pass_at_k = tuple(pass_at_k)
        self["accuracy"] = AverageAtK()
        self[f"avg@{samples}"] = AverageAtK()
        for k in self.pass_at_k:
            self[f"pass@{k}"] = PassAtK(k)
        for name in ("response_length", "truncated_fraction", *(f"{v.value}_fraction" for v in _FAILURES)):
            self[name] = MeanMetric()
        if expert_nll:
            self["expert_nll"] = MeanMetric()

    def update_expert_nll(self, nll: torch.Tensor, tokens: torch.Tensor) -> None:
        """`[P]` summed -log p of each problem's expert tokens and `[P]` their counts."""
        self["expert_nll"].update(nll / tokens.clamp(min=1), weight=tokens)

    def update(self, evaluation: Evaluation) -> None:
        if evaluation.samples != self.samples:
            raise ValueError(f"these metrics count {self.samples} samples per problem, got {evaluation.samples}")
        correct = evaluation.correct_per_problem()  # [P]
        self["accuracy"].update(correct, self.samples)
        self[f"avg@{self.samples}"].update(correct, self.samples)
        for k in self.pass_at_k:
            self[f"pass@{k}"].update(correct, self.samples)
        self._mean("response_length", [len(g.token_ids) for g in evaluation.generations])
        self._mean("truncated_fraction", [not g.finished for g in evaluation.generations])
        for verdict in _FAILURES:
            self._mean(f"{verdict.value}_fraction", [r.verdict is verdict for r in evaluation.results])

    def _mean(self, name: str, values: list) -> None:
        metric = self[name]
        metric.update(torch.tensor(values, dtype=torch.float32, device=metric.device))

    def results(self, prefix: str) -> dict[str, float]:
        """Every metric over what was seen on all ranks, named `{prefix}/{metric}`."""
        return {f"{prefix}/{name}": float(metric.compute()) for name, metric in self.items()}
