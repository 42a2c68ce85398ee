"""Micro-group guidance rule, TRAPO.md "Per-prompt sampling: micro-groups".

The G rollouts of a prompt are sampled in micro-groups (paper: sizes 4, 2, 1, 1). Before micro-group i, the mean
reward of all earlier samples of the prompt (guided ones included) is compared with the threshold t_i: below it,
the micro-group's rollouts continue an expert prefix of ratio L_i; otherwise they are sampled unguided. So help
arrives only where the policy is failing, and grows (L = 0.25, 0.5, 1.0) the longer it keeps failing.

Choices:
- `MicroGroupGuidance` compares `mean < t` (the paper's text, the default). The released code counts correct
  samples instead (`CorrectCountGuidance`: after 4, guide if correct < 2; after 6, if correct < 4; after 7, if
  correct < 7). The two agree after 4 and 7 samples but not after 6: mean < 0.7 guides at exactly 4 of 6 (0.667),
  correct < 4 does not. The paper's numbers came from the released code, so from the count rule.
- The mean over zero earlier samples is defined as 0.0, so a first micro-group with threshold -1 is never
  guided, and one with a positive threshold is always guided.
- The rule is a pure function of rewards so the rollout loop can call it between micro-groups, and an ablation
  swaps the `GuidanceRule` (e.g. `NoGuidance` is plain GRPO) rather than branching on flags.
"""

import abc
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class MicroGroup:
    """One micro-group: `size` rollouts, guided at `prefix_ratio` if the prior mean reward is below `threshold`."""

    size: int
    threshold: float
    prefix_ratio: float


def micro_group_prefix_ratios(prior_rewards: Tensor, threshold: float, prefix_ratio: float) -> Tensor:
    """Prefix ratio of one micro-group for each prompt.

    Args:
        prior_rewards: `[P, k]` rewards of the k earlier samples of each prompt; k may be 0, whose mean is 0.0.
        threshold: guide a prompt when its mean prior reward is strictly below this.
        prefix_ratio: the expert-prefix ratio given to guided prompts.

    Returns:
        `[P]` float32: `prefix_ratio` for guided prompts, 0.0 for unguided ones.
    """
    if prior_rewards.dim() != 2:
        raise ValueError(f"prior_rewards must be [P, k], got shape {tuple(prior_rewards.shape)}")
    prior_rewards = prior_rewards.float()  # [P, k]
    num_prompts, num_prior = prior_rewards.shape
    if num_prior == 0:
        mean_reward = prior_rewards.new_zeros(num_prompts)  # [P]
    else:
        mean_reward = prior_rewards.mean(dim=1)  # [P]
    guided = mean_reward < threshold  # [P]
    return torch.where(guided, prefix_ratio, 0.0).to(torch.float32)


class GuidanceRule(abc.ABC):
    """Decides, micro-group by micro-group, which prompts' rollouts continue an expert prefix and how long."""

    @property
    @abc.abstractmethod
    def micro_groups(self) -> tuple[MicroGroup, ...]:
        """The micro-groups in sampling order."""

    monotone_in_rewards: bool = False
    """True when each micro-group's decision is a threshold on a statistic that never decreases as any earlier
    reward grows (their mean, the count of correct ones): it is then settled once both extremes of the pending
    rewards agree, which lets sampling batch settled micro-groups into one round."""

    @property
    def group_size(self) -> int:
        """Total rollouts per prompt, G."""
        return sum(micro_group.size for micro_group in self.micro_groups)

    @abc.abstractmethod
    def prefix_ratios(self, index: int, prior_rewards: Tensor) -> Tensor:
        """`[P]` prefix ratios (0.0 = unguided) for micro-group `index`, given `[P, k]` earlier rewards. Each row must
        be decided by its own rewards alone: sampling asks one prompt at a time."""

    def _check_call(self, index: int, prior_rewards: Tensor) -> MicroGroup:
        """Returns micro-group `index` after checking that `prior_rewards` holds exactly its earlier samples."""
        if not 0 <= index < len(self.micro_groups):
            raise ValueError(f"micro-group index must be in [0, {len(self.micro_groups)}), got {index}")
        if prior_rewards.dim() != 2:
            raise ValueError(f"prior_rewards must be [P, k], got shape {tuple(prior_rewards.shape)}")
        num_prior = sum(micro_group.size for micro_group in self.micro_groups[:index])
        if prior_rewards.shape[1] != num_prior:
            raise ValueError(
                f"micro-group {index} follows {num_prior} samples per prompt, "
                f"but prior_rewards has {prior_rewards.shape[1]}"
            )
        return self.micro_groups[index]


