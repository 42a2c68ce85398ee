"""Micro-group sampling (TRAPO.md, "Per-prompt sampling: micro-groups") with scripted rewards and rollouts.

The engine always continues with "42" + EOS and the grader returns rewards chosen per micro-group, so every
guidance decision of the paper's rule (sizes 4, 2, 1, 1; thresholds -1, 0.5, 0.7, 0.9; ratios 0, 0.25, 0.5, 1)
can be worked out by hand.
"""

import pytest
import torch

from helpers import ScriptedEngine, ScriptedGrader, tiny_qwen2
from trapo_lightning.data.records import PromptRecord
from trapo_lightning.guidance import MicroGroupGuidance, NoGuidance
from trapo_lightning.masks import prefix_loss_carriers, response_masks
from trapo_lightning.reward import Verdict
from trapo_lightning.rollout.base import RolloutRequest, SamplingParams
from trapo_lightning.sampling import ExpertPrefixer, decided_micro_groups, sample_micro_groups

# The tiny tokenizer writes each "\n\n" as one token: 44 tokens, paragraph breaks ending at tokens 8, 17, 27, 38.
SOLUTION = "1 + 2 = 3\n\n3 + 4 = 7\n\n7 + 5 = 12\n\n12 + 6 = 18\n\n\\boxed{18}"
# ratio 0.25: t = int(44 * 0.25) = 11; first break token after 11 and before 44 * 0.55 = 24.2 is 17 -> 18 tokens.
PREFIX_25, PREFIX_25_TOKENS = "1 + 2 = 3\n\n3 + 4 = 7\n\n", 18
# ratio 0.5: t = 22; first break token after 22 and before 44 * 0.8 = 35.2 is 27 -> 28 tokens.
PREFIX_50, PREFIX_50_TOKENS = "1 + 2 = 3\n\n3 + 4 = 7\n\n7 + 5 = 12\n\n", 28
MAX_RESPONSE_TOKENS = 64

# Rewards per prompt (keyed by its answer) and micro-group; the comments follow the rule "guide micro-group i
# when the mean reward of all earlier samples is < t_i".
SCRIPT = {
    # solves everything: 4/4 = 1 >= 0.5, 6/6 >= 0.7, 7/7 >= 0.9 -> never guided
    "p0": [[1, 1, 1, 1], [1, 1], [1], [1]],
    # solves nothing alone: 0/4 < 0.5 -> 0.25; 1/6 = 0.17 < 0.7 -> 0.5; 1/7 = 0.14 < 0.9 -> 1.0
    "p1": [[0, 0, 0, 0], [1, 0], [0], [1]],
    # 3/4 = 0.75 >= 0.5 -> unguided; 5/6 = 0.83 >= 0.7 -> unguided; 6/7 = 0.857 < 0.9 -> 1.0 (one miss is enough)
    "p2": [[1, 1, 1, 0], [1, 1], [1], [1]],
    # 2/4 = 0.5 is not < 0.5 -> unguided; 4/6 = 0.667 < 0.7 -> 0.5 (the paper's form; the code's `correct < 4`
    # would not guide); 5/7 = 0.714 < 0.9 -> 1.0
    "p3": [[1, 1, 0, 0], [1, 1], [1], [1]],
}
EXPECTED_RATIOS = {
    "p0": [0.0] * 8,
    "p1": [0.0] * 4 + [0.25, 0.25, 0.5, 1.0],
    "p2": [0.0] * 7 + [1.0],
    "p3": [0.0] * 6 + [0.5, 1.0],
}


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    """The embedded policy's own tokenizer, loaded back from its folder."""
    return tiny_qwen2(tmp_path_factory.mktemp("sampling") / "model").load_tokenizer()


def ids(tokenizer, text: str) -> tuple[int, ...]:
    return tuple(tokenizer(text, add_special_tokens=False)["input_ids"])


def continuation(tokenizer) -> tuple[int, ...]:
    """What the scripted engine returns: two digits (always one token each) and EOS."""
    return ids(tokenizer, "42") + (tokenizer.eos_token_id,)


def make_records(tokenizer) -> list[PromptRecord]:
    solution_ids = ids(tokenizer, SOLUTION)
    return [
        PromptRecord(ids(tokenizer, f"Problem {name}?"), f"Problem {name}?", (SOLUTION,), name, name, (solution_ids,))
        for name in SCRIPT
    ]


def expert_prefix(tokenizer, tokens: int) -> tuple[int, ...]:
    """The first `tokens` ids of the tokenized solution: an expert prefix is always a prefix of them."""
    return ids(tokenizer, SOLUTION)[:tokens]


