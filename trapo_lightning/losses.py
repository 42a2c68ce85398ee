"""The TRAPO objective, TRAPO.md "Losses".

    loss = (sum_expert SFT(logp) + sum_policy w * RL(logp) + kl_coef * sum_policy KL(logp, ref)) / N
           - entropy_coef * mean_{expert | policy} entropy

`TrapoLoss` is the objective as one configurable object (`model.loss` in a config); its variants are the pure
functions below, chosen by Enum; `trapo_loss` is the whole computation as a pure function of tensors and settings.

Per-token terms (each `[B, T]`, unmasked; one small function per variant, chosen by Enum):
- TrSFT on expert-prefix tokens, trust region alpha: -log p where p >= alpha, -p / alpha where p < alpha. Its
  gradient weight 1 / max(p, alpha) caps the pull of expert tokens the policy finds unlikely, which is what keeps
  SFT from collapsing exploration (paper ablation: plain SFT 32.3 vs TrSFT 56.6 math avg). The value, not only
  the gradient, follows the paper's piecewise form, so the logged SFT loss is the NLL inside the trust region.
  Plain SFT (-log p) and LUFFY's shaping with A = 1 (-p / (p + gamma), `luffy_shaping`: the paper's ablation
  "micro-groups + LUFFY shaping") are the ablations. LUFFY itself (`luffy`, the baseline) weights the shaped term
  by the sample's own group advantage, in which the expert trace takes part: -A * p / (p + gamma) (LUFFY's
  `off_policy_reshape: p_div_p_0.1`, TRAPO.md "Losses").
- RL on policy tokens: -A * pi / pi_old (the reference code: one optimizer step per rollout batch, ratio ~ 1,
  no clip), the PPO clipped form, or GSPO's clipped sequence-level ratio. old_logp and ref_logp are constants: they
  are detached here. w is the optional rollout importance weight (trapo_lightning/importance.py), 1 without it.
- KL to a reference model on policy tokens, estimators k1, k2, k3 (Schulman's); the paper's runs use kl_coef 0.

N is `constant` = max_response_tokens * B by default (Dr.GRPO): each sequence's token sum over a fixed length,
averaged over sequences, so the loss scale depends neither on how many tokens a batch happens to hold nor on how
it is split for gradient accumulation. `token_mean` divides by the batch's loss-token count instead. The entropy
bonus is a token mean over the loss tokens. When one optimizer step is split into micro-batches, pass the step's
totals (`num_sequences`, `num_loss_tokens`): every term is then divided by the whole step's count, so the
micro-batch losses add up exactly to the full-batch loss, entropy bonus and `token_mean` included. When ranks each
hold a share of the step, pass the mean over ranks of those counts: data-parallel training averages the ranks'
gradients, so each rank's sum divided by the mean count averages to the sum over all ranks divided by the total.
"""

from enum import Enum
from functools import partial
from typing import Callable, NamedTuple, Optional

import torch
from torch import Tensor

from trapo_lightning.importance import ImportanceWeights, RolloutCorrection


class SFTLoss(str, Enum):
    """Loss on expert-prefix tokens."""

    trust_region = "trust_region"
    plain = "plain"
    luffy_shaping = "luffy_shaping"
    luffy = "luffy"


class PolicyLoss(str, Enum):
    """RL loss on policy tokens."""

    unclipped = "unclipped"
    clipped = "clipped"
    gspo = "gspo"


class KLEstimator(str, Enum):
    """Per-token estimator of KL(pi_theta || pi_ref) from samples of pi_theta."""

    k1 = "k1"
    k2 = "k2"
    k3 = "k3"


class LossNormalizer(str, Enum):
    """What the summed token losses are divided by."""

    constant = "constant"
    token_mean = "token_mean"


