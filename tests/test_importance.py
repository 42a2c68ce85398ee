"""Rollout importance weights (trapo_lightning/importance.py), by hand: w = pi_old / pi_rollout, bounded."""

import math

import pytest
import torch

from trapo_lightning.importance import ISLevel, ISMode, RolloutCorrection, rollout_importance_weights

LN2, LN3 = math.log(2.0), math.log(3.0)
# Two sequences of three tokens; row 1's last token is padding (not a policy token).
# log w = old - rollout per token: row 0: ln 3, 0, -ln 2 (w = 3, 1, 0.5); row 1: ln 2, ln 2 (w = 2, 2), pad.
OLD = torch.tensor([[LN3, 0.0, -LN2], [LN2, LN2, 5.0]]) - 1.0
ROLLOUT = torch.full((2, 3), -1.0)
MASK = torch.tensor([[True, True, True], [True, True, False]])


def weights(level, mode, cap=2.0, lower=None):
    return rollout_importance_weights(OLD, ROLLOUT, MASK, ISLevel(level), ISMode(mode), cap, lower)


def test_token_truncate():
    out = weights("token", "truncate", cap=2.0)
    # min(w, 2): 3 -> 2 (truncated), 1, 0.5; 2, 2 (at the cap, not truncated); padding 0
    torch.testing.assert_close(out.weights, torch.tensor([[2.0, 1.0, 0.5], [2.0, 2.0, 0.0]]))
    assert out.rejected.tolist() == [[True, False, False], [False, False, False]]


def test_token_mask():
    out = weights("token", "mask", cap=2.0)  # keep 1/2 <= w <= 2
    # 3 is above the cap: 0; 1 and 0.5 (at the lower bound) kept; 2, 2 kept at the cap
    torch.testing.assert_close(out.weights, torch.tensor([[0.0, 1.0, 0.5], [2.0, 2.0, 0.0]]))
    assert out.rejected.tolist() == [[True, False, False], [False, False, False]]
    # a tighter lower bound masks the 0.5 too
    assert weights("token", "mask", cap=2.0, lower=0.6).rejected.tolist()[0] == [True, False, True]


def test_sequence_truncate():
    out = weights("sequence", "truncate", cap=4.0)
    # row 0: w = 3 * 1 * 0.5 = 1.5 (under the cap); row 1: 2 * 2 = 4 (at the cap); the padding token is not counted
    torch.testing.assert_close(out.weights, torch.tensor([[1.5, 1.5, 1.5], [4.0, 4.0, 0.0]]))
    assert not out.rejected.any()
    # cap 3: row 1's 4 -> 3, every one of its policy tokens truncated
    out = weights("sequence", "truncate", cap=3.0)
    torch.testing.assert_close(out.weights[1], torch.tensor([3.0, 3.0, 0.0]))
    assert out.rejected.tolist() == [[False, False, False], [True, True, False]]


def test_sequence_mask():
    out = weights("sequence", "mask", cap=3.0)  # keep 1/3 <= w <= 3: row 0 (1.5) stays, row 1 (4) goes
    torch.testing.assert_close(out.weights, torch.tensor([[1.5, 1.5, 1.5], [0.0, 0.0, 0.0]]))
    assert out.rejected.tolist() == [[False, False, False], [True, True, False]]


def test_a_long_sequence_cannot_overflow():
    # 8192 tokens each with log w = 0.1: the product is e^819, far beyond float32; truncated in log space
    old, rollout = torch.full((1, 8192), 0.1), torch.zeros(1, 8192)
    out = rollout_importance_weights(old, rollout, torch.ones(1, 8192, dtype=torch.bool), ISLevel.sequence,
                                     ISMode.truncate, 2.0)
    assert torch.isfinite(out.weights).all() and float(out.weights.max()) == pytest.approx(2.0)


@pytest.mark.parametrize("kwargs, message", [(dict(cap=0.5), "cap"), (dict(lower=0.0), "lower"),
                                             (dict(lower=1.5), "lower"), (dict(level="seq"), "seq")])
def test_invalid_settings_fail_at_construction(kwargs, message):
    with pytest.raises(ValueError, match=message):
        RolloutCorrection(**kwargs)
