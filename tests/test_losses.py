"""The TRAPO objective (TRAPO.md "Losses"): per-token terms by hand, the full loss by hand, grad-accum equivalence."""

import math

import pytest
import torch

from trapo_lightning.importance import RolloutCorrection
from trapo_lightning.losses import (
    KLEstimator,
    LossNormalizer,
    PolicyLoss,
    SFTLoss,
    LossTerms,
    TrapoLoss,
    clipped_policy_gradient,
    gspo_policy_gradient,
    kl_penalty,
    luffy_off_policy,
    luffy_shaped_sft,
    plain_sft,
    trapo_loss,
    trust_region_sft,
    unclipped_policy_gradient,
)

LN2 = math.log(2.0)


def _logp(*probs):
    return torch.tensor([list(map(math.log, probs))], requires_grad=True)  # [1, T]


def _value_and_grad(fn, logp):
    value = fn(logp)
    (grad,) = torch.autograd.grad(value.sum(), logp)
    return value.detach(), grad


def test_enum_values_equal_names():
    for enum in (SFTLoss, PolicyLoss, KLEstimator, LossNormalizer):
        for member in enum:
            assert member.value == member.name
    assert SFTLoss("trust_region") is SFTLoss.trust_region
    assert isinstance(LossNormalizer.constant, str)


def test_trust_region_sft_on_both_sides_of_alpha():
    logp = _logp(0.05, 0.5, 0.2)
    value, grad = _value_and_grad(lambda x: trust_region_sft(x, alpha=0.1), logp)
    # p = 0.05 < alpha = 0.1: loss = -p / alpha = -0.5, d loss / d log p = -p / alpha = -0.5
    # p = 0.5 >= 0.1: loss = -ln 0.5 = ln 2 = 0.693147, d loss / d log p = -1
    # p = 0.2 >= 0.1: loss = -ln 0.2 = 1.609438, d loss / d log p = -1
    torch.testing.assert_close(value, torch.tensor([[-0.5, LN2, math.log(5.0)]]))
    torch.testing.assert_close(grad, torch.tensor([[-0.5, -1.0, -1.0]]))


def test_trust_region_sft_with_alpha_zero_is_plain_sft():
    logp = _logp(1e-3, 0.05, 0.5, 1.0)
    value, grad = _value_and_grad(lambda x: trust_region_sft(x, alpha=0.0), logp)
    plain_value, plain_grad = _value_and_grad(plain_sft, logp)
    # -log p everywhere, gradient -1 everywhere, and no nan from the unused -p / 0 branch
    torch.testing.assert_close(value, plain_value)
    torch.testing.assert_close(grad, plain_grad)
    torch.testing.assert_close(grad, torch.full((1, 4), -1.0))


def test_trust_region_sft_rejects_alpha_outside_unit_interval():
    with pytest.raises(ValueError, match="alpha"):
        trust_region_sft(torch.zeros(1, 1), alpha=1.5)


def test_luffy_shaped_sft():
    logp = _logp(0.1, 0.3)
    value, grad = _value_and_grad(lambda x: luffy_shaped_sft(x, gamma=0.1), logp)
    # p = 0.1: -p / (p + g) = -0.1 / 0.2 = -0.5;  d / d log p = -p g / (p + g)^2 = -0.01 / 0.04 = -0.25
    # p = 0.3: -0.3 / 0.4 = -0.75;                d / d log p = -0.03 / 0.16 = -0.1875
    torch.testing.assert_close(value, torch.tensor([[-0.5, -0.75]]))
    torch.testing.assert_close(grad, torch.tensor([[-0.25, -0.1875]]))


def test_unclipped_policy_gradient_at_ratio_one():
    logp = _logp(0.5, 0.25)
    old_logp = logp.detach().clone()
    advantages = torch.tensor([2.0])
    value, grad = _value_and_grad(lambda x: unclipped_policy_gradient(x, old_logp, advantages), logp)
    # ratio 1: loss = -A = -2; d(-A r) / d log p = -A r = -2
    torch.testing.assert_close(value, torch.tensor([[-2.0, -2.0]]))
    torch.testing.assert_close(grad, torch.tensor([[-2.0, -2.0]]))