class MicroGroupGuidance(GuidanceRule):
    """TRAPO's adaptive guidance: micro-groups with reward thresholds and growing expert-prefix ratios."""

    monotone_in_rewards = True

    def __init__(
        self,
        sizes: Sequence[int] = (4, 2, 1, 1),
        thresholds: Sequence[float] = (-1.0, 0.5, 0.7, 0.9),
        prefix_ratios: Sequence[float] = (0.0, 0.25, 0.5, 1.0),
    ) -> None:
        """Builds the micro-groups; the defaults are the paper's (TRAPO.md).

        Args:
            sizes: rollouts per micro-group, in sampling order; they sum to the group size G.
            thresholds: guide micro-group i when the mean reward of all earlier samples is below thresholds[i];
                -1 never guides (rewards are in [0, 1]).
            prefix_ratios: fraction of the expert solution given as prefix to a guided micro-group i, in [0, 1];
                1.0 makes the whole expert solution the response (a record's second solution where it has one,
                trapo_lightning/data/records.py).
        """
        if not len(sizes) == len(thresholds) == len(prefix_ratios):
            raise ValueError(
                "sizes, thresholds and prefix_ratios need one entry per micro-group, got lengths "
                f"{len(sizes)}, {len(thresholds)}, {len(prefix_ratios)}"
            )
        if len(sizes) == 0:
            raise ValueError("at least one micro-group is needed")
        if any(size < 1 for size in sizes):
            raise ValueError(f"every micro-group size must be >= 1, got {tuple(sizes)}")
        if any(not 0.0 <= ratio <= 1.0 for ratio in prefix_ratios):
            raise ValueError(f"every prefix ratio must be in [0, 1], got {tuple(prefix_ratios)}")
        self._micro_groups = tuple(
            MicroGroup(int(size), float(threshold), float(ratio))
            for size, threshold, ratio in zip(sizes, thresholds, prefix_ratios)
        )

    @property
    def micro_groups(self) -> tuple[MicroGroup, ...]:
        return self._micro_groups

    def prefix_ratios(self, index: int, prior_rewards: Tensor) -> Tensor:
        micro_group = self._check_call(index, prior_rewards)
        return micro_group_prefix_ratios(prior_rewards, micro_group.threshold, micro_group.prefix_ratio)


class NoGuidance(GuidanceRule):
    """Plain GRPO: one unguided micro-group holding the whole group."""

    def __init__(self, group_size: int = 8) -> None:
        """Builds the single micro-group.

        Args:
            group_size: rollouts per prompt, G.
        """
        if group_size < 1:
            raise ValueError(f"group_size must be >= 1, got {group_size}")
        self._micro_groups = (MicroGroup(int(group_size), -1.0, 0.0),)

    @property
    def micro_groups(self) -> tuple[MicroGroup, ...]:
        return self._micro_groups

    def prefix_ratios(self, index: int, prior_rewards: Tensor) -> Tensor:
        self._check_call(index, prior_rewards)
        return torch.zeros(prior_rewards.shape[0], dtype=torch.float32, device=prior_rewards.device)


def correct_count_prefix_ratios(prior_rewards: Tensor, min_correct: int, prefix_ratio: float) -> Tensor:
    """Prefix ratio of one micro-group for each prompt under the count rule.

    Args:
        prior_rewards: `[P, k]` rewards of the k earlier samples of each prompt; a reward >= 1 is a correct sample.
        min_correct: guide a prompt when fewer than this many earlier samples are correct.
        prefix_ratio: the expert-prefix ratio given to guided prompts.

    Returns:
        `[P]` float32: `prefix_ratio` for guided prompts, 0.0 for unguided ones.
    """
    if prior_rewards.dim() != 2:
        raise ValueError(f"prior_rewards must be [P, k], got shape {tuple(prior_rewards.shape)}")
    correct = (prior_rewards >= 1.0).sum(dim=1)  # [P]
    return torch.where(correct < min_correct, prefix_ratio, 0.0).to(torch.float32)


class CorrectCountGuidance(GuidanceRule):
    """TRAPO's micro-groups with the released code's integer rule: guide micro-group i when fewer than
    `min_correct[i]` earlier samples are correct (the code's `correct < 2 / 4 / 7` after 4 / 6 / 7 samples)."""

    monotone_in_rewards = True

    def __init__(
        self,
        sizes: Sequence[int] = (4, 2, 1, 1),
        min_correct: Sequence[int] = (0, 2, 4, 7),
        prefix_ratios: Sequence[float] = (0.0, 0.25, 0.5, 1.0),
    ) -> None:
        """Builds the micro-groups; the defaults are the released code's.

        Args:
            sizes: rollouts per micro-group, in sampling order; they sum to the group size G.
            min_correct: guide micro-group i when fewer than min_correct[i] earlier samples are correct (0 never
                guides); at most the number of earlier samples.
            prefix_ratios: fraction of the expert solution given as prefix to a guided micro-group i, in [0, 1].
        """
        groups = MicroGroupGuidance(sizes, [0.0] * len(min_correct), prefix_ratios).micro_groups  # validates
        earlier = 0
        for index, (group, count) in enumerate(zip(groups, min_correct)):
            if not 0 <= count <= earlier:
                raise ValueError(
                    f"min_correct[{index}] must be in [0, {earlier}] (the samples before micro-group {index}), "
                    f"got {count}"
                )
            earlier += group.size
        self._micro_groups = groups
        self.min_correct = tuple(int(count) for count in min_correct)

    @property
    def micro_groups(self) -> tuple[MicroGroup, ...]:
        return self._micro_groups

    def prefix_ratios(self, index: int, prior_rewards: Tensor) -> Tensor:
        micro_group = self._check_call(index, prior_rewards)
        return correct_count_prefix_ratios(prior_rewards, self.min_correct[index], micro_group.prefix_ratio)
