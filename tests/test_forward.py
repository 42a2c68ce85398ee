"""The shared-prompt training forward gives the plain forward's logits and gradients, on a real tiny Qwen2."""

import pytest
import torch

from tests.helpers import one_torch_thread, tiny_qwen2  # noqa: F401
from trapo_lightning.batch import build_train_batch
from trapo_lightning.forward import plain_logits, response_logits, shared_prompt_logits
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


def masked(logits, batch):
    """Logits at real response positions only; padded positions hold arbitrary values on either path."""
    real = batch.attention_mask[:, batch.prompt_width:].bool()  # [N, T]
    return logits[real]


@pytest.mark.parametrize("shuffle", [False, True])
def test_shared_prompt_logits_equal_the_plain_forward(model, shuffle):
    batch = groups_batch(shuffle)
    with torch.no_grad():
        plain = plain_logits(model, batch)
        shared = shared_prompt_logits(model, batch)
    assert shared.shape == plain.shape == (6, 5, model.config.vocab_size)
    torch.testing.assert_close(masked(shared, batch), masked(plain, batch), atol=1e-5, rtol=1e-5)


def test_shared_prompt_gradients_equal_the_plain_forward(model):
    """The prompt runs once, so its parameters' gradient must collect every row of the group through the cache."""
    batch = groups_batch(shuffle=True)
    grads = []
    for forward in (plain_logits, shared_prompt_logits):
        model.zero_grad(set_to_none=True)
        logits = forward(model, batch)
        weights = torch.linspace(-1.0, 1.0, logits.shape[-1])  # an arbitrary loss touching every logit
        (masked(logits, batch) * weights).sum().backward()
        grads.append({name: p.grad.clone() for name, p in model.named_parameters()})
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], atol=1e-5, rtol=1e-4, msg=name)


def test_response_logits_uses_the_plain_forward_when_no_prompt_repeats(model):
    batch = groups_batch(shuffle=False)
    one_per_prompt = type(batch)(*(t[[0, 3]] for t in batch))
    calls = []
    handle = model.register_forward_hook(lambda *_: calls.append(1))
    with torch.no_grad():
        response_logits(model, one_per_prompt)
        response_logits(model, batch)
    handle.remove()
    assert len(calls) == 1 + 2  # plain: one forward; shared: the prompts, then the responses