@pytest.fixture(scope="module")
def scenario(tokenizer):
    records = make_records(tokenizer)
    engine = ScriptedEngine(continuation(tokenizer), logprob=-0.25)
    engine.bind(None, tokenizer.eos_token_id, tokenizer.pad_token_id)
    grader = ScriptedGrader(SCRIPT)
    samples = sample_micro_groups(
        records, MicroGroupGuidance(), engine, grader, ExpertPrefixer(tokenizer), SamplingParams(), MAX_RESPONSE_TOKENS
    )
    return records, engine, grader, samples


def test_each_prompt_gets_its_group_in_micro_group_order(scenario):
    records, _, _, samples = scenario
    assert len(samples) == len(records)
    for p, row in enumerate(samples):
        assert [s.prompt_index for s in row] == [p] * 8
        assert [s.micro_group for s in row] == [0, 0, 0, 0, 1, 1, 2, 3]
        assert [s.prompt_ids for s in row] == [records[p].prompt_ids] * 8


def test_prefix_ratio_of_every_sample_follows_the_rule(scenario):
    records, _, _, samples = scenario
    for record, row in zip(records, samples):
        assert [s.prefix_ratio for s in row] == EXPECTED_RATIOS[record.answer], record.answer


def test_rewards_and_verdicts_come_from_the_grader_in_sample_order(scenario):
    records, _, _, samples = scenario
    for record, row in zip(records, samples):
        expected = [float(r) for group in SCRIPT[record.answer] for r in group]
        assert [s.reward for s in row] == expected
        assert [s.verdict for s in row] == [Verdict.correct if r else Verdict.wrong for r in expected]


def test_guided_samples_start_with_the_paragraph_snapped_expert_prefix(scenario, tokenizer):
    _, _, _, samples = scenario
    generated = continuation(tokenizer)
    prefixes = {0.25: expert_prefix(tokenizer, PREFIX_25_TOKENS), 0.5: expert_prefix(tokenizer, PREFIX_50_TOKENS)}
    checked = 0
    for row in samples:
        for s in row:
            if s.prefix_ratio in prefixes:
                prefix = prefixes[s.prefix_ratio]
                assert s.prefix_len == len(prefix) > 0
                assert s.response_ids == prefix + generated
                assert s.rollout_logprobs == (-0.25,) * len(generated)  # the policy's ids only
                assert s.finished and s.guided
                checked += 1
            elif s.prefix_ratio == 0.0:
                assert s.prefix_len == 0 and not s.guided
                assert s.response_ids == generated
                assert s.rollout_logprobs == (-0.25,) * len(generated)
    assert checked == 4  # p1: two at 0.25 and one at 0.5; p3: one at 0.5


def test_ratio_one_makes_the_full_solution_plus_eos_the_response_with_nothing_generated(scenario, tokenizer):
    records, engine, grader, samples = scenario
    full = ids(tokenizer, SOLUTION) + (tokenizer.eos_token_id,)
    last = [row[-1] for row in samples]
    for s in last[1:]:  # p1, p2, p3 are guided at 1.0 in micro-group 4
        assert s.prefix_ratio == 1.0
        assert s.response_ids == full
        assert s.prefix_len == len(full)
        assert s.rollout_logprobs == ()
        assert s.finished
    # Only p0's (unguided) last rollout reached the engine ...
    assert engine.calls[3] == [RolloutRequest(records[0].prompt_ids, MAX_RESPONSE_TOKENS)]
    # ... but all four were graded, the guided ones on the expert solution itself (EOS is a special token).
    graded_last = {answer: text for call in grader.calls for text, answer in call}  # each prompt's last completion
    assert graded_last == {"p0": "42", "p1": SOLUTION, "p2": SOLUTION, "p3": SOLUTION}


