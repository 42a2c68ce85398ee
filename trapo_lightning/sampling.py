"""Per-prompt sampling in micro-groups (TRAPO.md, "Per-prompt sampling: micro-groups").

For every prompt of the step, micro-groups are sampled in sequence. Before micro-group i the guidance rule looks at
the rewards of all earlier samples of each prompt and picks an expert-prefix ratio per prompt (0 = unguided). The
requests of one micro-group for all prompts go to the rollout engine in one call, and are graded at once, because
the next micro-group's decision needs these rewards. A ratio of 1.0 makes the whole expert solution (+EOS) the
response, so nothing is generated for it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

import torch
from transformers import PreTrainedTokenizerBase

from trapo_lightning.data.records import PromptRecord
from trapo_lightning.guidance import GuidanceRule
from trapo_lightning.prefix import prefix_cut
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
    """Token ids of a record's expert prefix at a given ratio, cut on the solution text (paragraph-snapped)."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase) -> None:
        self.tokenizer = tokenizer

    def __call__(self, record: PromptRecord, ratio: float) -> tuple[int, ...]:
        if ratio <= 0.0:
            return ()
        text = record.solution[: prefix_cut(record.solution, ratio)]
        ids = tuple(self.tokenizer(text, add_special_tokens=False)["input_ids"])
        return ids + (self.tokenizer.eos_token_id,) if ratio >= 1.0 else ids


def sample_micro_groups(
    records: Sequence[PromptRecord],
    guidance: GuidanceRule,
    engine: RolloutEngine,
    grade: Grader,
    prefixer: ExpertPrefixer,
    params: SamplingParams,
    max_response_tokens: int,
) -> list[list[Sample]]:
    """All G samples of every prompt, in micro-group order: `result[p]` holds prompt p's samples."""
    samples: list[list[Sample]] = [[] for _ in records]
    for index, group in enumerate(guidance.micro_groups):
        prior = torch.tensor([[s.reward for s in row] for row in samples], dtype=torch.float32)  # [P, k]
        ratios = guidance.prefix_ratios(index, prior).tolist()  # [P]
        jobs = [(p, ratio) for p, ratio in enumerate(ratios) for _ in range(group.size)]
        group_params = params if params.seed is None else replace(params, seed=derive_seed(params.seed, index))
        new = _sample_jobs(records, jobs, index, engine, grade, prefixer, group_params, max_response_tokens)
        for sample in new:
            samples[sample.prompt_index].append(sample)
    return samples


def _sample_jobs(records, jobs, micro_group, engine, grade, prefixer, params, max_response_tokens) -> list[Sample]:
    shared = {job: prefixer(records[job[0]], job[1]) for job in dict.fromkeys(jobs)}  # one cut per prompt
    prefixes = [shared[job] for job in jobs]
    to_generate = [i for i, (_, ratio) in enumerate(jobs) if ratio < 1.0]
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
    results = grade(texts, [records[p].answer for p, _ in jobs])
    return [
        Sample(p, micro_group, ratio, records[p].prompt_ids, responses[i], len(prefixes[i]), logprobs[i],
               finished[i], results[i].reward, results[i].verdict)
        for i, (p, ratio) in enumerate(jobs)
    ]