class LossTerms(NamedTuple):
    """The differentiable loss and detached float32 scalar stats."""

    loss: Tensor
    """Scalar loss to backpropagate."""
    sft_loss: Tensor
    """Summed SFT terms over expert tokens / N."""
    policy_loss: Tensor
    """Summed RL terms over policy tokens / N."""
    kl: Tensor
    """Summed KL terms over policy tokens / N (without kl_coef); 0 without ref_logp."""
    kl_per_token: Tensor
    """Mean KL term per policy token (what a KL controller targets); 0 without ref_logp or policy tokens."""
    entropy: Tensor
    """Mean entropy over expert and policy tokens; 0 without any."""
    expert_tokens: Tensor
    """Number of expert-prefix tokens carrying the SFT loss."""
    policy_tokens: Tensor
    """Number of policy tokens carrying the RL loss."""
    outside_trust_region: Tensor
    """Fraction of expert tokens with p < trust_region_alpha; 0 without any."""
    clip_fraction: Tensor
    """Fraction of policy tokens where the PPO clip was active; 0 for the unclipped loss."""
    expert_nll: Tensor
    """Mean -log p over expert tokens: the continuous SFT quantity to watch (TrSFT's value jumps at alpha)."""
    rollout_is_mean: Tensor
    """Mean rollout importance weight over policy tokens; 1 without the correction or policy tokens."""
    rollout_is_rejected: Tensor
    """Fraction of policy tokens whose importance weight was truncated or masked; 0 without the correction."""


def trust_region_sft(logp: Tensor, alpha: float) -> Tensor:
    """TrSFT per token: -logp where p >= alpha, -p / alpha where p < alpha; d / d logp = -p / max(p, alpha)."""
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"trust-region alpha must be in [0, 1], got {alpha}")
    probs = logp.exp()  # [B, T]
    # alpha = 0 never selects the -p / alpha branch, but torch.where backpropagates 0 * (1 / 0) = nan through it.
    safe_alpha = alpha if alpha > 0.0 else 1.0
    return torch.where(probs >= alpha, -logp, -probs / safe_alpha)


def plain_sft(logp: Tensor) -> Tensor:
    """Negative log-likelihood per token."""
    return -logp


def luffy_shaped_sft(logp: Tensor, gamma: float = 0.1) -> Tensor:
    """LUFFY's policy shaping per token: -p / (p + gamma); d / d logp = -p * gamma / (p + gamma)^2."""
    probs = logp.exp()  # [B, T]
    return -probs / (probs + gamma)


def unclipped_policy_gradient(logp: Tensor, old_logp: Tensor, advantages: Tensor) -> Tensor:
    """-A * pi / pi_old per token; `advantages` is `[B]`, broadcast over tokens."""
    ratio = torch.exp(logp - old_logp.detach())  # [B, T]
    return -advantages.detach()[:, None] * ratio


def clipped_policy_gradient(
    logp: Tensor, old_logp: Tensor, advantages: Tensor, eps_low: float, eps_high: float
) -> Tensor:
    """PPO per token: -min(r * A, clamp(r, 1 - eps_low, 1 + eps_high) * A); `advantages` is `[B]`."""
    ratio = torch.exp(logp - old_logp.detach())  # [B, T]
    advantages = advantages.detach()[:, None]  # [B, 1]
    clipped_ratio = ratio.clamp(1.0 - eps_low, 1.0 + eps_high)  # [B, T]
    return -torch.minimum(ratio * advantages, clipped_ratio * advantages)


def gspo_policy_gradient(
    logp: Tensor, old_logp: Tensor, advantages: Tensor, policy_mask: Tensor, eps_low: float, eps_high: float
) -> Tensor:
    """GSPO-token (Zheng et al. 2025) per token: -min(s * A, clamp(s, 1 - eps_low, 1 + eps_high) * A) with
    s_t = sg(s_i) * pi_t / sg(pi_t), s_i = exp(mean over the sequence's policy tokens of log(pi / pi_old)).

    The ratio, and so the clip, is the sequence's: a whole sequence is clipped or not; d term / d logp_t = -A * s_i
    where unclipped. `advantages` `[B]`, `policy_mask` `[B, T]`. GSPO's eps are small (the paper: 3e-4 / 4e-4).
    """
    log_ratio = torch.where(policy_mask, logp - old_logp.detach(), 0.0)  # [B, T]
    sequence_ratio = (log_ratio.sum(dim=1) / policy_mask.sum(dim=1).clamp(min=1)).exp()  # [B]
    token_ratio = sequence_ratio.detach()[:, None] * torch.exp(logp - logp.detach())  # [B, T], value s_i
    advantages = advantages.detach()[:, None]  # [B, 1]
    clipped_ratio = token_ratio.clamp(1.0 - eps_low, 1.0 + eps_high)
    return -torch.minimum(token_ratio * advantages, clipped_ratio * advantages)