@pytest.mark.parametrize(
    ("ratio", "advantage", "expected_value", "expected_grad"),
    [
        # r = 1.5 > 1 + eps_high = 1.2, A = +1: -min(1.5, 1.2) = -1.2, clipped -> zero gradient
        (1.5, 1.0, -1.2, 0.0),
        # r = 1.5, A = -1: -min(-1.5, -1.2) = 1.5, unclipped -> d(-A r) / d log p = r = 1.5
        (1.5, -1.0, 1.5, 1.5),
        # r = 0.5 < 1 - eps_low = 0.8, A = -1: -min(-0.5, -0.8) = 0.8, clipped -> zero gradient
        (0.5, -1.0, 0.8, 0.0),
        # r = 0.5, A = +1: -min(0.5, 0.8) = -0.5, unclipped -> -A r = -0.5
        (0.5, 1.0, -0.5, -0.5),
    ],
)
def test_clipped_policy_gradient(ratio, advantage, expected_value, expected_grad):
    logp = _logp(0.5)
    old_logp = torch.tensor([[math.log(0.5 / ratio)]])
    advantages = torch.tensor([advantage])
    value, grad = _value_and_grad(
        lambda x: clipped_policy_gradient(x, old_logp, advantages, eps_low=0.2, eps_high=0.2), logp
    )
    torch.testing.assert_close(value, torch.tensor([[expected_value]]))
    torch.testing.assert_close(grad, torch.tensor([[expected_grad]]))


@pytest.mark.parametrize(
    ("estimator", "expected_value", "expected_grad"),
    [
        # logp = ln 0.5, ref = ln 0.25: logp - ref = ln 2 = 0.693147
        (KLEstimator.k1, LN2, 1.0),  # k1 = ln 2, d / d logp = 1
        (KLEstimator.k2, 0.5 * LN2**2, LN2),  # k2 = 0.5 * 0.480453 = 0.240227, d / d logp = ln 2
        # k3 = e^(-ln 2) - (-ln 2) - 1 = 0.5 + 0.693147 - 1 = 0.193147, d / d logp = 1 - e^(ref - logp) = 0.5
        (KLEstimator.k3, 0.5 + LN2 - 1.0, 0.5),
    ],
)
def test_kl_estimators(estimator, expected_value, expected_grad):
    logp = _logp(0.5)
    ref_logp = torch.tensor([[math.log(0.25)]])
    value, grad = _value_and_grad(lambda x: kl_penalty(x, ref_logp, estimator), logp)
    torch.testing.assert_close(value, torch.tensor([[expected_value]]))
    torch.testing.assert_close(grad, torch.tensor([[expected_grad]]))
    assert kl_penalty(logp, ref_logp, estimator.value).item() == pytest.approx(expected_value)


def _hand_batch():
    """2 x 3: row 0 = 2 expert tokens then 1 policy token; row 1 = 2 policy tokens then padding."""
    logp = torch.tensor(
        [[math.log(0.5), math.log(0.05), math.log(0.5)], [math.log(0.5), math.log(0.25), math.log(0.9)]],
        requires_grad=True,
    )
    # row 0, t 2: ratio 0.5 / (1/3) = 1.5; row 1: ratios 1 and 0.25 / 0.125 = 2; padding garbage -1e9
    old_logp = torch.tensor([[0.0, 0.0, math.log(1 / 3)], [math.log(0.5), math.log(0.125), -1e9]])
    # ref - logp at policy tokens: 0, ln 2, 0; padding garbage
    ref_logp = torch.tensor([[0.0, 0.0, math.log(0.5)], [0.0, math.log(0.25), -1e9]])
    entropy = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 100.0]], requires_grad=True)
    advantages = torch.tensor([0.5, -0.5])
    expert_mask = torch.tensor([[True, True, False], [False, False, False]])
    policy_mask = torch.tensor([[False, False, True], [True, True, False]])
    return logp, old_logp, entropy, advantages, expert_mask, policy_mask, ref_logp


