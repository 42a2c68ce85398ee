"""The training forward (`trapo_lightning/forward.py`) on real tiny Qwen2s: the chunked LM head gives the log-probs,
entropies and gradients of a plain full-logits forward, the shared-prompt forward gives the plain forward's, and
no `[N, T, V]` tensor exists at a real vocabulary size."""

import pytest
import torch
from transformers import AutoModelForCausalLM, Qwen2Config

from tests.helpers import one_torch_thread, tiny_qwen2  # noqa: F401
from tests.test_logprobs_memory import peak_allocated_bytes
from trapo_lightning.batch import build_train_batch
from trapo_lightning.forward import plain_logprobs, response_logprobs, shared_prompt_logprobs
from trapo_lightning.reward import Verdict
from trapo_lightning.sampling import Sample


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return tiny_qwen2(tmp_path_factory.mktemp("tiny")).load_model()


def groups_batch(shuffle: bool):
    """Two prompts of different lengths (so one is left-padded), each with unguided, guided and full-solution rows
    of different response lengths; optionally with the rows of the two groups interleaved."""
    def sample(p, prompt, response, prefix_len):
        own = len(response) - prefix_len
        return Sample(p, 0, 0.0, prompt, response, prefix_len, (-1.0,) * own, True, 0.0, Verdict.wrong)

    p0, p1 = (5, 6, 7), (8, 9, 10, 11, 12, 13, 14)
    samples = [
        sample(0, p0, (20, 21, 22, 23), 0),
        sample(0, p0, (24, 25), 0),
        sample(0, p0, (30, 31, 32), 2),
        sample(1, p1, (40,), 0),
        sample(1, p1, (41, 42, 43, 44, 45), 1),
        sample(1, p1, (46, 47, 48), 3),
    ]
    if shuffle:
        samples = [samples[i] for i in (3, 0, 4, 1, 5, 2)]
    return build_train_batch(samples, torch.zeros(len(samples)), pad_id=0)


def naive_logprobs(model, batch, temperature):
    """log_softmax over the full `[N, T, V]` logits of one forward: the reference the fast paths must match."""
    logits = model(
        input_ids=batch.input_ids, attention_mask=batch.attention_mask, position_ids=batch.position_ids,
        use_cache=False,
    ).logits.float() / temperature  # [N, W, V]
    positions = batch.predicting_positions()  # [N, T]: column prompt_length - 1 + j predicts response token j
    log_probs = torch.log_softmax(logits.gather(1, positions[..., None].expand(-1, -1, logits.shape[-1])), dim=-1)
    logp = log_probs.gather(-1, batch.targets.unsqueeze(-1)).squeeze(-1)
    return logp, -(log_probs.exp() * log_probs).sum(-1)


def real(batch):
    """Real response positions only; padded positions hold arbitrary values on every path."""
    return batch.response_mask  # [N, T]


def gradients(model, forward, batch):
    """Parameter gradients of an arbitrary loss touching every real log-prob and entropy."""
    model.zero_grad(set_to_none=True)
    logp, entropy = forward(model, batch)
    mask = real(batch)
    weights = torch.linspace(-1.0, 1.0, int(mask.sum()))
    ((logp[mask] * weights).sum() + (entropy[mask] * weights.flip(0)).sum()).backward()
    return {name: p.grad.clone() for name, p in model.named_parameters()}