def _kl_k1(logp: Tensor, ref_logp: Tensor) -> Tensor:
    return logp - ref_logp


def _kl_k2(logp: Tensor, ref_logp: Tensor) -> Tensor:
    return 0.5 * (logp - ref_logp) ** 2


def _kl_k3(logp: Tensor, ref_logp: Tensor) -> Tensor:
    log_ratio = ref_logp - logp  # [B, T]
    return log_ratio.exp() - log_ratio - 1.0


_KL_ESTIMATORS: dict[KLEstimator, Callable[[Tensor, Tensor], Tensor]] = {
    KLEstimator.k1: _kl_k1,
    KLEstimator.k2: _kl_k2,
    KLEstimator.k3: _kl_k3,
}


def kl_penalty(logp: Tensor, ref_logp: Tensor, estimator: KLEstimator) -> Tensor:
    """Per-token KL(pi_theta || pi_ref) estimate: k1 = logp - ref, k2 = (logp - ref)^2 / 2, k3 = e^x - x - 1."""
    return _KL_ESTIMATORS[KLEstimator(estimator)](logp, ref_logp.detach())


def _masked_sum(values: Tensor, mask: Tensor) -> Tensor:
    return torch.where(mask, values, 0.0).sum()


# Each *_sum helper zeroes the log-probs outside its mask before computing terms, so padding garbage (say
# old_logp = -1e9) cannot overflow into inf and come back as 0 * inf = nan through torch.where's backward.


def luffy_off_policy(logp: Tensor, advantages: Tensor, gamma: float = 0.1) -> Tensor:
    """LUFFY's off-policy term per token: -A * p / (p + gamma), `advantages` `[B]` broadcast over tokens;
    d / d logp = -A * p * gamma / (p + gamma)^2."""
    return advantages.detach()[:, None] * luffy_shaped_sft(logp, gamma)


def _sft_sum(logp: Tensor, expert_mask: Tensor, sft_loss: SFTLoss, alpha: float, advantages: Tensor) -> Tensor:
    sft_terms = {
        SFTLoss.trust_region: partial(trust_region_sft, alpha=alpha),
        SFTLoss.plain: plain_sft,
        SFTLoss.luffy_shaping: luffy_shaped_sft,
        SFTLoss.luffy: partial(luffy_off_policy, advantages=advantages),
    }[SFTLoss(sft_loss)]
    return _masked_sum(sft_terms(torch.where(expert_mask, logp, 0.0)), expert_mask)


def _policy_sum(
    logp: Tensor,
    old_logp: Tensor,
    advantages: Tensor,
    policy_mask: Tensor,
    policy_loss: PolicyLoss,
    eps: tuple[float, float],
    weights: Optional[Tensor],
) -> Tensor:
    policy_terms = {
        PolicyLoss.unclipped: unclipped_policy_gradient,
        PolicyLoss.clipped: partial(clipped_policy_gradient, eps_low=eps[0], eps_high=eps[1]),
        PolicyLoss.gspo: partial(gspo_policy_gradient, policy_mask=policy_mask, eps_low=eps[0], eps_high=eps[1]),
    }[PolicyLoss(policy_loss)]
    terms = policy_terms(torch.where(policy_mask, logp, 0.0), torch.where(policy_mask, old_logp, 0.0), advantages)
    if weights is not None:
        terms = terms * weights.detach()
    return _masked_sum(terms, policy_mask)


