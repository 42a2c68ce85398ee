"""`HFGenerateEngine` on a tiny real Qwen2: budgets, EOS, sampler log-probs against a plain forward and against the
stacked-logits path it replaced, the memory of its log-prob bookkeeping, splitting."""

import json
from types import SimpleNamespace

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from transformers import GenerationConfig, Qwen2Config, Qwen2ForCausalLM

from helpers import (  # noqa: F401 (one_torch_thread: autouse fixture)
    ScriptedEngine,
    one_torch_thread,
    plain_forward_logprobs,
    requests_for,
    tiny_qwen2,
)
from test_module import make_module
from trapo_lightning.rollout import HFGenerateEngine, RolloutRequest, SamplingParams
from trapo_lightning.rollout.base import as_eos_ids, eos_token_ids
from trapo_lightning.rollout.hf_generate import _left_pad, _seeded, _trim
from trapo_lightning.seeding import derive_seed

TEMPERATURE = 0.7


class EosBias:
    """Forward hook on the LM head that shifts the EOS logit, so a random tiny model can be made to end rows when a
    test needs it: by `value` at every position, or, with `at_call = k`, +50 at the k-th forward of a `generate`
    (0 is the prefill, so new token k) and -50 at every other."""

    def __init__(self, eos: int):
        self.eos = eos
        self.value = 0.0
        self.at_call = None
        self.calls = 0

    def __call__(self, module, inputs, output):
        bias = self.value if self.at_call is None else (50.0 if self.calls == self.at_call else -50.0)
        self.calls += 1
        output = output.clone()
        output[..., self.eos] += bias
        return output


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    source = tiny_qwen2(tmp_path_factory.mktemp("rollout") / "model")
    tokenizer = source.load_tokenizer()
    policy = source.load_model().train()
    eos_bias = EosBias(tokenizer.eos_token_id)
    policy.lm_head.register_forward_hook(eos_bias)  # part of the policy: generate and plain forwards both see it
    return policy, tokenizer, eos_bias


@pytest.fixture
def policy_and_tokenizer(model):
    policy, tokenizer, eos_bias = model
    eos_bias.value, eos_bias.at_call, eos_bias.calls = 0.0, None, 0
    return policy, tokenizer


@pytest.fixture
def eos_bias(model, policy_and_tokenizer):
    return model[2]


@pytest.fixture
def engine(policy_and_tokenizer):
    policy, tokenizer = policy_and_tokenizer
    engine = HFGenerateEngine(max_batch_size=3)
    engine.bind(policy, [tokenizer.eos_token_id], tokenizer.pad_token_id)
    return engine


def test_generate_before_bind_raises_a_clear_error():
    with pytest.raises(RuntimeError, match="before bind"):
        HFGenerateEngine().generate([RolloutRequest((5, 6), 3)], SamplingParams())


def test_rejects_a_non_positive_batch_cap():
    with pytest.raises(ValueError, match="max_batch_size"):
        HFGenerateEngine(max_batch_size=0)


def test_rows_without_eos_run_to_their_own_budget(engine, policy_and_tokenizer, eos_bias):
    policy, tokenizer = policy_and_tokenizer
    eos_bias.value = -50.0  # EOS is never sampled
    budgets = [1, 6, 3, 12, 2, 8, 5]  # one generate call per 3 rows runs to the row-group's longest budget
    generations = engine.generate(requests_for(tokenizer, budgets), SamplingParams(temperature=TEMPERATURE))
    assert [len(g.token_ids) for g in generations] == budgets
    assert [len(g.logprobs) for g in generations] == budgets
    assert not any(g.finished for g in generations)
    assert all(tokenizer.eos_token_id not in g.token_ids for g in generations)
    assert policy.training  # generate ran in eval mode and gave the policy back as it was