# SFT sum (alpha 0.1): p = 0.5 -> -ln 0.5 = 0.693147; p = 0.05 -> -0.05 / 0.1 = -0.5; sum 0.193147
SFT_SUM = LN2 - 0.5
# unclipped: -0.5 * 1.5 = -0.75; -(-0.5) * 1 = 0.5; -(-0.5) * 2 = 1.0; sum 0.75
POLICY_SUM = 0.75
# clipped: row 0 t 2: r = 1.5, A = +0.5: -min(0.75, 1.2 * 0.5 = 0.6) = -0.6 (clip active); others as above
CLIPPED_POLICY_SUM = -0.6 + 0.5 + 1.0
# k3 at ref - logp = 0, ln 2, 0: 0 + (2 - ln 2 - 1) + 0 = 0.306853
KL_SUM = 1.0 - LN2
# entropy mean over the 5 loss tokens: (1 + 2 + 3 + 4 + 5) / 5 = 3
ENTROPY_MEAN = 3.0


@pytest.mark.parametrize(
    ("normalizer", "num"),
    [
        (LossNormalizer.constant, 10.0),  # max_response_tokens 5 * B 2
        (LossNormalizer.token_mean, 5.0),  # 2 expert + 3 policy tokens
    ],
)
def test_trapo_loss_by_hand(normalizer, num):
    logp, old_logp, entropy, advantages, expert_mask, policy_mask, ref_logp = _hand_batch()
    out = trapo_loss(
        logp, old_logp, entropy, advantages, expert_mask, policy_mask,
        ref_logp=ref_logp, kl_coef=0.1, normalizer=normalizer, max_response_tokens=5,
    )  # fmt: skip
    assert isinstance(out, LossTerms)
    # constant:   (0.193147 + 0.75 + 0.1 * 0.306853) / 10 - 0.001 * 3 = 0.0973832 - 0.003 = 0.0943832
    # token_mean: 0.9738325 / 5 - 0.003 = 0.1947665 - 0.003 = 0.1917665
    expected_loss = (SFT_SUM + POLICY_SUM + 0.1 * KL_SUM) / num - 0.001 * ENTROPY_MEAN
    torch.testing.assert_close(out.loss, torch.tensor(expected_loss))
    torch.testing.assert_close(out.sft_loss, torch.tensor(SFT_SUM / num))
    torch.testing.assert_close(out.policy_loss, torch.tensor(POLICY_SUM / num))
    torch.testing.assert_close(out.kl, torch.tensor(KL_SUM / num))
    torch.testing.assert_close(out.entropy, torch.tensor(ENTROPY_MEAN))
    torch.testing.assert_close(out.expert_tokens, torch.tensor(2.0))
    torch.testing.assert_close(out.policy_tokens, torch.tensor(3.0))
    # expert p = 0.5, 0.05: one of two below alpha 0.1
    torch.testing.assert_close(out.outside_trust_region, torch.tensor(0.5))
    torch.testing.assert_close(out.clip_fraction, torch.tensor(0.0))
    for stat in out[1:]:
        assert not stat.requires_grad and stat.dtype == torch.float32

    logp_grad, entropy_grad = torch.autograd.grad(out.loss, (logp, entropy))
    # d / d logp, times N: expert -1 (p >= alpha), -0.5 (p < alpha); policy -A r: -0.75, 0.5, 1.0;
    # k3 adds kl_coef * (1 - e^(ref - logp)): 0.1 * (1 - 2) = -0.1 at row 1 t 0 only; padding 0
    expected_logp_grad = torch.tensor([[-1.0, -0.5, -0.75], [0.5 - 0.1, 1.0, 0.0]]) / num
    torch.testing.assert_close(logp_grad, expected_logp_grad)
    # d / d entropy = -0.001 / 5 on each loss token, 0 on padding
    expected_entropy_grad = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]]) * (-0.001 / 5)
    torch.testing.assert_close(entropy_grad, expected_entropy_grad)


