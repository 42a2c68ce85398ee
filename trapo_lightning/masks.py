"""Loss masks for expert-prefix and policy tokens, TRAPO.md "Per-prompt sampling" and "Losses".

A guided rollout's response is the expert prefix followed by the policy's continuation. Expert-prefix tokens get
the (trust-region) SFT loss, the policy's own tokens get the RL loss. All guided rollouts of one micro-group of
one prompt share the same prefix, so only one of them (the first in the batch) carries the prefix loss; the
others' prefix tokens get no loss at all, and expert tokens are not counted several times.
Positions are response-relative: t = 0 is the first response token (the first prefix token if guided).
"""

from typing import NamedTuple

import torch
from torch import Tensor


class ResponseMasks(NamedTuple):
    """Boolean `[B, width]` token masks in response-relative positions."""

    expert: Tensor
    """Expert-prefix tokens that carry the SFT loss."""
    policy: Tensor
    """Tokens the policy generated, which carry the RL loss."""


def prefix_loss_carriers(prompt_index: Tensor, micro_group_index: Tensor, prefix_len: Tensor) -> Tensor:
    """Which samples carry the SFT loss of their shared expert prefix.

    Args:
        prompt_index: `[B]` long, the prompt of each sample.
        micro_group_index: `[B]` long, the micro-group of each sample.
        prefix_len: `[B]` long, expert-prefix tokens of each sample (0 = unguided).

    Returns:
        `[B]` bool, True for the first sample (lowest batch position) with prefix_len > 0 of each
        (prompt, micro-group) pair; the input need not be sorted.
    """
    if not (prompt_index.dim() == micro_group_index.dim() == prefix_len.dim() == 1):
        raise ValueError("prompt_index, micro_group_index and prefix_len must all be [B]")
    if not (prompt_index.shape == micro_group_index.shape == prefix_len.shape):
        raise ValueError(
            f"shapes differ: {tuple(prompt_index.shape)}, {tuple(micro_group_index.shape)}, "
            f"{tuple(prefix_len.shape)}"
        )
    guided = prefix_len > 0  # [B]
    same_pair = (prompt_index[:, None] == prompt_index[None, :]) & (
        micro_group_index[:, None] == micro_group_index[None, :]
    )  # [B, B]: row b, column c
    batch_size = prefix_len.shape[0]
    earlier = torch.ones(batch_size, batch_size, dtype=torch.bool, device=prefix_len.device).tril(-1)  # c < b
    has_earlier_carrier = (same_pair & earlier & guided[None, :]).any(dim=1)  # [B]
    return guided & ~has_earlier_carrier


def response_masks(
    prefix_len: Tensor, response_len: Tensor, carries_prefix_loss: Tensor, width: int
) -> ResponseMasks:
    """Expert and policy token masks of a padded response batch.

    Args:
        prefix_len: `[B]` long, expert-prefix tokens at the start of each response.
        response_len: `[B]` long, all response tokens (prefix + continuation) before padding.
        carries_prefix_loss: `[B]` bool, from `prefix_loss_carriers`.
        width: padded response width T.

    Returns:
        `ResponseMasks` with expert[b, t] = carries[b] and t < prefix_len[b], and
        policy[b, t] = prefix_len[b] <= t < response_len[b]; both bool `[B, width]`.
    """
    if not (prefix_len.shape == response_len.shape == carries_prefix_loss.shape) or prefix_len.dim() != 1:
        raise ValueError("prefix_len, response_len and carries_prefix_loss must all be [B]")
    if bool((prefix_len < 0).any()) or bool((prefix_len > response_len).any()) or bool((response_len > width).any()):
        raise ValueError(f"need 0 <= prefix_len <= response_len <= width = {width}")
    positions = torch.arange(width, device=prefix_len.device)[None, :]  # [1, T]
    expert = carries_prefix_loss.bool()[:, None] & (positions < prefix_len[:, None])  # [B, T]
    policy = (positions >= prefix_len[:, None]) & (positions < response_len[:, None])  # [B, T]
    return ResponseMasks(expert=expert, policy=policy)
