"""`build_train_batch`: hand-made samples to the padded tensors of one training forward, checked by hand."""

import torch

from trapo_lightning.batch import TrainBatch, build_train_batch, micro_batches, padded_tokens, step_prefix_carriers
from trapo_lightning.reward import Verdict
from trapo_lightning.sampling import Sample

PAD = 0
P0 = (11, 12, 13)  # prompt 0: 3 tokens
P1 = (31, 32, 33, 34, 35)  # prompt 1: 5 tokens -> prompt width Wp = 5


def sample(prompt_index, micro_group, ratio, prompt, response, prefix_len) -> Sample:
    policy_tokens = len(response) - prefix_len
    return Sample(prompt_index, micro_group, ratio, prompt, response, prefix_len, (-1.0,) * policy_tokens, True,
                  0.0, Verdict.wrong)


SAMPLES = [
    sample(0, 0, 0.0, P0, (21, 22, 23, 24), 0),  # A: unguided, 4 policy tokens
    sample(1, 1, 0.25, P1, (41, 42, 51, 52, 53), 2),  # B: first guided of (prompt 1, mg 1): carries the prefix
    sample(1, 1, 0.25, P1, (41, 42, 61), 2),  # C: same prefix, same (prompt, mg): no prefix loss
    sample(1, 3, 1.0, P1, (41, 42, 43, 44), 4),  # D: full solution, no policy tokens; alone in (1, 3)
    sample(0, 1, 0.25, P0, (71, 81), 1),  # E: (prompt 0, mg 1) is another pair: carries its own prefix
]
ADVANTAGES = torch.tensor([0.5, -0.25, -0.25, 0.75, 0.0], dtype=torch.float64)


def build() -> TrainBatch:
    return build_train_batch(SAMPLES, ADVANTAGES, PAD)


def test_each_row_is_its_prompt_then_its_response_right_padded():
    batch = build()
    # W = 10 (B: 5 prompt + 5 response tokens), T = 5 (longest response)
    expected = torch.tensor([
        [11, 12, 13, 21, 22, 23, 24, PAD, PAD, PAD],
        [31, 32, 33, 34, 35, 41, 42, 51, 52, 53],
        [31, 32, 33, 34, 35, 41, 42, 61, PAD, PAD],
        [31, 32, 33, 34, 35, 41, 42, 43, 44, PAD],
        [11, 12, 13, 71, 81, PAD, PAD, PAD, PAD, PAD],
    ])
    assert torch.equal(batch.input_ids, expected)
    assert torch.equal(batch.attention_mask, (expected != PAD).long())
    assert batch.prompt_lengths.tolist() == [3, 5, 5, 5, 3]
    assert batch.response_width == 5


def test_position_ids_count_real_tokens_only():
    batch = build()
    for row, s in enumerate(SAMPLES):
        real = batch.attention_mask[row].bool()
        count = len(s.prompt_ids) + len(s.response_ids)
        assert batch.position_ids[row][real].tolist() == list(range(count))  # from 0, as in generation


def test_response_token_j_is_predicted_at_prompt_length_minus_one_plus_j():
    batch = build()
    # row A: prompt 3 tokens: columns 2, 3, 4, 5 predict its 4 response tokens; the 5th (padding) clamps to 6
    assert batch.predicting_positions()[0].tolist() == [2, 3, 4, 5, 6]
    # row B: prompt 5: columns 4..8; its last token sits at column 9 and predicts nothing
    assert batch.predicting_positions()[1].tolist() == [4, 5, 6, 7, 8]
    # row E: prompt 3, response 2
    assert batch.predicting_positions()[4].tolist() == [2, 3, 4, 5, 6]
    for row in range(5):  # the column after each predicting position holds the target
        for j in range(int(batch.response_mask[row].sum())):
            assert batch.input_ids[row, batch.predicting_positions()[row, j] + 1] == batch.targets[row, j]


def test_targets_are_the_responses_right_padded():
    batch = build()
    assert batch.targets.tolist()[2] == [41, 42, 61, PAD, PAD]
    assert batch.response_mask.tolist()[2] == [True, True, True, False, False]


def test_expert_mask_only_on_the_first_guided_sample_of_a_prompt_and_micro_group():
    batch = build()
    expected = torch.tensor([
        [0, 0, 0, 0, 0],  # A: unguided
        [1, 1, 0, 0, 0],  # B: carries the shared 2-token prefix
        [0, 0, 0, 0, 0],  # C: same prefix as B, not counted again
        [1, 1, 1, 1, 0],  # D: the whole response is expert
        [1, 0, 0, 0, 0],  # E: its own (prompt, micro-group)
    ], dtype=torch.bool)
    assert batch.expert_mask.dtype == torch.bool
    assert torch.equal(batch.expert_mask, expected)
    # 2 + 4 + 1 expert tokens carry the SFT loss; C's copy of B's prefix is not among them
    assert int(batch.expert_mask.sum()) == 7


