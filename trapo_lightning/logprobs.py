"""Token log-probabilities and entropies from logits, the inputs of TRAPO.md "Losses".

Every loss term is a function of log pi(token) (TrSFT, the RL ratio, KL) and the entropy bonus needs the entropy
of the next-token distribution. With a vocabulary of ~150k, a full float32 log_softmax of a [B, T, V] bf16 batch
is several times the size of the logits, so:
- log p(target) is the gathered logit minus logsumexp; no [B, T, V] log_softmax is kept.
- all math is float32 even for bf16 logits, because bf16 log-probs are too coarse for ratios exp(logp - old_logp).
- `token_logprobs_and_entropy` walks the B*T rows in chunks under activation checkpointing, so the float32
  temporaries, including those autograd would save for backward, exist for one chunk at a time; backward
  recomputes them chunk by chunk. Logits are assumed finite.
"""

import torch
from torch import Tensor
from torch.utils.checkpoint import checkpoint


def token_logprobs(logits: Tensor, targets: Tensor) -> Tensor:
    """log p(target) under softmax(logits).

    Args:
        logits: `[B, T, V]` next-token logits, any float dtype.
        targets: `[B, T]` long token ids.

    Returns:
        `[B, T]` float32 log-probabilities.
    """
    target_logits = logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1).float()  # [B, T]
    return target_logits - torch.logsumexp(logits.float(), dim=-1)


def token_entropy(logits: Tensor) -> Tensor:
    """Entropy of softmax(logits), float32.

    Args:
        logits: `[B, T, V]` next-token logits, any float dtype.

    Returns:
        `[B, T]` float32 entropies in nats.
    """
    logits = logits.float()  # [B, T, V]
    log_probs = logits - torch.logsumexp(logits, dim=-1, keepdim=True)  # [B, T, V]
    return -(log_probs.exp() * log_probs).sum(dim=-1)


def _rows_logprobs_and_entropy(logits: Tensor, targets: Tensor) -> tuple[Tensor, Tensor]:
    """log p(target) and entropy of `[N, V]` logit rows and `[N]` targets, both `[N]` float32."""
    logits = logits.float()  # [N, V]
    log_normalizer = torch.logsumexp(logits, dim=-1, keepdim=True)  # [N, 1]
    logprobs = (logits.gather(-1, targets.unsqueeze(-1)) - log_normalizer).squeeze(-1)  # [N]
    log_probs = logits - log_normalizer  # [N, V]
    entropy = -(log_probs.exp() * log_probs).sum(dim=-1)  # [N]
    return logprobs, entropy


def token_logprobs_and_entropy(logits: Tensor, targets: Tensor, chunk_size: int = 1024) -> tuple[Tensor, Tensor]:
    """`token_logprobs` and `token_entropy` together, `chunk_size` rows of the B*T rows at a time.

    Args:
        logits: `[B, T, V]` next-token logits, any float dtype.
        targets: `[B, T]` long token ids.
        chunk_size: rows per chunk; bounds the float32 `[chunk_size, V]` temporaries.

    Returns:
        `([B, T], [B, T])` float32 log-probabilities and entropies; differentiable w.r.t. logits.
    """
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    if logits.dim() != 3 or targets.shape != logits.shape[:2]:
        raise ValueError(f"need logits [B, T, V] and targets [B, T], got {tuple(logits.shape)}, {tuple(targets.shape)}")
    batch_size, length, vocab = logits.shape
    rows = logits.reshape(batch_size * length, vocab)  # [B*T, V]
    row_targets = targets.reshape(batch_size * length)  # [B*T]
    # Checkpointing only pays when autograd would otherwise save each chunk's float32 temporaries.
    recompute = torch.is_grad_enabled() and logits.requires_grad
    logprob_chunks, entropy_chunks = [], []
    # split, not slicing: each slice's backward would zero-fill and add a full [B*T, V] gradient (quadratic in T)
    for chunk, chunk_targets in zip(rows.split(chunk_size), row_targets.split(chunk_size)):
        if recompute:
            logprobs, entropy = checkpoint(_rows_logprobs_and_entropy, chunk, chunk_targets, use_reentrant=False)
        else:
            logprobs, entropy = _rows_logprobs_and_entropy(chunk, chunk_targets)
        logprob_chunks.append(logprobs)
        entropy_chunks.append(entropy)
    if not logprob_chunks:
        empty = logits.new_zeros(batch_size, length, dtype=torch.float32)
        return empty, empty.clone()
    logprobs = torch.cat(logprob_chunks).reshape(batch_size, length)  # [B, T]
    entropy = torch.cat(entropy_chunks).reshape(batch_size, length)  # [B, T]
    return logprobs, entropy