def test_engine_requests_carry_prompt_plus_prefix_and_the_remaining_budget(scenario, tokenizer):
    """Rounds: each prompt's next micro-group plus every later one already decided whatever the pending rollouts
    score (each decision a threshold on the mean of all earlier rewards; pending rollouts bounded by 0 and 1)."""
    records, engine, grader, _ = scenario
    # round 1: micro-group 1 of every prompt; round 2: p0 mg2 (mg3 open: 4/6 < 0.7 <= 6/6), p1 mg2-4 (0/4 failed:
    # mg3 at most 2/6 < 0.7, mg4 at most 3/7 < 0.9), p2 mg2 (mg3 open: 3/6 < 0.7 <= 5/6), p3 mg2-4 (2/4: mg3 at
    # most 4/6 < 0.7, mg4 at most 5/7 < 0.9); round 3: p0 mg3 (mg4 open: 6/7 < 0.9 <= 7/7), p2 mg3-4 (5/6: mg4 at
    # most 6/7 < 0.9); round 4: p0 mg4. Full-solution samples (ratio 1) are graded but never generated.
    assert [len(call) for call in engine.calls] == [16, 10, 2, 1]
    assert [len(call) for call in grader.calls] == [16, 12, 3, 1]
    prompt = {r.answer: r.prompt_ids for r in records}
    p25, p50 = expert_prefix(tokenizer, PREFIX_25_TOKENS), expert_prefix(tokenizer, PREFIX_50_TOKENS)
    assert engine.calls[1] == [
        RolloutRequest(prompt["p0"], MAX_RESPONSE_TOKENS),
        RolloutRequest(prompt["p0"], MAX_RESPONSE_TOKENS),
        RolloutRequest(prompt["p1"] + p25, MAX_RESPONSE_TOKENS - len(p25)),
        RolloutRequest(prompt["p1"] + p25, MAX_RESPONSE_TOKENS - len(p25)),
        RolloutRequest(prompt["p1"] + p50, MAX_RESPONSE_TOKENS - len(p50)),
        RolloutRequest(prompt["p2"], MAX_RESPONSE_TOKENS),
        RolloutRequest(prompt["p2"], MAX_RESPONSE_TOKENS),
        RolloutRequest(prompt["p3"], MAX_RESPONSE_TOKENS),
        RolloutRequest(prompt["p3"], MAX_RESPONSE_TOKENS),
        RolloutRequest(prompt["p3"] + p50, MAX_RESPONSE_TOKENS - len(p50)),
    ]
    assert engine.calls[2] == [
        RolloutRequest(prompt["p0"], MAX_RESPONSE_TOKENS),
        RolloutRequest(prompt["p2"], MAX_RESPONSE_TOKENS),
    ]


def test_decided_micro_groups_follow_the_bounds_of_the_mean():
    rule = MicroGroupGuidance()
    # nothing earlier: micro-group 1 unguided; micro-group 2 needs its 4 rewards (0/4 < 0.5 <= 4/4)
    assert decided_micro_groups(rule, [], 0) == [(0, 0.0)]
    # 1/4 < 0.5: guided at 0.25; then at most 3/6 < 0.7 and 4/7 < 0.9: guided at 0.5 and 1.0
    assert decided_micro_groups(rule, [1, 0, 0, 0], 1) == [(1, 0.25), (2, 0.5), (3, 1.0)]
    # 4/4: unguided; micro-group 3 open (4/6 < 0.7 <= 6/6)
    assert decided_micro_groups(rule, [1, 1, 1, 1], 1) == [(1, 0.0)]
    # a rule that is not a threshold on the mean is asked one micro-group at a time
    assert decided_micro_groups(NoGuidance(8), [], 0) == [(0, 0.0)]


def test_the_look_ahead_uses_the_graders_declared_reward_range():
    rule = MicroGroupGuidance()
    # 2/4 = 0.5 is not < 0.5: micro-group 1 unguided. With rewards in [0, 1] micro-group 2 is settled: its mean lies
    # in [2/6, 4/6] < 0.7, guided at 0.5, and so is micro-group 3 (at most 5/7 < 0.9). With rewards up to 2 it is
    # not: (2 + 2 x 2) / 6 = 1 >= 0.7.
    assert decided_micro_groups(rule, [1, 1, 0, 0], 1, (0.0, 1.0)) == [(1, 0.0), (2, 0.5), (3, 1.0)]
    assert decided_micro_groups(rule, [1, 1, 0, 0], 1, (0.0, 2.0)) == [(1, 0.0)]
    # no declared range: one micro-group at a time
    assert decided_micro_groups(rule, [1, 0, 0, 0], 1, None) == [(1, 0.25)]


