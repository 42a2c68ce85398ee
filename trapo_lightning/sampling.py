"""Per-prompt sampling in micro-groups (TRAPO.md, "Per-prompt sampling: micro-groups").

For every prompt of the step, micro-groups are sampled in sequence. Before micro-group i the guidance rule looks at
the rewards of all earlier samples of each prompt and picks an expert-prefix ratio per prompt (0 = unguided). A
ratio of 1.0 makes the whole expert solution (+EOS) the response, so nothing is generated for it.

Sampling runs in rounds: one engine call and one grading call per round, batched over the prompts. A prompt's
round holds its next micro-group and every later one whose decision no longer depends on rewards still to come:
under the paper's rule a prompt that fails its first four rollouts (mean 0 < 0.5) will be guided in the other
three micro-groups whatever they score (at most 2/6 < 0.7, 3/7 < 0.9), so all three go in one round. The
decisions are exactly the sequential rule's; what changes is the number of engine round trips, each as long as
its longest rollout: early in training, when most prompts fail, two instead of three.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

import torch
from transformers import PreTrainedTokenizerBase

from trapo_lightning.data.records import PromptRecord
from trapo_lightning.guidance import GuidanceRule
from trapo_lightning.prefix import PrefixCut, TokenBreaks, prefix_end, token_breaks
from trapo_lightning.reward import RewardResult, Verdict
from trapo_lightning.rollout.base import RolloutEngine, RolloutRequest, SamplingParams
from trapo_lightning.seeding import derive_seed

Grader = Callable[[Sequence[str], Sequence[str]], list[RewardResult]]


@dataclass(frozen=True)
class Sample:
    """One rollout: the prompt, the expert prefix it started from (maybe empty) and the policy's continuation."""

    prompt_index: int
    micro_group: int
    prefix_ratio: float
    prompt_ids: tuple[int, ...]
    response_ids: tuple[int, ...]
    """Expert prefix ids followed by the policy's own ids."""
    prefix_len: int
    rollout_logprobs: tuple[float, ...]
    """Sampler log-probs of the policy's own ids (none for the expert prefix)."""
    finished: bool
    reward: float
    verdict: Verdict

    @property
    def guided(self) -> bool:
        return self.prefix_len > 0