def test_trapo_loss_clipped_by_hand():
    logp, old_logp, entropy, advantages, expert_mask, policy_mask, _ = _hand_batch()
    out = trapo_loss(
        logp, old_logp, entropy, advantages, expert_mask, policy_mask,
        policy_loss="clipped", max_response_tokens=5,
    )  # fmt: skip
    # N = 10, no KL: (0.193147 + 0.9) / 10 - 0.003 = 0.1093147 - 0.003 = 0.1063147
    torch.testing.assert_close(out.loss, torch.tensor((SFT_SUM + CLIPPED_POLICY_SUM) / 10.0 - 0.003))
    torch.testing.assert_close(out.policy_loss, torch.tensor(CLIPPED_POLICY_SUM / 10.0))
    # no ref_logp: KL stat 0
    torch.testing.assert_close(out.kl, torch.tensor(0.0))
    # clip active at 1 of 3 policy tokens
    torch.testing.assert_close(out.clip_fraction, torch.tensor(1.0 / 3.0))
    (grad,) = torch.autograd.grad(out.loss, logp)
    # as unclipped, but the clipped token (row 0 t 2) gets no gradient
    torch.testing.assert_close(grad, torch.tensor([[-1.0, -0.5, 0.0], [0.5, 1.0, 0.0]]) / 10.0)


# GSPO, eps 0.2: row 0's sequence ratio is its one token's, s = 1.5 > 1.2 with A = +0.5: -min(0.75, 0.6) = -0.6,
# clipped; row 1: s = exp((ln 1 + ln 2) / 2) = sqrt 2 = 1.414214 with A = -0.5: -min(-0.707107, -0.6) = 0.707107 on
# each of its 2 tokens, unclipped, d / d logp = -A * s = 0.707107
GSPO_POLICY_SUM = -0.6 + 2 * 0.5 * math.sqrt(2.0)


def test_trapo_loss_gspo_by_hand():
    logp, old_logp, entropy, advantages, expert_mask, policy_mask, _ = _hand_batch()
    out = trapo_loss(
        logp, old_logp, entropy, advantages, expert_mask, policy_mask, policy_loss="gspo", max_response_tokens=5,
    )
    torch.testing.assert_close(out.policy_loss, torch.tensor(GSPO_POLICY_SUM / 10.0))
    torch.testing.assert_close(out.clip_fraction, torch.tensor(1.0 / 3.0))  # row 0's token: its sequence clipped
    (grad,) = torch.autograd.grad(out.loss, logp)
    expected = torch.tensor([[-1.0, -0.5, 0.0], [0.5 * math.sqrt(2.0), 0.5 * math.sqrt(2.0), 0.0]]) / 10.0
    torch.testing.assert_close(grad, expected)


def test_gspo_without_clipping_weighs_every_token_by_its_sequence_ratio():
    logp, old_logp, _, advantages, _, policy_mask, _ = _hand_batch()
    terms = gspo_policy_gradient(logp, old_logp, advantages, policy_mask, eps_low=0.9, eps_high=0.9)
    (grad,) = torch.autograd.grad((terms * policy_mask).sum(), logp)
    # -A * s: row 0: -0.5 * 1.5 = -0.75; row 1: 0.5 * sqrt 2 on both tokens
    expected = torch.tensor([[0.0, 0.0, -0.75], [0.5 * math.sqrt(2.0), 0.5 * math.sqrt(2.0), 0.0]])
    torch.testing.assert_close(grad * policy_mask, expected)


