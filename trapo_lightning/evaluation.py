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


class EvalProtocol:
    """How validation and test score a model: the paper's protocol (TRAPO.md, "Results") by default.

    Every benchmark's problems get `samples` answers each (or their own count from `samples_per_benchmark`, e.g. 32 for
    AIME24 and AMC, the paper's avg@32) at `temperature` and `top_p`, within the run's response budget
    (`model.max_response_tokens`); `{stage}/{benchmark}/avg@n` is the share correct, `pass@k` the unbiased estimate for
    each k of `pass_at_k` that a benchmark's n allows. `averages` names groups of benchmarks whose avg@n is averaged,
    logged as `{stage}/{name}`: the paper's `math_avg` over AIME24, AMC, MATH-500, Minerva and OlympiadBench (LUFFY
    adds AIME25), and `ood_avg` over ARC-c and MMLU-Pro.
    """

    def __init__(
        self,
        temperature: float = 0.6,
        top_p: float = 1.0,
        samples: int = 1,
        pass_at_k: tuple[int, ...] = (1,),
        samples_per_benchmark: dict[str, int] | None = None,
        averages: dict[str, list[str]] | None = None,
    ) -> None:
        """
        Args:
            temperature: Sampling temperature of the answers (paper: 0.6).
            top_p: Nucleus sampling threshold (paper: 1.0).
            samples: Answers per problem, n of avg@n and pass@k, for benchmarks not in `samples_per_benchmark`
                (paper: 1, pass@1).
            pass_at_k: The k of pass@k logged per benchmark; a k above a benchmark's n is left out for it.
            samples_per_benchmark: Answers per problem by benchmark name, e.g. {aime24: 32, amc: 32} (the paper's
                avg@32).
            averages: Benchmark groups averaged into one number each, e.g. {math_avg: [aime24, amc, math500,
                minerva, olympiad], ood_avg: [arc_c, mmlu_pro]}; logged as `{stage}/<name>`.
        """
        per_benchmark = dict(samples_per_benchmark or {})
        if samples < 1 or any(n < 1 for n in per_benchmark.values()):
            raise ValueError(f"samples must be >= 1 everywhere, got {samples} and {per_benchmark}")
        if not pass_at_k or len(set(pass_at_k)) < len(pass_at_k) or min(pass_at_k) < 1:
            raise ValueError(f"pass_at_k must hold distinct k >= 1, got {list(pass_at_k)}")
        if 1 not in pass_at_k:
            raise ValueError(f"pass_at_k must include 1 (pass@1 = avg@n, what every benchmark reports), got {pass_at_k}")
        if temperature <= 0 or not 0 < top_p <= 1:
            raise ValueError(f"need temperature > 0 and top_p in (0, 1], got {temperature} and {top_p}")
        self.temperature, self.top_p = temperature, top_p
        self.samples, self.pass_at_k = samples, tuple(sorted(pass_at_k))
        self.samples_per_benchmark = per_benchmark
        self.averages = {name: list(members) for name, members in (averages or {}).items()}
        if any(not members for members in self.averages.values()):
            raise ValueError(f"every average needs at least one benchmark, got {self.averages}")

    def samples_for(self, benchmark: str) -> int:
        return self.samples_per_benchmark.get(benchmark, self.samples)

    def pass_at_k_for(self, benchmark: str) -> tuple[int, ...]:
        return tuple(k for k in self.pass_at_k if k <= self.samples_for(benchmark))

    def check_benchmarks(self, names: list[str]) -> None:
        """A clear error for a per-benchmark setting or an average that names no benchmark of the data."""
        unknown = sorted({*self.samples_per_benchmark, *(m for ms in self.averages.values() for m in ms)} - set(names))
        if unknown:
            raise ValueError(
                f"model.evaluation names benchmarks {unknown} that data.benchmarks does not have ({names}); fix the "
                "names in samples_per_benchmark / averages or add the benchmarks"
            )
