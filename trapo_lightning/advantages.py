"""Group-relative advantages, TRAPO.md "Losses" (Dr.GRPO advantage).

A_j = r_j - mean(r over all G samples of the prompt). Guided samples (those continuing an expert prefix) are
part of the group: the paper takes the mean over all G samples, so a prompt rescued by guidance still gives its
unguided failures a negative advantage. Dr.GRPO drops the std scaling because dividing by the group's std
up-weights prompts that are nearly all right or all wrong; `scale_by_std` restores plain GRPO for ablations.
"""

from torch import Tensor


def dr_grpo_advantages(rewards: Tensor, scale_by_std: bool = False, eps: float = 1e-6) -> Tensor:
    """Advantages of each sample relative to the other samples of its prompt.

    Args:
        rewards: `[P, G]` rewards of the G samples (guided ones included) of each of P prompts.
        scale_by_std: divide by the group's population std plus `eps` (plain GRPO) instead of not at all.
        eps: keeps the std division finite for groups whose rewards are all equal.

    Returns:
        `[P, G]` float32 advantages.
    """
    if rewards.dim() != 2:
        raise ValueError(f"rewards must be [P, G] (prompts x samples), got shape {tuple(rewards.shape)}")
    rewards = rewards.float()  # [P, G]
    advantages = rewards - rewards.mean(dim=1, keepdim=True)  # [P, G]
    if scale_by_std:
        advantages = advantages / (rewards.std(dim=1, unbiased=False, keepdim=True) + eps)
    return advantages