def test_the_loss_object_applies_the_rollout_correction_by_hand():
    logp, old_logp, entropy, advantages, expert_mask, policy_mask, _ = _hand_batch()
    # sampler log-probs making w = pi_old / pi_rollout = 3, 1, 0.5 at the policy tokens (padding: anything)
    rollout_logp = old_logp - torch.tensor([[0.0, 0.0, math.log(3.0)], [0.0, math.log(0.5), 0.0]])
    loss = TrapoLoss(rollout_correction=RolloutCorrection(level="token", mode="truncate", cap=2.0))
    out = loss(logp, old_logp, entropy, advantages, expert_mask, policy_mask, rollout_logp=rollout_logp,
               max_response_tokens=5)
    # truncated weights 2, 1, 0.5 on the unclipped terms -0.75, 0.5, 1.0: -1.5 + 0.5 + 0.5 = -0.5
    torch.testing.assert_close(out.policy_loss, torch.tensor(-0.5 / 10.0))
    torch.testing.assert_close(out.rollout_is_mean, torch.tensor(3.5 / 3.0))
    torch.testing.assert_close(out.rollout_is_rejected, torch.tensor(1.0 / 3.0))
    (grad,) = torch.autograd.grad(out.loss, logp)
    torch.testing.assert_close(grad, torch.tensor([[-1.0, -0.5, -1.5], [0.5, 0.5, 0.0]]) / 10.0)
    # without the sampler's log-probs the correction cannot run
    with pytest.raises(ValueError, match="rollout_logp"):
        loss(logp, old_logp, entropy, advantages, expert_mask, policy_mask, max_response_tokens=5)


def test_the_loss_object_without_options_is_trapo_loss_with_the_papers_defaults():
    logp, old_logp, entropy, advantages, expert_mask, policy_mask, _ = _hand_batch()
    ours = TrapoLoss()(logp, old_logp, entropy, advantages, expert_mask, policy_mask, max_response_tokens=5)
    reference = trapo_loss(logp, old_logp, entropy, advantages, expert_mask, policy_mask, max_response_tokens=5)
    for got, expected in zip(ours, reference):
        assert torch.equal(got, expected)
    assert TrapoLoss().trust_region_alpha == 0.1 and TrapoLoss().entropy_coef == 0.001 and TrapoLoss().kl_coef == 0


@pytest.mark.parametrize(
    ("sft_loss", "expected_sft_sum"),
    [
        ("plain", LN2 + math.log(20.0)),  # -ln 0.5 - ln 0.05 = 0.693147 + 2.995732
        ("luffy_shaping", -0.5 / 0.6 - 0.05 / 0.15),  # -0.5 / (0.5 + 0.1) - 0.05 / (0.05 + 0.1) = -0.833333 - 0.333333
        # LUFFY: the expert row 0 has advantage 0.5: 0.5 x (-0.833333 - 0.333333) = -0.583333
        ("luffy", 0.5 * (-0.5 / 0.6 - 0.05 / 0.15)),
    ],
)
def test_trapo_loss_sft_variants(sft_loss, expected_sft_sum):
    logp, old_logp, entropy, advantages, expert_mask, policy_mask, _ = _hand_batch()
    out = trapo_loss(
        logp, old_logp, entropy, advantages, expert_mask, policy_mask,
        sft_loss=sft_loss, normalizer="token_mean", entropy_coef=0.0,
    )  # fmt: skip
    torch.testing.assert_close(out.sft_loss, torch.tensor(expected_sft_sum / 5.0))
    torch.testing.assert_close(out.loss, torch.tensor((expected_sft_sum + POLICY_SUM) / 5.0))