def _kl_sum(logp: Tensor, ref_logp: Optional[Tensor], policy_mask: Tensor, estimator: KLEstimator) -> Tensor:
    if ref_logp is None:
        return logp.new_zeros(())
    terms = kl_penalty(torch.where(policy_mask, logp, 0.0), torch.where(policy_mask, ref_logp, 0.0), estimator)
    return _masked_sum(terms, policy_mask)


def _clip_fraction(
    logp: Tensor,
    old_logp: Tensor,
    advantages: Tensor,
    policy_mask: Tensor,
    policy_loss: PolicyLoss,
    eps: tuple[float, float],
) -> Tensor:
    """Fraction of policy tokens whose clipped term is the smaller one (zero gradient there)."""
    if PolicyLoss(policy_loss) is PolicyLoss.unclipped:
        return logp.new_zeros((), dtype=torch.float32)
    log_ratio = torch.where(policy_mask, logp - old_logp, 0.0).detach()  # [B, T]
    if PolicyLoss(policy_loss) is PolicyLoss.gspo:  # the sequence's ratio on each of its tokens
        log_ratio = (log_ratio.sum(dim=1, keepdim=True) / policy_mask.sum(dim=1, keepdim=True).clamp(min=1))
        log_ratio = log_ratio.expand_as(policy_mask)
    ratio, advantages = log_ratio.exp(), advantages.detach()[:, None]  # [B, T], [B, 1]
    active = ratio.clamp(1.0 - eps[0], 1.0 + eps[1]) * advantages < ratio * advantages  # [B, T]
    return ((active & policy_mask).sum() / policy_mask.sum().clamp(min=1)).float()


def _check_inputs(logp, old_logp, entropy, advantages, expert_mask, policy_mask, ref_logp, weights, kl_coef,
                  max_tokens):
    """Raises ValueError unless the token tensors are `[B, T]`, advantages `[B]`, masks bool."""
    tokens = {"old_logp": old_logp, "entropy": entropy, "expert_mask": expert_mask, "policy_mask": policy_mask}
    if ref_logp is not None:
        tokens["ref_logp"] = ref_logp
    if weights is not None:
        tokens["importance_weights"] = weights
    if logp.dim() != 2:
        raise ValueError(f"logp must be [B, T], got shape {tuple(logp.shape)}")
    for name, tensor in tokens.items():
        if tensor.shape != logp.shape:
            raise ValueError(f"{name} must match logp's shape {tuple(logp.shape)}, got {tuple(tensor.shape)}")
    if advantages.shape != logp.shape[:1]:
        raise ValueError(f"advantages must be [B] = {tuple(logp.shape[:1])}, got {tuple(advantages.shape)}")
    if expert_mask.dtype != torch.bool or policy_mask.dtype != torch.bool:
        raise ValueError("expert_mask and policy_mask must be bool")
    if kl_coef != 0.0 and ref_logp is None:
        raise ValueError(f"kl_coef = {kl_coef} needs ref_logp")
    if max_tokens < 1:
        raise ValueError(f"max_response_tokens must be >= 1, got {max_tokens}")