def test_rows_stop_at_eos_and_keep_it(policy_and_tokenizer, eos_bias):
    policy, tokenizer = policy_and_tokenizer
    eos = tokenizer.eos_token_id
    engine = HFGenerateEngine()  # one generate call: every row sees EOS at the same step
    engine.bind(policy, [eos], tokenizer.pad_token_id)
    eos_bias.at_call = 2  # new token 2 (the third) is EOS in every row
    budgets = [1, 2, 3, 5, 8]
    generations = engine.generate(requests_for(tokenizer, budgets), SamplingParams(temperature=TEMPERATURE))
    # budget 1 and 2 end before the EOS (cut, unfinished); the others end with it (kept, finished), and nothing
    # after it survives although the call ran on for the other rows' budgets
    assert [len(g.token_ids) for g in generations] == [1, 2, 3, 3, 3]
    assert [g.finished for g in generations] == [False, False, True, True, True]
    for gen in generations:
        assert (gen.token_ids[-1] == eos) == gen.finished
        assert eos not in gen.token_ids[:-1]
        assert len(gen.logprobs) == len(gen.token_ids)
    assert generations[2].logprobs[-1] == pytest.approx(0.0, abs=1e-6)  # the +50 EOS is certain


def test_sampled_rows_are_consistent_whatever_they_sample(engine, policy_and_tokenizer, eos_bias):
    _, tokenizer = policy_and_tokenizer
    eos = tokenizer.eos_token_id
    eos_bias.value = 5.0  # some rows end early, some run out
    budgets = [1, 6, 3, 12, 2, 8, 5, 12, 12]
    torch.manual_seed(0)
    generations = engine.generate(requests_for(tokenizer, budgets), SamplingParams(temperature=TEMPERATURE))
    assert len(generations) == len(budgets)
    for gen, budget in zip(generations, budgets):
        assert 1 <= len(gen.token_ids) <= budget
        assert len(gen.logprobs) == len(gen.token_ids)
        # finished <=> the row ended with EOS, which is kept and appears nowhere else
        assert gen.finished == (gen.token_ids[-1] == eos)
        assert eos not in gen.token_ids[:-1]
        if not gen.finished:
            assert len(gen.token_ids) == budget  # only the budget stops a row without EOS


def test_logprobs_are_the_policy_log_softmax_over_temperature_at_the_sampled_ids(
    engine, policy_and_tokenizer, eos_bias
):
    policy, tokenizer = policy_and_tokenizer
    eos_bias.value = 1.0  # the hooked logits are the policy's: the sampler and the forward both see them
    requests = requests_for(tokenizer, [10, 4, 10, 7, 10])  # different prompt lengths: left padding in generate
    torch.manual_seed(1)
    generations = engine.generate(requests, SamplingParams(temperature=TEMPERATURE))
    for request, gen in zip(requests, generations):
        expected = plain_forward_logprobs(policy, request.token_ids, gen.token_ids, TEMPERATURE)
        torch.testing.assert_close(torch.tensor(gen.logprobs), expected, atol=1e-4, rtol=0)
        # and not at T = 1: the temperature really is part of the log-prob
        at_one = plain_forward_logprobs(policy, request.token_ids, gen.token_ids, 1.0)
        assert not torch.allclose(torch.tensor(gen.logprobs), at_one, atol=1e-3)


def test_more_requests_than_the_batch_cap_are_split_transparently(engine, policy_and_tokenizer):
    policy, tokenizer = policy_and_tokenizer
    batch_sizes = []

    def record(module, args, kwargs):
        batch_sizes.append(kwargs["input_ids"].shape[0])

    handle = policy.register_forward_pre_hook(record, with_kwargs=True)
    try:
        requests = requests_for(tokenizer, [4, 6, 2, 5, 3, 6, 1])  # 7 requests, cap 3 -> calls of 3, 3, 1
        torch.manual_seed(2)
        generations = engine.generate(requests, SamplingParams(temperature=TEMPERATURE))
    finally:
        handle.remove()
    assert len(generations) == 7
    assert set(batch_sizes) == {3, 1} and max(batch_sizes) <= engine.max_batch_size
    # results come back in request order: each matches a forward over its own prompt
    for request, gen in zip(requests, generations):
        assert len(gen.token_ids) <= request.max_new_tokens
        expected = plain_forward_logprobs(policy, request.token_ids, gen.token_ids, TEMPERATURE)
        torch.testing.assert_close(torch.tensor(gen.logprobs), expected, atol=1e-4, rtol=0)