def test_a_reward_in_a_wider_range_gets_the_sequential_rule_s_decisions(tokenizer):
    """Prompt p3's second micro-group earns 2 (a grader with a bonus, range [0, 2]): the mean of its first six
    rewards is (1 + 1 + 0 + 0 + 2 + 2) / 6 = 1 >= 0.7, so micro-group 2 is unguided. Looking ahead as if rewards
    were in [0, 1] would have guided it (at most 4/6 < 0.7)."""
    records = [r for r in make_records(tokenizer) if r.answer == "p3"]
    engine = ScriptedEngine(continuation(tokenizer))
    engine.bind(None, tokenizer.eos_token_id, tokenizer.pad_token_id)
    grader = ScriptedGrader({"p3": [[1, 1, 0, 0], [2, 2], [1], [1]]}, reward_range=(0.0, 2.0))
    (row,) = sample_micro_groups(records, MicroGroupGuidance(), engine, grader, ExpertPrefixer(tokenizer),
                                 SamplingParams(), MAX_RESPONSE_TOKENS)
    # mg 3: (6 + 1) / 7 = 1 >= 0.9, unguided too
    assert [s.prefix_ratio for s in row] == [0.0] * 8


def test_a_reward_outside_the_declared_range_is_an_error(tokenizer):
    records = [r for r in make_records(tokenizer) if r.answer == "p3"]
    engine = ScriptedEngine(continuation(tokenizer))
    engine.bind(None, tokenizer.eos_token_id, tokenizer.pad_token_id)
    grader = ScriptedGrader({"p3": [[1, 1, 0, 0], [2, 2], [1], [1]]}, reward_range=(0.0, 1.0))
    with pytest.raises(ValueError, match=r"the reward gave 2 .* outside the range it declares, \(0.0, 1.0\)"):
        sample_micro_groups(records, MicroGroupGuidance(), engine, grader, ExpertPrefixer(tokenizer),
                            SamplingParams(), MAX_RESPONSE_TOKENS)


def test_a_continuation_cut_by_the_budget_is_not_finished(tokenizer):
    # The 0.25 prefix leaves room for exactly the two digits, not for the EOS.
    budget = PREFIX_25_TOKENS + 2
    records = make_records(tokenizer)[1:2]
    engine = ScriptedEngine(continuation(tokenizer))
    engine.bind(None, tokenizer.eos_token_id, tokenizer.pad_token_id)
    grader = ScriptedGrader({"p1": SCRIPT["p1"]})
    (row,) = sample_micro_groups(
        records, MicroGroupGuidance(), engine, grader, ExpertPrefixer(tokenizer), SamplingParams(), budget
    )
    guided = [s for s in row if s.prefix_ratio == 0.25]
    assert [s.response_ids for s in guided] == [expert_prefix(tokenizer, PREFIX_25_TOKENS) + ids(tokenizer, "42")] * 2
    assert not any(s.finished for s in guided)
    assert all(s.finished for s in row[:4])  # unguided: "42" + EOS fits


def test_expert_prefixer_cuts_on_paragraphs_and_ends_the_full_solution_with_eos(tokenizer):
    prefixer = ExpertPrefixer(tokenizer)
    record = make_records(tokenizer)[0]
    assert prefixer(record, 0.0) == ()
    assert prefixer(record, 0.25) == expert_prefix(tokenizer, PREFIX_25_TOKENS)
    assert prefixer(record, 0.5) == expert_prefix(tokenizer, PREFIX_50_TOKENS)
    full = prefixer(record, 1.0)
    assert full[-1] == tokenizer.eos_token_id
    assert full == ids(tokenizer, SOLUTION) + (tokenizer.eos_token_id,)
    # the prefix is cut from the solution's ids at a paragraph break: it decodes to the snapped text
    assert tokenizer.decode(prefixer(record, 0.25)) == PREFIX_25
    assert tokenizer.decode(prefixer(record, 0.5)) == PREFIX_50
    assert tokenizer.decode(full, skip_special_tokens=True) == SOLUTION


# -- two expert solutions: prefixes from the primary, the whole-solution micro-group from the second -----------------
# Another expert's shorter work on the same sum: 16 tokens ("1", "2", " +", " ", "6", " ", "=", " ", "1", "8", "\n\n",
# "\\boxed", "{", "1", "8", "}"), 17 with EOS, where SOLUTION is 44.
SECOND = "12 + 6 = 18\n\n\\boxed{18}"


def two_solution_records(tokenizer) -> list[PromptRecord]:
    second = ids(tokenizer, SECOND)
    return [
        PromptRecord(r.prompt_ids, r.problem, (SOLUTION, SECOND), r.answer, r.source, (r.solution_ids, second))
        for r in make_records(tokenizer)
    ]