def trapo_loss(
    logp: Tensor,
    old_logp: Tensor,
    entropy: Tensor,
    advantages: Tensor,
    expert_mask: Tensor,
    policy_mask: Tensor,
    *,
    ref_logp: Optional[Tensor] = None,
    importance: Optional[ImportanceWeights] = None,
    sft_loss: SFTLoss = SFTLoss.trust_region,
    trust_region_alpha: float = 0.1,
    policy_loss: PolicyLoss = PolicyLoss.unclipped,
    clip_eps_low: float = 0.2,
    clip_eps_high: float = 0.2,
    kl_coef: float = 0.0,
    kl_estimator: KLEstimator = KLEstimator.k3,
    entropy_coef: float = 0.001,
    normalizer: LossNormalizer = LossNormalizer.constant,
    max_response_tokens: int = 8192,
    num_sequences: Optional[float] = None,
    num_loss_tokens: Optional[float] = None,
) -> LossTerms:
    """The TRAPO loss of a batch; token tensors `[B, T]` (float32 / bool masks), advantages `[B]`.

    `importance`: rollout importance weights of the policy tokens (`importance.rollout_importance_weights`); each
    RL term is multiplied by its weight.

    `num_sequences` / `num_loss_tokens`: the whole optimizer step's sequence and loss-token counts when this call
    sees one micro-batch of it (default: this batch's own), so that micro-batch losses sum to the step's loss; the
    mean over ranks of the counts when ranks share the step (module docstring).

    Expert and policy masks are expected to be disjoint (see `masks.response_masks`). The KL stat is reported
    whenever ref_logp is given, even with kl_coef = 0, so the drift from the reference can be watched.
    """
    weights = None if importance is None else importance.weights
    _check_inputs(
        logp, old_logp, entropy, advantages, expert_mask, policy_mask, ref_logp, weights, kl_coef,
        max_response_tokens,
    )
    clip_eps = (clip_eps_low, clip_eps_high)
    sft_sum = _sft_sum(logp, expert_mask, sft_loss, trust_region_alpha, advantages)
    policy_sum = _policy_sum(logp, old_logp, advantages, policy_mask, policy_loss, clip_eps, weights)
    kl_sum = _kl_sum(logp, ref_logp, policy_mask, kl_estimator)

    expert_tokens, policy_tokens = expert_mask.sum().float(), policy_mask.sum().float()
    loss_tokens = expert_mask | policy_mask  # [B, T]
    entropy_sum = _masked_sum(entropy, loss_tokens)
    entropy_mean = entropy_sum / loss_tokens.sum().clamp(min=1)
    step_sequences = logp.shape[0] if num_sequences is None else num_sequences
    step_tokens = logp.new_tensor(float(loss_tokens.sum() if num_loss_tokens is None else num_loss_tokens))
    denominator = {
        LossNormalizer.constant: logp.new_tensor(float(max_response_tokens * step_sequences)),
        LossNormalizer.token_mean: step_tokens.clamp(min=1.0),
    }[LossNormalizer(normalizer)]
    entropy_bonus = entropy_sum / step_tokens.clamp(min=1.0)
    loss = (sft_sum + policy_sum + kl_coef * kl_sum) / denominator - entropy_coef * entropy_bonus

    below_alpha = expert_mask & (logp.detach().exp() < trust_region_alpha)  # [B, T]
    per_expert, per_policy = expert_tokens.clamp(min=1.0), policy_tokens.clamp(min=1.0)
    return LossTerms(
        loss=loss,
        sft_loss=(sft_sum / denominator).detach(),
        policy_loss=(policy_sum / denominator).detach(),
        kl=(kl_sum / denominator).detach(),
        kl_per_token=(kl_sum / policy_tokens.clamp(min=1.0)).detach().float(),
        entropy=entropy_mean.detach().float(),
        expert_tokens=expert_tokens,
        policy_tokens=policy_tokens,
        outside_trust_region=(below_alpha.sum() / expert_mask.sum().clamp(min=1)).float(),
        clip_fraction=_clip_fraction(logp, old_logp, advantages, policy_mask, policy_loss, clip_eps),
        expert_nll=(_masked_sum(-logp.detach(), expert_mask) / per_expert).float(),
        rollout_is_mean=(
            logp.new_ones(()) if importance is None else _masked_sum(importance.weights, policy_mask) / per_policy
        ).float(),
        rollout_is_rejected=(
            logp.new_zeros(()) if importance is None else importance.rejected.sum() / per_policy
        ).float(),
    )