def test_zero_budget_returns_empty_unfinished_generations(engine, policy_and_tokenizer):
    _, tokenizer = policy_and_tokenizer
    generations = engine.generate(requests_for(tokenizer, [0, 0]), SamplingParams())
    assert [tuple(g) for g in generations] == [([], [], False), ([], [], False)]


def test_repeated_requests_share_one_prefill_and_sample_what_separate_prefills_sample(policy_and_tokenizer, eos_bias):
    """A group's rollouts repeat one prompt: prefilled once, copied; the samples and log-probs are those of an engine
    that prefills every row, and the log-probs still match a plain forward."""
    policy, tokenizer = policy_and_tokenizer
    eos_bias.value = 1.0
    base = requests_for(tokenizer, [8, 8, 8])  # three prompts of different lengths
    requests = [base[0]] * 4 + [base[1]] * 2 + [base[2]]  # a round: 4 + 2 copies and a single row
    prefills = []
    handle = policy.base_model.register_forward_pre_hook(
        lambda module, args, kwargs: prefills.append(kwargs["input_ids"].shape), with_kwargs=True
    )
    runs = {}
    try:
        for share in (True, False):
            prefills.clear()
            engine = HFGenerateEngine(share_prefill=share)
            engine.bind(policy, [tokenizer.eos_token_id], tokenizer.pad_token_id)
            runs[share] = engine.generate(requests, SamplingParams(temperature=TEMPERATURE, seed=5))
            if share:  # the shared prefill: 3 distinct rows of W - 1 tokens, then generate's one new position
                width = max(len(r.token_ids) for r in requests)
                assert prefills[:2] == [(3, width - 1), (7, 1)]
            else:
                assert prefills[0] == (7, max(len(r.token_ids) for r in requests))
    finally:
        handle.remove()
    for shared, separate, request in zip(runs[True], runs[False], requests):
        assert shared.token_ids == separate.token_ids
        torch.testing.assert_close(torch.tensor(shared.logprobs), torch.tensor(separate.logprobs), atol=1e-5, rtol=0)
        expected = plain_forward_logprobs(policy, request.token_ids, shared.token_ids, TEMPERATURE)
        torch.testing.assert_close(torch.tensor(shared.logprobs), expected, atol=1e-4, rtol=0)
    assert len({tuple(g.token_ids) for g in runs[True][:4]}) > 1  # copies of one prompt still sample independently


def stacked_logits_generate(policy, requests, params, eos, pad):
    """The engine's former path, as the naive reference: `generate` returns every step's logits, stacked to
    `[N, T, V]`, then log softmax(logits / T) gathered at the sampled ids. Same seed as the engine's first chunk."""
    input_ids, attention_mask = _left_pad([r.token_ids for r in requests], pad, torch.device("cpu"))
    config = GenerationConfig(
        do_sample=True, temperature=params.temperature, top_p=params.top_p, top_k=0,
        max_new_tokens=max(r.max_new_tokens for r in requests), eos_token_id=eos, pad_token_id=pad,
        return_dict_in_generate=True, output_logits=True,
    )
    policy.eval()
    try:
        with torch.no_grad(), _seeded(derive_seed(params.seed, 0), input_ids.device):
            result = policy.generate(input_ids=input_ids, attention_mask=attention_mask, generation_config=config)
    finally:
        policy.train()
    new_ids = result.sequences[:, input_ids.shape[1] :]  # [N, T]
    logits = torch.stack(result.logits, dim=1).float() / params.temperature  # [N, T, V]
    logprobs = torch.log_softmax(logits, dim=-1).gather(-1, new_ids.unsqueeze(-1)).squeeze(-1)  # [N, T]
    return new_ids, logprobs