def test_luffy_weights_its_shaped_off_policy_term_by_the_advantage():
    logp = _logp(0.5, 0.05)
    advantages = torch.tensor([-2.0])
    value, grad = _value_and_grad(lambda x: luffy_off_policy(x, advantages), logp)
    # -A * p / (p + 0.1): 2 * 0.5 / 0.6 = 1.666667, 2 * 0.05 / 0.15 = 0.666667 (a negative advantage pushes p down)
    torch.testing.assert_close(value, torch.tensor([[2.0 * 0.5 / 0.6, 2.0 * 0.05 / 0.15]]))
    # d / d log p = -A * p * 0.1 / (p + 0.1)^2: 2 * 0.05 / 0.36 = 0.277778, 2 * 0.005 / 0.0225 = 0.444444
    torch.testing.assert_close(grad, torch.tensor([[2.0 * 0.05 / 0.36, 2.0 * 0.005 / 0.0225]]))


def test_trapo_loss_without_loss_tokens():
    logp, old_logp, entropy, advantages, _, _, _ = _hand_batch()
    none = torch.zeros(2, 3, dtype=torch.bool)
    out = trapo_loss(logp, old_logp, entropy, advantages, none, none, normalizer="token_mean")
    # every sum is 0, N = max(0, 1) = 1, entropy mean 0, fractions 0; no correction: importance weights 1
    for name, value in out._asdict().items():
        torch.testing.assert_close(value.detach(), torch.tensor(1.0 if name == "rollout_is_mean" else 0.0), msg=name)
    (grad,) = torch.autograd.grad(out.loss, logp)
    torch.testing.assert_close(grad, torch.zeros(2, 3))


def test_trapo_loss_validates_arguments():
    logp, old_logp, entropy, advantages, expert_mask, policy_mask, _ = _hand_batch()
    with pytest.raises(ValueError, match="needs ref_logp"):
        trapo_loss(logp, old_logp, entropy, advantages, expert_mask, policy_mask, kl_coef=0.1)
    with pytest.raises(ValueError, match="advantages"):
        trapo_loss(logp, old_logp, entropy, advantages[:1], expert_mask, policy_mask)
    with pytest.raises(ValueError, match="old_logp"):
        trapo_loss(logp, old_logp[:, :2], entropy, advantages, expert_mask, policy_mask)
    with pytest.raises(ValueError, match="bool"):
        trapo_loss(logp, old_logp, entropy, advantages, expert_mask.float(), policy_mask)


def _random_batch(batch_size=8, length=6, seed=0):
    generator = torch.Generator().manual_seed(seed)
    logp = torch.log(torch.rand(batch_size, length, generator=generator) * 0.98 + 0.01)  # p in (0.01, 0.99)
    old_logp = logp + 0.3 * torch.randn(batch_size, length, generator=generator)
    ref_logp = logp + 0.3 * torch.randn(batch_size, length, generator=generator)
    entropy = 3.0 * torch.rand(batch_size, length, generator=generator)
    advantages = torch.randn(batch_size, generator=generator)
    # ragged masks: prefix and response lengths differ per row, so the two halves hold different token counts
    prefix_len = torch.tensor([2, 0, 0, 3, 1, 0, 0, 0])
    response_len = torch.tensor([5, 6, 2, 3, 4, 1, 6, 3])
    positions = torch.arange(length)[None, :]
    expert_mask = positions < prefix_len[:, None]
    policy_mask = (positions >= prefix_len[:, None]) & (positions < response_len[:, None])
    return logp, old_logp, entropy, advantages, expert_mask, policy_mask, ref_logp