class TrapoLoss:
    """The TRAPO objective as one configurable object (`model.loss`): TrSFT on expert-prefix tokens, the RL term on
    the policy's own tokens, optional KL and rollout importance correction, the entropy bonus and the normaliser.

    Defaults are the paper's (TRAPO.md, "Losses"). Tuning callbacks write `trust_region_alpha` and `kl_coef` here.
    """

    def __init__(
        self,
        sft: SFTLoss = SFTLoss.trust_region,
        trust_region_alpha: float = 0.1,
        policy: PolicyLoss = PolicyLoss.unclipped,
        clip_eps_low: float = 0.2,
        clip_eps_high: float = 0.2,
        kl_coef: float = 0.0,
        kl_estimator: KLEstimator = KLEstimator.k3,
        entropy_coef: float = 0.001,
        normalizer: LossNormalizer = LossNormalizer.constant,
        rollout_correction: RolloutCorrection | None = None,
    ) -> None:
        """
        Args:
            sft: Loss on expert-prefix tokens: trust_region (TrSFT), plain (NLL), luffy (LUFFY's -A * p / (p + 0.1),
                A the sample's group advantage) or luffy_shaping (-p / (p + 0.1), the paper's ablation: A = 1).
            trust_region_alpha: TrSFT threshold alpha: tokens with p < alpha get gradient weight p / alpha (paper: 0.1).
            policy: RL loss on the policy's tokens: unclipped (-A * ratio, the paper), clipped (PPO) or gspo
                (GSPO's sequence-level ratio; use small clip eps, e.g. 3e-4 / 4e-4).
            clip_eps_low: Lower clip range of the clipped and GSPO losses.
            clip_eps_high: Upper clip range of the clipped and GSPO losses (DAPO's clip-higher: > clip_eps_low).
            kl_coef: Weight of the KL penalty to the reference model (paper: 0; the reference is then not loaded).
            kl_estimator: KL estimator: k1, k2 or k3.
            entropy_coef: Weight of the entropy bonus (paper: 0.001).
            normalizer: constant (divide by max_response_tokens per sequence, the paper and Dr.GRPO) or token_mean.
            rollout_correction: Importance-sampling correction of the RL term when the sampler is not pi_old
                (vLLM lagging or in another precision): token/sequence level, truncate/mask. None: off (the paper).
        """
        if not 0.0 <= trust_region_alpha <= 1.0:
            raise ValueError(f"trust_region_alpha must be in [0, 1], got {trust_region_alpha}")
        if clip_eps_low < 0 or clip_eps_high < 0:
            raise ValueError(f"clip eps must be >= 0, got {clip_eps_low} and {clip_eps_high}")
        if kl_coef < 0 or entropy_coef < 0:
            raise ValueError(f"kl_coef and entropy_coef must be >= 0, got {kl_coef} and {entropy_coef}")
        self.sft, self.policy = SFTLoss(sft), PolicyLoss(policy)
        self.trust_region_alpha = trust_region_alpha
        self.clip_eps_low, self.clip_eps_high = clip_eps_low, clip_eps_high
        self.kl_coef, self.kl_estimator = kl_coef, KLEstimator(kl_estimator)
        self.entropy_coef = entropy_coef
        self.normalizer = LossNormalizer(normalizer)
        self.rollout_correction = rollout_correction

    def __call__(
        self,
        logp: Tensor,
        old_logp: Tensor,
        entropy: Tensor,
        advantages: Tensor,
        expert_mask: Tensor,
        policy_mask: Tensor,
        *,
        max_response_tokens: int,
        ref_logp: Optional[Tensor] = None,
        rollout_logp: Optional[Tensor] = None,
        num_sequences: Optional[float] = None,
        num_loss_tokens: Optional[float] = None,
    ) -> LossTerms:
        """`trapo_loss` with these settings; `rollout_logp` `[B, T]` (the sampler's log-probs) feeds the rollout
        correction, when there is one."""
        importance = None
        if self.rollout_correction is not None:
            if rollout_logp is None:
                raise ValueError("the rollout correction needs the sampler's log-probs (rollout_logp)")
            importance = self.rollout_correction(old_logp, rollout_logp, policy_mask)
        return trapo_loss(
            logp, old_logp, entropy, advantages, expert_mask, policy_mask, ref_logp=ref_logp, importance=importance,
            sft_loss=self.sft, trust_region_alpha=self.trust_region_alpha, policy_loss=self.policy,
            clip_eps_low=self.clip_eps_low, clip_eps_high=self.clip_eps_high, kl_coef=self.kl_coef,
            kl_estimator=self.kl_estimator, entropy_coef=self.entropy_coef, normalizer=self.normalizer,
            max_response_tokens=max_response_tokens, num_sequences=num_sequences, num_loss_tokens=num_loss_tokens,
        )