@pytest.mark.parametrize("temperature, top_p", [(TEMPERATURE, 1.0), (1.0, 0.8), (1.3, 0.9)])
def test_step_by_step_logprobs_sample_and_score_exactly_what_the_stacked_logits_path_did(
    policy_and_tokenizer, eos_bias, temperature, top_p
):
    """Same seed, same ids; log-probs equal to float32 rounding. With top-p < 1 the log-prob stays log softmax(
    logits / T) before the top-p cut, as before (and as the trainer recomputes it)."""
    policy, tokenizer = policy_and_tokenizer
    eos_bias.value = 3.0 * temperature  # some rows end early: the EOS padding of finished rows is cut the same way
    requests = requests_for(tokenizer, [12] * 6)
    params = SamplingParams(temperature=temperature, top_p=top_p, seed=11)
    engine = HFGenerateEngine(share_prefill=False)
    engine.bind(policy, [tokenizer.eos_token_id], tokenizer.pad_token_id)
    generations = engine.generate(requests, params)
    eos_bias.calls = 0
    ids, logprobs = stacked_logits_generate(policy, requests, params, [tokenizer.eos_token_id], tokenizer.pad_token_id)
    assert any(g.finished for g in generations) and not all(g.finished for g in generations)
    for gen, row_ids, row_logprobs in zip(generations, ids, logprobs):
        n = len(gen.token_ids)
        assert gen.token_ids == row_ids[:n].tolist()
        torch.testing.assert_close(torch.tensor(gen.logprobs), row_logprobs[:n], atol=1e-6, rtol=0)


class LargestAllocation(TorchDispatchMode):
    """Records the largest tensor any op allocates inside the block (views and in-place results share their input's
    storage and are not allocations)."""

    def __init__(self):
        super().__init__()
        self.numel = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {t.untyped_storage().data_ptr() for t in _tensors((args, kwargs))}
        for tensor in _tensors(out):
            if tensor.untyped_storage().data_ptr() not in inputs:
                self.numel = max(self.numel, tensor.numel())
        return out


def _tensors(tree):
    if isinstance(tree, torch.Tensor):
        yield tree
    elif isinstance(tree, (list, tuple)):
        for item in tree:
            yield from _tensors(item)
    elif isinstance(tree, dict):
        for item in tree.values():
            yield from _tensors(item)


def test_logprob_bookkeeping_never_holds_more_than_one_step_of_a_real_size_vocabulary(tiny_tokenizer):
    """Qwen2.5's 151,936-entry vocabulary on a 16-wide, 1-layer model: the largest tensor a rollout allocates is one
    step's `[N, V]` logits, however many steps it decodes; the stacked-logits path allocated `[N, T, V]`."""
    vocab, rows, budget = 151_936, 4, 32
    config = Qwen2Config(vocab_size=vocab, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=True)
    torch.manual_seed(0)
    policy = Qwen2ForCausalLM(config).train()
    eos, pad = tiny_tokenizer.eos_token_id, tiny_tokenizer.pad_token_id
    requests = [RolloutRequest(r.token_ids, budget) for r in requests_for(tiny_tokenizer, [budget] * rows)]
    engine = HFGenerateEngine()
    engine.bind(policy, [eos], pad)
    with LargestAllocation() as new:
        generations = engine.generate(requests, SamplingParams(seed=3))
    with LargestAllocation() as old:
        ids, _ = stacked_logits_generate(policy, requests, SamplingParams(seed=3), eos, pad)
    steps = ids.shape[1]
    assert steps == budget and max(len(g.token_ids) for g in generations) == budget  # a random model: EOS is rare
    assert new.numel == rows * vocab  # one step's logits (and its log-softmax): 608k floats, 2.4 MB
    assert old.numel == rows * steps * vocab  # 19M floats, 78 MB, and growing with every decoded token