def test_the_prefixer_cuts_partial_prefixes_from_the_primary_and_the_whole_from_the_second(tokenizer):
    prefixer = ExpertPrefixer(tokenizer)
    record = two_solution_records(tokenizer)[0]
    assert prefixer(record, 0.0) == ()
    assert prefixer(record, 0.25) == expert_prefix(tokenizer, PREFIX_25_TOKENS)  # as with one solution
    assert prefixer(record, 0.5) == expert_prefix(tokenizer, PREFIX_50_TOKENS)
    assert prefixer(record, 1.0) == ids(tokenizer, SECOND) + (tokenizer.eos_token_id,)
    # with one solution, every ratio uses it (today's behaviour)
    assert prefixer(make_records(tokenizer)[0], 1.0) == ids(tokenizer, SOLUTION) + (tokenizer.eos_token_id,)


def sample_tensors(row) -> dict[str, torch.Tensor]:
    """One prompt's samples as the [B] tensors the masks take."""
    return {
        "prompt": torch.tensor([s.prompt_index for s in row]),
        "micro_group": torch.tensor([s.micro_group for s in row]),
        "prefix_len": torch.tensor([s.prefix_len for s in row]),
        "response_len": torch.tensor([len(s.response_ids) for s in row]),
    }


def expert_tokens_counted(row) -> int:
    """Expert tokens that carry the SFT loss in one prompt's group, from the real masks."""
    t = sample_tensors(row)
    carriers = prefix_loss_carriers(t["prompt"], t["micro_group"], t["prefix_len"])
    width = int(t["response_len"].max())
    return int(response_masks(t["prefix_len"], t["response_len"], carriers, width).expert.sum())


def test_two_solutions_change_only_the_whole_solution_samples(tokenizer, scenario):
    _, _, _, one_solution = scenario
    engine = ScriptedEngine(continuation(tokenizer), logprob=-0.25)
    engine.bind(None, tokenizer.eos_token_id, tokenizer.pad_token_id)
    grader = ScriptedGrader(SCRIPT)
    records = two_solution_records(tokenizer)
    samples = sample_micro_groups(
        records, MicroGroupGuidance(), engine, grader, ExpertPrefixer(tokenizer), SamplingParams(), MAX_RESPONSE_TOKENS
    )
    second = ids(tokenizer, SECOND) + (tokenizer.eos_token_id,)
    for row, before in zip(samples, one_solution):
        assert [s.prefix_ratio for s in row] == [s.prefix_ratio for s in before]  # same rewards, same decisions
        for s, b in zip(row, before):
            if s.prefix_ratio == 1.0:
                assert (s.response_ids, s.prefix_len, s.rollout_logprobs) == (second, len(second), ())
            else:
                assert s == b
    graded_last = {answer: text for call in grader.calls for text, answer in call}
    assert graded_last == {"p0": "42", "p1": SECOND, "p2": SECOND, "p3": SECOND}
    # the masks count each micro-group's prefix once, whichever solution it came from. p1 is guided at 0.25 (two
    # rollouts share the 18-token prefix), 0.5 (28 tokens) and 1.0 (SECOND + EOS, 17 tokens): 18 + 28 + 17 = 63;
    # with one solution the last is SOLUTION + EOS, 45 tokens: 18 + 28 + 45 = 91
    p1 = next(i for i, r in enumerate(records) if r.answer == "p1")
    assert len(second) == 17
    assert expert_tokens_counted(samples[p1]) == 63
    assert expert_tokens_counted(one_solution[p1]) == 18 + 28 + 45


def test_rollouts_of_one_micro_group_share_one_solution_and_its_loss_once(tokenizer):
    # two rollouts always guided by the whole solution (as FixedPrefix(prefix_ratio=1.0) builds it): both are the
    # second solution + EOS, and only the first carries its SFT loss
    guidance = MicroGroupGuidance(sizes=[2, 2], thresholds=[-1.0, float("inf")], prefix_ratios=[0.0, 1.0])
    engine = ScriptedEngine(continuation(tokenizer))
    engine.bind(None, tokenizer.eos_token_id, tokenizer.pad_token_id)
    records = [r for r in two_solution_records(tokenizer) if r.answer == "p1"]
    (row,) = sample_micro_groups(records, guidance, engine, ScriptedGrader({"p1": [[0, 0], [1, 1]]}),
                                 ExpertPrefixer(tokenizer), SamplingParams(), MAX_RESPONSE_TOKENS)
    second = ids(tokenizer, SECOND) + (tokenizer.eos_token_id,)
    assert [s.response_ids for s in row[2:]] == [second, second]
    t = sample_tensors(row)
    assert prefix_loss_carriers(t["prompt"], t["micro_group"], t["prefix_len"]).tolist() == [False, False, True, False]
    assert expert_tokens_counted(row) == len(second) == 17
