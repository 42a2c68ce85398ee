"""avg@k and unbiased pass@k over n sampled answers per problem (TRAPO.md, "Results": AIME24 and AMC avg@32,
others pass@1).

avg@n is the share of correct samples when every problem gets n of them. pass@k is the chance that at least one of
k samples drawn without replacement from the n is correct; Chen et al. (2021, "Evaluating Large Language Models
Trained on Code") estimate it without bias from c correct out of n as

    pass@k = 1 - C(n - c, k) / C(n, k) = 1 - prod_{i = n - c + 1}^{n} (1 - k / i)

The product form never builds the binomials (they leave the float range from n ~ 1030 on, and their exact integers
grow with n); each of its factors lies in [0, 1]. Note pass@1 = c / n, so pass@1 and avg@n agree; they differ only
for k > 1.

The metrics keep sums (estimate or correct-sample totals, and counts), each reduced with "sum" across processes,
so a metric over several ranks equals the metric over all their problems at once, whatever each rank's share.
"""

from __future__ import annotations

import math

import torch
from torchmetrics import Metric


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k of one problem with `c` correct answers among `n` samples (1 <= k <= n, 0 <= c <= n)."""
    if not 1 <= k <= n:
        raise ValueError(f"pass@k needs 1 <= k <= n samples, got k={k}, n={n}; lower k or raise model.val_samples")
    if not 0 <= c <= n:
        raise ValueError(f"the number of correct samples must be in [0, n={n}], got {c}")
    if n - c < k:  # every k-subset holds a correct sample
        return 1.0
    return 1.0 - math.prod(1.0 - k / i for i in range(n - c + 1, n + 1))


class PassAtK(Metric):
    """Mean unbiased pass@k over problems. `update(correct, samples)`: correct samples per problem, [P]."""

    full_state_update = False
    higher_is_better = True
    is_differentiable = False

    def __init__(self, k: int, **kwargs) -> None:
        super().__init__(**kwargs)
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        self.k = k
        self.add_state("estimate_sum", torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("problems", torch.tensor(0, dtype=torch.int64), dist_reduce_fx="sum")

    def update(self, correct: torch.Tensor, samples: int) -> None:
        estimates = [pass_at_k(samples, int(c), self.k) for c in correct.tolist()]
        self.estimate_sum += sum(estimates)
        self.problems += len(estimates)

    def compute(self) -> torch.Tensor:
        return self.estimate_sum / self.problems


class AverageAtK(Metric):
    """avg@k: the share of correct samples over all problems' k samples each. `update(correct, samples)`: correct
    samples per problem, [P], out of `samples` each."""

    full_state_update = False
    higher_is_better = True
    is_differentiable = False

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.add_state("correct", torch.tensor(0, dtype=torch.int64), dist_reduce_fx="sum")
        self.add_state("samples", torch.tensor(0, dtype=torch.int64), dist_reduce_fx="sum")

    def update(self, correct: torch.Tensor, samples: int) -> None:
        if correct.numel() and not 0 <= int(correct.min()) <= int(correct.max()) <= samples:
            raise ValueError(f"correct counts must lie in [0, {samples}], got {correct.tolist()}")
        self.correct += int(correct.sum())
        self.samples += correct.numel() * samples

    def compute(self) -> torch.Tensor:
        return self.correct.double() / self.samples