@pytest.mark.parametrize("policy_loss", list(PolicyLoss))
def test_constant_normalizer_is_invariant_to_gradient_accumulation(policy_loss):
    """grad-accum 2 x batch 4 == 1 x batch 8, values and gradients.

    The entropy bonus is a token mean per micro-batch, which is not split-invariant with ragged token counts
    (first half: 5 + 6 + 2 + 3 = 16 loss tokens, second half: 4 + 1 + 6 + 3 = 14), so it is switched off here.
    """
    logp, old_logp, entropy, advantages, expert_mask, policy_mask, ref_logp = _random_batch()
    settings = dict(policy_loss=policy_loss, kl_coef=0.05, entropy_coef=0.0, max_response_tokens=16)

    whole_logp = logp.clone().requires_grad_(True)
    whole = trapo_loss(
        whole_logp, old_logp, entropy, advantages, expert_mask, policy_mask, ref_logp=ref_logp, **settings
    )
    (whole_grad,) = torch.autograd.grad(whole.loss, whole_logp)

    split_logp = logp.clone().requires_grad_(True)
    halves = [
        trapo_loss(
            split_logp[rows], old_logp[rows], entropy[rows], advantages[rows], expert_mask[rows],
            policy_mask[rows], ref_logp=ref_logp[rows], **settings,
        )  # fmt: skip
        for rows in (slice(0, 4), slice(4, 8))
    ]
    accumulated = (halves[0].loss + halves[1].loss) / 2  # what Lightning's accumulate_grad_batches=2 optimises
    (split_grad,) = torch.autograd.grad(accumulated, split_logp)

    assert whole.loss.abs() > 1e-3  # a non-trivial value is compared
    torch.testing.assert_close(accumulated, whole.loss, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(split_grad, whole_grad, rtol=1e-6, atol=1e-7)
    for stat in ("sft_loss", "policy_loss", "kl"):
        mean_of_halves = (getattr(halves[0], stat) + getattr(halves[1], stat)) / 2
        torch.testing.assert_close(mean_of_halves, getattr(whole, stat), rtol=1e-6, atol=1e-7)


def test_token_mean_normalizer_is_not_invariant_to_gradient_accumulation():
    # why `constant` is the default: with ragged token counts token_mean weights tokens differently per split
    logp, old_logp, entropy, advantages, expert_mask, policy_mask, _ = _random_batch()
    settings = dict(normalizer="token_mean", entropy_coef=0.0)
    whole = trapo_loss(logp, old_logp, entropy, advantages, expert_mask, policy_mask, **settings).loss
    halves = [
        trapo_loss(
            logp[rows], old_logp[rows], entropy[rows], advantages[rows], expert_mask[rows], policy_mask[rows],
            **settings,
        ).loss  # fmt: skip
        for rows in (slice(0, 4), slice(4, 8))
    ]
    assert not torch.allclose((halves[0] + halves[1]) / 2, whole, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("normalizer", list(LossNormalizer))
def test_micro_batches_with_step_totals_sum_to_the_whole_batch(normalizer):
    """How TrapoModule splits one optimizer step: each micro-batch divides by the whole step's counts.

    Rows 0-3 hold 16 loss tokens and rows 4-7 hold 14 (see _random_batch), 30 in all, 8 sequences. With those
    totals passed, loss(rows 0-3) + loss(rows 4-7) == loss(rows 0-7) exactly, entropy bonus included.
    """
    logp, old_logp, entropy, advantages, expert_mask, policy_mask, ref_logp = _random_batch()
    settings = dict(normalizer=normalizer, kl_coef=0.05, entropy_coef=0.01, max_response_tokens=16)
    assert int((expert_mask | policy_mask).sum()) == 30

    whole_logp = logp.clone().requires_grad_(True)
    whole = trapo_loss(whole_logp, old_logp, entropy, advantages, expert_mask, policy_mask, ref_logp=ref_logp,
                       **settings)
    (whole_grad,) = torch.autograd.grad(whole.loss, whole_logp)

    split_logp = logp.clone().requires_grad_(True)
    parts = [
        trapo_loss(
            split_logp[rows], old_logp[rows], entropy[rows], advantages[rows], expert_mask[rows],
            policy_mask[rows], ref_logp=ref_logp[rows], num_sequences=8, num_loss_tokens=30, **settings,
        )
        for rows in (slice(0, 4), slice(4, 8))
    ]
    (split_grad,) = torch.autograd.grad(parts[0].loss + parts[1].loss, split_logp)

    torch.testing.assert_close(parts[0].loss + parts[1].loss, whole.loss, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(split_grad, whole_grad, rtol=1e-6, atol=1e-7)
