"""Dr.GRPO advantages (TRAPO.md "Losses"): r - mean over all G samples, guided ones included."""

import pytest
import torch

from trapo_lightning.advantages import dr_grpo_advantages


def test_mean_centred_without_std_scaling():
    # prompt 0: mean(1, 0, 0, 1) = 0.5 -> (0.5, -0.5, -0.5, 0.5)
    # prompt 1: mean(1, 1, 1, 0) = 0.75 -> (0.25, 0.25, 0.25, -0.75)
    # prompt 2: all correct, mean 1 -> no signal, all 0
    rewards = torch.tensor([[1.0, 0.0, 0.0, 1.0], [1.0, 1.0, 1.0, 0.0], [1.0, 1.0, 1.0, 1.0]])
    expected = torch.tensor([[0.5, -0.5, -0.5, 0.5], [0.25, 0.25, 0.25, -0.75], [0.0, 0.0, 0.0, 0.0]])
    advantages = dr_grpo_advantages(rewards)
    assert advantages.dtype == torch.float32
    torch.testing.assert_close(advantages, expected)


def test_std_scaling():
    # prompt 0: population std of (1, 0, 0, 1) = sqrt(mean((+-0.5)^2)) = 0.5, so 0.5 / 0.5 = 1
    # prompt 1: all equal: std 0, 0 / (0 + eps) = 0
    rewards = torch.tensor([[1.0, 0.0, 0.0, 1.0], [0.0, 0.0, 0.0, 0.0]])
    advantages = dr_grpo_advantages(rewards, scale_by_std=True, eps=1e-6)
    expected = torch.tensor([[1.0, -1.0, -1.0, 1.0], [0.0, 0.0, 0.0, 0.0]]) * (0.5 / (0.5 + 1e-6))
    torch.testing.assert_close(advantages, expected)


def test_integer_rewards_become_float32():
    # mean(1, 0) = 0.5
    advantages = dr_grpo_advantages(torch.tensor([[1, 0]]))
    assert advantages.dtype == torch.float32
    torch.testing.assert_close(advantages, torch.tensor([[0.5, -0.5]]))


@pytest.mark.parametrize("shape", [(8,), (2, 2, 2)])
def test_rejects_non_matrix_rewards(shape):
    with pytest.raises(ValueError, match=r"\[P, G\]"):
        dr_grpo_advantages(torch.zeros(shape))
