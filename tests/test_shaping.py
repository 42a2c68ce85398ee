"""DAPO's filters (trapo_lightning/shaping.py) and the update schedule's mini-batches (trapo_lightning/update.py),
by hand."""

import pytest
import torch

from trapo_lightning.shaping import DapoShaping, Overlong, overlong_penalty, uniform_groups
from trapo_lightning.update import update_rows


def test_uniform_groups():
    rewards = torch.tensor([[0.0, 0.0, 0.0], [1.0, 1.0, 1.0], [0.0, 1.0, 0.0], [0.5, 0.5, 0.5]])
    assert uniform_groups(rewards).tolist() == [True, True, False, True]


def test_the_soft_overlong_penalty():
    # budget 100, buffer 20: 0 up to 80 tokens, then (80 - length) / 20: 90 -> -0.5, 100 -> -1, never below -1
    lengths = torch.tensor([10, 80, 81, 90, 100, 130])
    torch.testing.assert_close(overlong_penalty(lengths, 100, 20), torch.tensor([0.0, 0.0, -0.05, -0.5, -1.0, -1.0]))
    with pytest.raises(ValueError, match="buffer"):
        overlong_penalty(lengths, 100, 0)


def test_dapo_shaping_keeps_and_shapes_what_it_says():
    rewards = torch.tensor([[1.0, 1.0], [0.0, 1.0]])
    finished = torch.tensor([[True, False], [True, True]])
    # uniform group 0 dropped; with mask, its truncated sample too (already dropped) and nothing else
    shaping = DapoShaping(drop_uniform_groups=True, overlong=Overlong.mask)
    assert shaping.rl_rows(rewards, finished).tolist() == [[False, False], [True, True]]
    assert DapoShaping(overlong="mask").rl_rows(rewards, finished).tolist() == [[True, False], [True, True]]
    assert DapoShaping().rl_rows(rewards, finished).all()
    # soft: budget 10, buffer 4 -> penalty from 6 tokens on; the full-solution row (nothing generated) is exempt
    lengths = torch.tensor([[8, 10], [3, 10]])
    generated = torch.tensor([[True, True], [True, False]])
    shaped = DapoShaping(overlong="soft", overlong_buffer=4).advantage_rewards(rewards, lengths, generated, 10)
    # 8 tokens: (6 - 8) / 4 = -0.5; 10: -1; 3: 0; exempt: 0
    torch.testing.assert_close(shaped, torch.tensor([[0.5, 0.0], [0.0, 1.0]]))
    assert DapoShaping().advantage_rewards(rewards, lengths, generated, 10) is rewards


def test_update_rows_split_whole_prompts_in_order():
    # rows of prompts 0, 0, 1, 1, 2, 2, 3, 3 (interleaved below): two mini-batches of two prompts each
    prompt_index = [0, 1, 0, 1, 2, 3, 2, 3]
    assert update_rows(prompt_index, 1) == [list(range(8))]
    assert update_rows(prompt_index, 2) == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert update_rows(prompt_index, 4) == [[0, 2], [1, 3], [4, 6], [5, 7]]
    with pytest.raises(ValueError, match="prompts_per_step"):
        update_rows(prompt_index, 3)