class ExpertPrefixer:
    """Token ids of a record's expert prefix at a given ratio: always a prefix of one solution's own ids, cut in
    token space and snapped to a paragraph break (`prefix_end`). The solution is the one the ratio uses
    (`PromptRecord.trace_ids`): the primary for partial prefixes, the second, where the record has one, for the
    whole solution (ratio 1), as in the authors' code. All rollouts of one micro-group of a prompt share one ratio,
    so they share one prefix, which is what the prefix loss mask counts once (trapo_lightning/masks.py)."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, cut: PrefixCut | None = None) -> None:
        self.tokenizer = tokenizer
        self.cut = cut or PrefixCut()
        # Each vocabulary entry's text, decoded once (~1 s for Qwen's 152k entries, 8 MB): looking up a 6k-token
        # solution's texts takes 0.1 ms, where decoding them token by token in one batch call takes 10 ms.
        self._pieces = tokenizer.batch_decode([[i] for i in range(len(tokenizer))], clean_up_tokenization_spaces=False)

    def __call__(self, record: PromptRecord, ratio: float) -> tuple[int, ...]:
        ids = record.trace_ids(ratio)
        if ratio <= 0.0:
            return ()
        if ratio >= 1.0:
            return ids + (self.tokenizer.eos_token_id,)
        return ids[: prefix_end(len(ids), self.breaks(ids), ratio, self.cut)]

    def breaks(self, solution_ids: Sequence[int]) -> TokenBreaks:
        """The paragraph and line breaks of a solution, from the text of each of its tokens."""
        return token_breaks([self._pieces[i] for i in solution_ids])


def sample_micro_groups(
    records: Sequence[PromptRecord],
    guidance: GuidanceRule,
    engine: RolloutEngine,
    grade: Grader,
    prefixer: ExpertPrefixer,
    params: SamplingParams,
    max_response_tokens: int,
) -> list[list[Sample]]:
    """All G samples of every prompt, in micro-group order: `result[p]` holds prompt p's samples.

    A grader that declares `reward_range = (low, high)` (`MathVerifyReward`: 0 and 1) lets settled micro-groups go
    out early (`decided_micro_groups`), and a reward outside its range is an error; one that declares none is
    sampled micro-group by micro-group.
    """
    reward_range = getattr(grade, "reward_range", None)
    samples: list[list[Sample]] = [[] for _ in records]
    next_group = [0] * len(records)
    round_index = 0
    while any(index < len(guidance.micro_groups) for index in next_group):
        jobs = []  # (prompt, micro-group, ratio), one per rollout, in micro-group order within each prompt
        for p, row in enumerate(samples):
            if next_group[p] == len(guidance.micro_groups):
                continue
            decided = decided_micro_groups(guidance, [s.reward for s in row], next_group[p], reward_range)
            for index, ratio in decided:
                jobs += [(p, index, ratio)] * guidance.micro_groups[index].size
            next_group[p] = decided[-1][0] + 1
        round_params = params if params.seed is None else replace(params, seed=derive_seed(params.seed, round_index))
        for sample in _sample_jobs(records, jobs, engine, grade, prefixer, round_params, max_response_tokens):
            _check_reward(sample, reward_range, records)
            samples[sample.prompt_index].append(sample)
        round_index += 1
    return samples


def decided_micro_groups(
    guidance: GuidanceRule, prior: Sequence[float], start: int, reward_range: tuple[float, float] | None = (0.0, 1.0)
) -> list[tuple[int, float]]:
    """`(micro-group, prefix ratio)` of micro-group `start` and of the later ones already decided.

    Micro-group `start` is decided by the `prior` rewards (all of its earlier samples). A later one is decided when
    the rule gives the same ratio whether every pending rollout scores the lowest or the highest reward of
    `reward_range`; for a rule monotone in the earlier rewards (`GuidanceRule.monotone_in_rewards`) every
    score in between then gives it too. That holds only for rewards inside the range: without a declared range
    (None) nothing is looked ahead, and micro-groups go one at a time.
    """
    micro_groups = guidance.micro_groups

    def ratio(index: int, rewards: Sequence[float]) -> float:
        return float(guidance.prefix_ratios(index, torch.tensor([list(rewards)], dtype=torch.float32)))  # [1, k]

    decided = [(start, ratio(start, prior))]
    if not guidance.monotone_in_rewards or reward_range is None:
        return decided
    lowest, highest = reward_range
    pending = micro_groups[start].size
    for index in range(start + 1, len(micro_groups)):
        low, high = ratio(index, [*prior, *[lowest] * pending]), ratio(index, [*prior, *[highest] * pending])
        if low != high:
            break
        decided.append((index, low))
        pending += micro_groups[index].size
    return decided


def _check_reward(sample: Sample, reward_range: tuple[float, float] | None, records: Sequence[PromptRecord]) -> None:
    if reward_range is not None and not reward_range[0] <= sample.reward <= reward_range[1]:
        raise ValueError(
            f"the reward gave {sample.reward} for a completion of {records[sample.prompt_index].source or 'a prompt'}, "
            f"outside the range it declares, {reward_range}; guidance decisions that look ahead rely on it. Fix the "
            "reward, or declare its true range (reward_range) or none (None: micro-groups are then sampled one by one)"
        )


def _sample_jobs(records, jobs, engine, grade, prefixer, params, max_response_tokens) -> list[Sample]:
    cuts = {(p, ratio): prefixer(records[p], ratio) for p, _, ratio in jobs}  # one cut per prompt and ratio
    prefixes = [cuts[p, ratio] for p, _, ratio in jobs]
    to_generate = [i for i, (_, _, ratio) in enumerate(jobs) if ratio < 1.0]
    requests = [
        RolloutRequest(records[jobs[i][0]].prompt_ids + prefixes[i], max_response_tokens - len(prefixes[i]))
        for i in to_generate
    ]
    generations = dict(zip(to_generate, engine.generate(requests, params)))
    responses, logprobs, finished = [], [], []
    for i, prefix in enumerate(prefixes):
        gen = generations.get(i)
        responses.append(prefix + tuple(gen.token_ids) if gen else prefix)
        logprobs.append(tuple(gen.logprobs) if gen else ())
        finished.append(gen.finished if gen else True)
    texts = prefixer.tokenizer.batch_decode([list(r) for r in responses], skip_special_tokens=True)
    results = grade(texts, [records[p].answer for p, _, _ in jobs])
    return [
        Sample(p, micro_group, ratio, records[p].prompt_ids, responses[i], len(prefixes[i]), logprobs[i],
               finished[i], results[i].reward, results[i].verdict)
        for i, (p, micro_group, ratio) in enumerate(jobs)
    ]
