"""Token log-probabilities and entropies, the inputs of TRAPO.md "Losses".

Every loss term is a function of log pi(token) (TrSFT, the RL ratio, KL) and the entropy bonus needs the entropy
of the next-token distribution. At the paper's shape the logits are the largest tensor of the step: one 8k-token
response over Qwen's 151,936-token vocabulary is 2.5 GB in bf16 and twice that in float32. So:
- `hidden_logprobs_and_entropy` never materialises them: it takes the last hidden states and the LM head's weight
  and walks the tokens in chunks under activation checkpointing, each chunk's `[chunk, V]` logits computed,
  reduced to log p(target) and entropy, and freed; backward recomputes them chunk by chunk (the fused / chunked
  LM head of NeMo-RL and prime-rl). No tensor scaling with T x V exists, in forward or backward.
- `token_logprobs_and_entropy` does the same for logits that already exist (a handful of rows, e.g. a prompt's
  last position).
- log p(target) is the gathered logit minus logsumexp; no `[*, V]` log_softmax is kept beyond a chunk.
- all math is float32 even for bf16 logits, because bf16 log-probs are too coarse for ratios exp(logp - old_logp).
- `temperature` divides the logits first, so the trainer scores the distribution the sampler drew from.
Logits are assumed finite.
"""

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.checkpoint import checkpoint

DEFAULT_CHUNK_TOKENS = 256
"""Tokens per LM-head chunk: about five float32 `[chunk, V]` temporaries live at once, 0.8 GB at Qwen's 151,936
vocabulary (measured: benchmarks/real_shape.py)."""


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


def _rows_logprobs_and_entropy(logits: Tensor, targets: Tensor, temperature: float = 1.0) -> tuple[Tensor, Tensor]:
    """log p(target) and entropy of `[N, V]` logit rows at `temperature` and `[N]` targets, both `[N]` float32."""
    logits = logits.float()  # [N, V]
    if temperature != 1.0:
        logits = logits / temperature
    log_normalizer = torch.logsumexp(logits, dim=-1, keepdim=True)  # [N, 1]
    logprobs = (logits.gather(-1, targets.unsqueeze(-1)) - log_normalizer).squeeze(-1)  # [N]
    log_probs = logits - log_normalizer  # [N, V]
    entropy = -(log_probs.exp() * log_probs).sum(dim=-1)  # [N]
    return logprobs, entropy


def token_logprobs_and_entropy(
    logits: Tensor, targets: Tensor, chunk_size: int = DEFAULT_CHUNK_TOKENS, temperature: float = 1.0
) -> tuple[Tensor, Tensor]:
    """`token_logprobs` and `token_entropy` together, `chunk_size` rows of the B*T rows at a time.

    Args:
        logits: `[B, T, V]` next-token logits, any float dtype.
        targets: `[B, T]` long token ids.
        chunk_size: rows per chunk; bounds the float32 `[chunk_size, V]` temporaries.
        temperature: the logits are divided by it first (the sampling temperature).

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
            logprobs, entropy = checkpoint(
                _rows_logprobs_and_entropy, chunk, chunk_targets, temperature, use_reentrant=False
            )
        else:
            logprobs, entropy = _rows_logprobs_and_entropy(chunk, chunk_targets, temperature)
        logprob_chunks.append(logprobs)
        entropy_chunks.append(entropy)
    if not logprob_chunks:
        empty = logits.new_zeros(batch_size, length, dtype=torch.float32)
        return empty, empty.clone()
    logprobs = torch.cat(logprob_chunks).reshape(batch_size, length)  # [B, T]
    entropy = torch.cat(entropy_chunks).reshape(batch_size, length)  # [B, T]
    return logprobs, entropy


def _head_rows_logprobs_and_entropy(
    hidden: Tensor, weight: Tensor, bias: Tensor | None, targets: Tensor, temperature: float
) -> tuple[Tensor, Tensor]:
    """`[N]` log p(target) and entropy of `[N, H]` hidden rows through the LM head (`[V, H]` weight)."""
    return _rows_logprobs_and_entropy(F.linear(hidden, weight, bias), targets, temperature)  # [N, V] inside only


def hidden_logprobs_and_entropy(
    hidden: Tensor,
    weight: Tensor,
    targets: Tensor,
    bias: Tensor | None = None,
    temperature: float = 1.0,
    chunk_size: int = DEFAULT_CHUNK_TOKENS,
) -> tuple[Tensor, Tensor]:
    """log p(target) and entropy of `softmax(head(hidden) / temperature)`, `chunk_size` tokens at a time.

    Args:
        hidden: `[B, T, H]` last hidden states (after the final norm), any float dtype.
        weight: `[V, H]` LM head weight; `bias`: its `[V]` bias or None.
        targets: `[B, T]` long token ids predicted from each position.
        temperature: the logits are divided by it (the sampling temperature).
        chunk_size: tokens per chunk; bounds every `[chunk_size, V]` temporary, in forward and backward.

    Returns:
        `([B, T], [B, T])` float32 log-probabilities and entropies, differentiable w.r.t. hidden, weight and bias.
    """
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    if hidden.dim() != 3 or targets.shape != hidden.shape[:2]:
        raise ValueError(f"need hidden [B, T, H] and targets [B, T], got {tuple(hidden.shape)}, {tuple(targets.shape)}")
    batch_size, length, width = hidden.shape
    rows = hidden.reshape(batch_size * length, width)  # [B*T, H]
    row_targets = targets.reshape(batch_size * length)  # [B*T]
    recompute = torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad)
    logprob_chunks, entropy_chunks = [], []
    for chunk, chunk_targets in zip(rows.split(chunk_size), row_targets.split(chunk_size)):
        if recompute:
            logprobs, entropy = checkpoint(
                _head_rows_logprobs_and_entropy, chunk, weight, bias, chunk_targets, temperature, use_reentrant=False
            )
        else:
            logprobs, entropy = _head_rows_logprobs_and_entropy(chunk, weight, bias, chunk_targets, temperature)
        logprob_chunks.append(logprobs)
        entropy_chunks.append(entropy)
    if not logprob_chunks:
        empty = hidden.new_zeros(batch_size, length, dtype=torch.float32)
        return empty, empty.clone()
    return torch.cat(logprob_chunks).reshape(batch_size, length), torch.cat(entropy_chunks).reshape(batch_size, length)