def test_policy_mask_covers_the_continuation_after_the_prefix():
    batch = build()
    expected = torch.tensor([
        [1, 1, 1, 1, 0],  # A: all 4 of its tokens
        [0, 0, 1, 1, 1],  # B: after the 2-token prefix
        [0, 0, 1, 0, 0],  # C: its own token after the (unmasked) prefix
        [0, 0, 0, 0, 0],  # D: nothing generated
        [0, 1, 0, 0, 0],  # E
    ], dtype=torch.bool)
    assert torch.equal(batch.policy_mask, expected)
    assert not bool((batch.policy_mask & batch.expert_mask).any())
    # every policy token is a real token whose sampler log-prob we have
    assert batch.policy_mask.sum(dim=1).tolist() == [len(s.rollout_logprobs) for s in SAMPLES]
    assert bool((batch.targets[batch.policy_mask] != PAD).all())


def test_advantages_are_float32_in_sample_order():
    batch = build()
    assert batch.advantages.dtype == torch.float32
    assert batch.advantages.tolist() == [0.5, -0.25, -0.25, 0.75, 0.0]


def test_a_micro_batch_keeps_the_step_wide_prefix_carrier():
    # B and C share (prompt 1, micro-group 1); B carries the prefix loss. A micro-batch holding C alone must not make
    # C a carrier: the decision is the step's.
    carriers = step_prefix_carriers(SAMPLES)
    assert carriers.tolist() == [False, True, False, True, True]
    alone = build_train_batch([SAMPLES[2]], ADVANTAGES[[2]], PAD, carriers[[2]])
    assert not bool(alone.expert_mask.any())
    assert build_train_batch([SAMPLES[2]], ADVANTAGES[[2]], PAD).expert_mask.tolist() == [[True, True, False]]


def test_a_micro_batch_is_as_wide_as_its_own_longest_row():
    batch = build_train_batch([SAMPLES[0], SAMPLES[4]], ADVANTAGES[[0, 4]], PAD)  # A: 3 + 4 tokens, E: 3 + 2
    assert batch.response_width == 4  # A's 4 tokens, not the step's 5
    assert batch.input_ids.tolist() == [[11, 12, 13, 21, 22, 23, 24], [11, 12, 13, 71, 81, PAD, PAD]]


def test_micro_batches_without_a_budget_are_runs_in_step_order():
    assert micro_batches([3] * 5, [4] * 5, max_rows=2) == [[0, 1], [2, 3], [4]]
    assert micro_batches([3] * 5, [4] * 5, max_rows=8) == [[0, 1, 2, 3, 4]]


def test_micro_batches_with_a_budget_pack_rows_sorted_by_length():
    # totals (prompt + response): 0: 2+8=10, 1: 2+1=3, 2: 2+30=32, 3: 2+2=4, 4: 2+9=11, 5: 2+2=4
    prompts, responses = [2] * 6, [8, 1, 30, 2, 9, 2]
    # longest first: 2 (32), 4 (11), 0 (10), 3 (4), 5 (4, after 3: step order), 1 (3); budget 24:
    # [2] alone costs 1 x 32 > 24: over-long rows go alone; [4, 0]: 2 x 11 = 22 <= 24, + 3 would be 3 x 11 = 33;
    # [3, 5, 1]: 3 x 4 = 12
    assert micro_batches(prompts, responses, max_rows=8, max_tokens=24) == [[2], [4, 0], [3, 5, 1]]
    # the row cap still holds: 2 rows at most
    assert micro_batches(prompts, responses, max_rows=2, max_tokens=24) == [[2], [4, 0], [3, 5], [1]]
    # every row once
    plan = micro_batches(prompts, responses, max_rows=3, max_tokens=15)
    assert sorted(i for rows in plan for i in rows) == list(range(6))


def test_the_budget_counts_the_longest_row_of_a_micro_batch():
    # row 0: prompt 10 + response 1 = 11; row 1: prompt 1 + response 9 = 10. Together: 2 x 11 = 22 tokens
    assert padded_tokens([10, 1], [1, 9]) == 22
    assert micro_batches([10, 1], [1, 9], max_rows=8, max_tokens=21) == [[0], [1]]
    assert micro_batches([10, 1], [1, 9], max_rows=8, max_tokens=22) == [[0, 1]]


def test_empty_responses_give_a_width_one_batch_with_no_loss_tokens():
    # a request with no budget left returns no tokens
    samples = [sample(0, 0, 0.0, P0, (), 0), sample(1, 0, 0.0, P1, (), 0)]
    batch = build_train_batch(samples, torch.zeros(2), PAD)
    assert batch.input_ids.shape == (2, 5) and batch.targets.shape == (2, 1)  # the longest prompt; one target column
    assert not bool(batch.expert_mask.any()) and not bool(batch.policy_mask.any())
