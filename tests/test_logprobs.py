"""Token log-probs and entropies: fast paths against naive ones, chunked against unchunked."""

import math

import pytest
import torch

from trapo_lightning.logprobs import token_entropy, token_logprobs, token_logprobs_and_entropy


def _batch(dtype=torch.float32, seed=0):
    generator = torch.Generator().manual_seed(seed)
    logits = (3.0 * torch.randn(2, 5, 11, generator=generator)).to(dtype)  # [B, T, V]
    targets = torch.randint(0, 11, (2, 5), generator=generator)  # [B, T]
    return logits, targets


def test_hand_case():
    # logits [0, ln 3] -> softmax [1/4, 3/4]
    logits = torch.tensor([[[0.0, math.log(3.0)]]], requires_grad=True)  # [1, 1, 2]
    targets = torch.tensor([[1]])
    logp = token_logprobs(logits, targets)
    # log p(1) = ln 0.75 = -0.287682
    torch.testing.assert_close(logp, torch.tensor([[math.log(0.75)]]))
    # d log p(1) / d logits = onehot(1) - p = [-0.25, 0.25]
    (grad,) = torch.autograd.grad(logp.sum(), logits)
    torch.testing.assert_close(grad, torch.tensor([[[-0.25, 0.25]]]))

    entropy = token_entropy(logits)
    # H = -(0.25 ln 0.25 + 0.75 ln 0.75) = 0.346574 + 0.215762 = 0.562335
    torch.testing.assert_close(entropy, torch.tensor([[0.562335]]), rtol=0, atol=1e-6)
    # dH / dx_j = -p_j (ln p_j + H): j=0: -0.25 (-1.386294 + 0.562335) = 0.205990, j=1: -0.205990
    (grad,) = torch.autograd.grad(entropy.sum(), logits)
    torch.testing.assert_close(grad, torch.tensor([[[0.205990, -0.205990]]]), rtol=0, atol=1e-6)


def test_fast_logprobs_match_log_softmax_gather():
    logits, targets = _batch()
    naive = torch.log_softmax(logits, -1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    torch.testing.assert_close(token_logprobs(logits, targets), naive, rtol=1e-6, atol=1e-6)


def test_entropy_matches_naive():
    logits, _ = _batch()
    naive = -(torch.softmax(logits, -1) * torch.log_softmax(logits, -1)).sum(-1)
    torch.testing.assert_close(token_entropy(logits), naive, rtol=1e-6, atol=1e-6)


def test_bf16_logits_give_float32_results_of_the_upcast_logits():
    logits, targets = _batch(dtype=torch.bfloat16)
    upcast = logits.float()
    naive = torch.log_softmax(upcast, -1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    logp = token_logprobs(logits, targets)
    assert logp.dtype == torch.float32
    torch.testing.assert_close(logp, naive, rtol=1e-6, atol=1e-6)
    assert token_entropy(logits).dtype == torch.float32
    logp_chunked, entropy_chunked = token_logprobs_and_entropy(logits, targets, chunk_size=3)
    assert logp_chunked.dtype == entropy_chunked.dtype == torch.float32
    torch.testing.assert_close(logp_chunked, naive, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("chunk_size", [1, 3, 10, 1024])  # B*T = 10 rows: uneven, exact, single chunk
def test_chunked_matches_unchunked_values_and_gradients(chunk_size):
    logits, targets = _batch(seed=1)
    weights = torch.randn(2, 2, 5, generator=torch.Generator().manual_seed(2))  # mixes both outputs

    full_logits = logits.clone().requires_grad_(True)
    logp, entropy = token_logprobs(full_logits, targets), token_entropy(full_logits)
    (full_grad,) = torch.autograd.grad((weights[0] * logp + weights[1] * entropy).sum(), full_logits)

    chunk_logits = logits.clone().requires_grad_(True)
    chunk_logp, chunk_entropy = token_logprobs_and_entropy(chunk_logits, targets, chunk_size=chunk_size)
    (chunk_grad,) = torch.autograd.grad((weights[0] * chunk_logp + weights[1] * chunk_entropy).sum(), chunk_logits)

    torch.testing.assert_close(chunk_logp, logp, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(chunk_entropy, entropy, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(chunk_grad, full_grad, rtol=1e-6, atol=1e-6)


def test_chunked_without_grad():
    logits, targets = _batch()
    with torch.no_grad():
        logp, entropy = token_logprobs_and_entropy(logits.requires_grad_(True), targets, chunk_size=4)
    assert not logp.requires_grad and not entropy.requires_grad
    torch.testing.assert_close(logp, token_logprobs(logits.detach(), targets))


def test_chunked_validates_arguments():
    logits, targets = _batch()
    with pytest.raises(ValueError, match="chunk_size"):
        token_logprobs_and_entropy(logits, targets, chunk_size=0)
    with pytest.raises(ValueError, match=r"\[B, T\]"):
        token_logprobs_and_entropy(logits, targets[:, :3])