def assert_same_gradients(got, expected):
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], atol=1e-5, rtol=1e-4, msg=name)


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_the_chunked_head_gives_the_full_logits_values_and_gradients(model, temperature):
    batch = groups_batch(shuffle=False)
    # chunks of 4 tokens: 6 rows x 5 positions = 30 scored positions in 8 chunks, the last one partial
    chunked = lambda m, b: plain_logprobs(m, b, temperature, chunk_tokens=4)  # noqa: E731
    naive = lambda m, b: naive_logprobs(m, b, temperature)  # noqa: E731
    with torch.no_grad():
        logp, entropy = chunked(model, batch)
        expected_logp, expected_entropy = naive(model, batch)
    assert logp.shape == entropy.shape == (6, 5) and logp.dtype == torch.float32
    mask = real(batch)
    torch.testing.assert_close(logp[mask], expected_logp[mask], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(entropy[mask], expected_entropy[mask], atol=1e-5, rtol=1e-5)
    assert_same_gradients(gradients(model, chunked, batch), gradients(model, naive, batch))


@pytest.mark.parametrize("shuffle", [False, True])
def test_shared_prompt_scores_equal_the_plain_forward(model, shuffle):
    batch = groups_batch(shuffle)
    with torch.no_grad():
        plain = plain_logprobs(model, batch, 0.7)
        shared = shared_prompt_logprobs(model, batch, 0.7)
    mask = real(batch)
    for got, expected in zip(shared, plain):
        assert got.shape == expected.shape == (6, 5)
        torch.testing.assert_close(got[mask], expected[mask], atol=1e-5, rtol=1e-5)


def test_shared_prompt_gradients_equal_the_plain_forward(model):
    """The prompt runs once, so its parameters' gradient must collect every row of the group through the cache."""
    batch = groups_batch(shuffle=True)
    assert_same_gradients(gradients(model, shared_prompt_logprobs, batch), gradients(model, plain_logprobs, batch))


def test_the_output_layer_is_the_models_own_again_after_the_forward(model):
    head = model.get_output_embeddings()
    with torch.no_grad():
        plain_logprobs(model, groups_batch(shuffle=False))
    assert model.get_output_embeddings() is head
    assert model.lm_head.weight is model.model.embed_tokens.weight  # still tied
    assert list(dict(model.named_parameters())) == list(dict(tiny_like(model).named_parameters()))


def tiny_like(model):
    return AutoModelForCausalLM.from_config(model.config)


def test_response_logprobs_uses_the_plain_forward_when_no_prompt_repeats(model):
    batch = groups_batch(shuffle=False)
    one_per_prompt = type(batch)(*(None if t is None else t[[0, 3]] for t in batch))
    calls = []
    handle = model.register_forward_hook(lambda *_: calls.append(1))
    with torch.no_grad():
        response_logprobs(model, one_per_prompt)
        response_logprobs(model, batch)
    handle.remove()
    assert len(calls) == 1 + 2  # plain: one forward; shared: the prompts, then the responses


def test_no_logits_tensor_at_a_real_vocabulary():
    """Qwen's 151,936-token vocabulary, a 16-wide model, 2 responses of 256 tokens: full float32 logits would be
    2 x 256 x 151936 x 4 B = 311 MB. Through the chunked head (16 tokens a chunk: one [16, V] float32 temporary is
    9.7 MB) forward + backward stays under a quarter of that; a path that materialises the logits needs at least
    the logits and their gradient. Measured: 59 MB through the chunked head (about five [chunk, V] temporaries in
    the recomputing backward); 1869 MB (6.0x the logits) for the forward before issue 11 (the model's logits, then
    chunked log-probs)."""
    vocab, length = 151_936, 256
    config = Qwen2Config(vocab_size=vocab, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=True)
    torch.manual_seed(0)
    policy = AutoModelForCausalLM.from_config(config)
    prompt, response = tuple(range(1, 9)), tuple(torch.randint(0, vocab, (length,)).tolist())
    samples = [Sample(i, 0, 0.0, prompt, response, 0, (-1.0,) * length, True, 0.0, Verdict.wrong) for i in range(2)]
    batch = build_train_batch(samples, torch.zeros(2), pad_id=0)
    logits_bytes = 2 * length * vocab * 4

    def chunked():
        logp, entropy = plain_logprobs(policy, batch, chunk_tokens=16)
        (logp.sum() + entropy.sum()).backward()

    def materialised():
        logp, entropy = naive_logprobs(policy, batch, 1.0)
        (logp.sum() + entropy.sum()).backward()

    assert peak_allocated_bytes(chunked) < logits_bytes / 4
    assert peak_allocated_bytes(materialised) >= 2 * logits_bytes