# -- every EOS id ---------------------------------------------------------------------------------------------------
def test_trim_cuts_at_the_first_of_any_eos_id_and_keeps_it():
    logprobs = [-0.1, -0.2, -0.3, -0.4, -0.5]
    # 9 and 4 both end a row: 4 comes first (index 2), so the row is its first 3 ids, finished
    assert _trim([5, 6, 4, 9, 7], logprobs, budget=5, eos_ids=(9, 4)) == ([5, 6, 4], [-0.1, -0.2, -0.3], True)
    # the budget (2) cuts before either EOS: unfinished
    assert _trim([5, 6, 4, 9, 7], logprobs, budget=2, eos_ids=(9, 4)) == ([5, 6], [-0.1, -0.2], False)
    assert _trim([5, 6, 7], logprobs[:3], budget=5, eos_ids=(9, 4)) == ([5, 6, 7], [-0.1, -0.2, -0.3], False)


def test_eos_ids_are_the_tokenizers_then_the_generation_configs_without_repeats():
    tokenizer = SimpleNamespace(eos_token_id=151643)
    policy = SimpleNamespace(generation_config=SimpleNamespace(eos_token_id=[151645, 151643]))  # Qwen2.5-Instruct's
    assert eos_token_ids(tokenizer, policy) == (151643, 151645)
    policy.generation_config.eos_token_id = 7  # an int, as many configs write it
    assert eos_token_ids(tokenizer, policy) == (151643, 7)
    assert eos_token_ids(tokenizer, object()) == (151643,)  # no generation config: the tokenizer's alone
    tokenizer.eos_token_id = policy.generation_config.eos_token_id = None
    with pytest.raises(ValueError, match="names an EOS token"):
        eos_token_ids(tokenizer, policy)
    assert as_eos_ids(5) == (5,) and as_eos_ids([5, 6]) == (5, 6)
    with pytest.raises(ValueError, match="eos_token_ids is empty"):
        as_eos_ids([])


def test_rows_stop_at_whichever_eos_id_comes_first(policy_and_tokenizer, eos_bias):
    policy, tokenizer = policy_and_tokenizer
    eos, other = tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids("?")
    assert other not in (eos, tokenizer.pad_token_id, tokenizer.unk_token_id)
    eos_bias.value = -50.0  # the tokenizer's EOS is never sampled
    second = EosBias(other)
    handle = policy.lm_head.register_forward_hook(second)
    runs = {}
    try:
        for ids in ([eos], [eos, other]):
            second.at_call, second.calls = 2, 0  # new token 2 (the third) is `other` in every row
            engine = HFGenerateEngine()
            engine.bind(policy, ids, tokenizer.pad_token_id)
            runs[len(ids)] = engine.generate(requests_for(tokenizer, [1, 3, 8]), SamplingParams(seed=4))
    finally:
        handle.remove()
    # bound to the tokenizer's EOS alone, `other` is an ordinary token: every row runs to its budget
    assert [len(g.token_ids) for g in runs[1]] == [1, 3, 8] and not any(g.finished for g in runs[1])
    # bound to both, rows end at `other` (kept, finished), and the budget-1 row before it
    assert [len(g.token_ids) for g in runs[2]] == [1, 3, 3]
    assert [g.finished for g in runs[2]] == [False, True, True]
    assert runs[2][2].token_ids[-1] == other


def test_the_module_binds_the_engine_to_every_eos_id_of_the_policy(tmp_path):
    """A tiny model whose generation_config.json lists two EOS ids, as Qwen2.5's do."""
    source = tiny_qwen2(tmp_path / "model")
    config_file = source.resolve() / "generation_config.json"
    tokenizer = source.load_tokenizer()
    other = tokenizer.convert_tokens_to_ids("?")
    config = json.loads(config_file.read_text())
    config["eos_token_id"] = [other, tokenizer.eos_token_id]
    config_file.write_text(json.dumps(config))
    engine = ScriptedEngine([])
    module = make_module(source, rollout=engine)
    module.configure_model()
    assert engine.eos_ids == (tokenizer.eos_token_id, other)
