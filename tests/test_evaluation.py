"""avg@k and unbiased pass@k: the estimator by hand, the metrics' sum states, and evaluation through Lightning.

The estimator is checked against hand arithmetic and the binomial form; the metrics against the merge that a
multi-process reduction performs (each state stacked over "ranks" and reduced with its own `dist_reduce_fx`), so
DDP correctness is tested without starting processes. The module is then run under a real Trainer on several
benchmarks, with n samples per problem, and `ValidateOnStart` must log the numbers validation would.
"""

import math

import lightning as L
import pytest
import torch
from lightning.pytorch.loggers import Logger

from helpers import ScriptedEngine, one_torch_thread, tiny_qwen2  # noqa: F401 (autouse fixture)
from trapo_lightning.callbacks import ValidateOnStart
from trapo_lightning.data.datamodule import TrapoDataModule
from trapo_lightning.data.sources import JsonlSource, SyntheticSource
from trapo_lightning.data.synthetic import SyntheticArithmetic
from trapo_lightning.evaluation import AverageAtK, EvalProtocol, PassAtK, pass_at_k
from trapo_lightning.metrics import BenchmarkMetrics, Evaluation, metric_prefix
from trapo_lightning.module import TrapoModule
from trapo_lightning.reward import RewardResult, Verdict
from trapo_lightning.rollout.base import Generation
from trapo_lightning.seeding import derive_seed

MAX_RESPONSE_TOKENS = 24


# -- the estimator ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "n, c, k, expected",
    [
        (4, 1, 2, 0.5),  # 1 - C(3,2)/C(4,2) = 1 - 3/6
        (5, 2, 2, 0.7),  # 1 - C(3,2)/C(5,2) = 1 - 3/10
        (5, 0, 3, 0.0),  # no correct sample: no k-subset holds one
        (6, 6, 4, 1.0),  # all correct
        (4, 3, 2, 1.0),  # n - c = 1 < k = 2: every pair holds a correct sample
        (10, 3, 1, 0.3),  # k = 1 is c / n
        (32, 8, 1, 0.25),
    ],
)
def test_pass_at_k_by_hand(n, c, k, expected):
    assert pass_at_k(n, c, k) == pytest.approx(expected, abs=1e-12)


def test_pass_at_k_equals_the_binomial_form_and_k1_is_the_share_correct():
    for n in range(1, 13):
        for c in range(n + 1):
            assert pass_at_k(n, c, 1) == pytest.approx(c / n, abs=1e-12)
            for k in range(1, n + 1):
                assert pass_at_k(n, c, k) == pytest.approx(1 - math.comb(n - c, k) / math.comb(n, k), abs=1e-12)


def test_pass_at_k_stays_finite_where_the_binomials_leave_the_float_range():
    # C(2000, 1000) ~ 1e600: as floats the binomials overflow; the product does not (exact ints for the reference)
    exact = 1 - math.comb(2000 - 10, 1000) / math.comb(2000, 1000)
    assert 0 < pass_at_k(2000, 10, 1000) == pytest.approx(exact, rel=1e-9)


@pytest.mark.parametrize("n, c, k", [(4, 1, 0), (4, 1, 5), (4, 5, 2), (4, -1, 2)])
def test_pass_at_k_refuses_impossible_arguments(n, c, k):
    with pytest.raises(ValueError):
        pass_at_k(n, c, k)


# -- the metrics -----------------------------------------------------------------------------------------------------
def test_metrics_average_per_problem_over_batches():
    # n = 4; problems with 1, 0, 4 and 2 correct samples, in two batches
    batches = [torch.tensor([1, 0]), torch.tensor([4, 2])]
    pass2, avg = PassAtK(2), AverageAtK()
    for correct in batches:
        pass2.update(correct, samples=4)
        avg.update(correct, samples=4)
    # pass@2 per problem: 1 - C(3,2)/C(4,2) = 0.5, 0, 1, 1 - C(2,2)/C(4,2) = 5/6
    assert float(pass2.compute()) == pytest.approx((0.5 + 0 + 1 + 5 / 6) / 4)
    assert float(avg.compute()) == pytest.approx(7 / 16)  # 7 correct of 4 x 4 samples


def synced(metrics):
    """What a reduction across ranks makes of these metrics' states: each stacked and reduced by its dist_reduce_fx."""
    first = metrics[0]
    return {
        name: first._reductions[name](torch.stack([getattr(m, name) for m in metrics]))
        for name in first._defaults
    }


@pytest.mark.parametrize("make", [lambda: PassAtK(3), AverageAtK], ids=["pass@3", "avg@n"])
def test_a_reduction_over_ranks_equals_one_metric_over_all_problems(make):
    # uneven shares (3 problems on one rank, 1 on the other): a mean of per-rank means would weigh them equally
    rank0, rank1, everything = make(), make(), make()
    rank0.update(torch.tensor([0, 5, 2]), samples=5)
    rank1.update(torch.tensor([1]), samples=5)
    everything.update(torch.tensor([0, 5, 2, 1]), samples=5)
    states = synced([rank0, rank1])
    assert all(fx is not None and fx.__name__ == "dim_zero_sum" for fx in rank0._reductions.values())
    for name, value in states.items():
        assert torch.equal(value, getattr(everything, name)), name
    rank0.merge_state(rank1)  # torchmetrics' own merge gives the same
    assert float(rank0.compute()) == pytest.approx(float(everything.compute()))
    per_rank_means = (float(make_updated(make, [0, 5, 2]).compute()) + float(make_updated(make, [1]).compute())) / 2
    assert per_rank_means != pytest.approx(float(everything.compute()))


def make_updated(make, correct):
    metric = make()
    metric.update(torch.tensor(correct), samples=5)
    return metric


def test_correct_counts_outside_zero_to_n_are_refused():
    with pytest.raises(ValueError, match=r"correct counts must lie in \[0, 4\]"):
        AverageAtK().update(torch.tensor([5]), samples=4)
    with pytest.raises(ValueError, match="1 <= k <= n"):
        PassAtK(8).update(torch.tensor([1]), samples=4)


def graded(pattern: str) -> list[RewardResult]:
    """'c' correct, 'w' wrong, 'u' unparseable, 't' timeout."""
    verdicts = {"c": Verdict.correct, "w": Verdict.wrong, "u": Verdict.unparseable, "t": Verdict.timeout}
    return [RewardResult(verdicts[x], float(x == "c")) for x in pattern]


def test_benchmark_metrics_of_one_batch_by_hand():
    # 2 problems x 4 samples: problem 0 has 1 correct (c w w u), problem 1 has 2 (c c t w)
    results = graded("cwwu" + "cctw")
    generations = [Generation([1] * length, [0.0] * length, length < 5) for length in (2, 4, 6, 4, 2, 2, 5, 7)]
    metrics = BenchmarkMetrics(samples=4, pass_at_k=[1, 2])
    metrics.update(Evaluation(results, generations, 4))
    assert metrics.results("val/aime24") == pytest.approx({
        "val/aime24/accuracy": 3 / 8,
        "val/aime24/avg@4": 3 / 8,
        "val/aime24/pass@1": 3 / 8,  # pass@1 is the share correct
        "val/aime24/pass@2": (0.5 + (1 - 1 / 6)) / 2,  # 1 - C(3,2)/C(4,2); 1 - C(2,2)/C(4,2)
        "val/aime24/response_length": 32 / 8,
        "val/aime24/truncated_fraction": 3 / 8,  # lengths 6, 5 and 7 ran out of budget
        "val/aime24/wrong_fraction": 3 / 8,
        "val/aime24/unparseable_fraction": 1 / 8,
        "val/aime24/timeout_fraction": 1 / 8,
    })
    with pytest.raises(ValueError, match="count 4 samples per problem, got 2"):
        metrics.update(Evaluation(results, generations, 2))


def test_metric_names_keep_val_accuracy_for_the_held_out_split():
    assert metric_prefix("val", "val") == "val"
    assert metric_prefix("test", "val") == "test"
    assert metric_prefix("val", "aime24") == "val/aime24"
    assert metric_prefix("test", "math500") == "test/math500"


# -- evaluation through Lightning ------------------------------------------------------------------------------------
class EveryFirstCorrect:
    """Grades the first of every `n` completions of a call correct, the rest wrong: c = 1 of n per problem."""

    def __init__(self, n: int) -> None:
        self.n = n
        self.calls: list[list[str]] = []

    def __call__(self, completions, answers):
        self.calls.append(list(answers))
        return [RewardResult(Verdict.correct, 1.0) if i % self.n == 0 else RewardResult(Verdict.wrong, 0.0)
                for i in range(len(completions))]


class RecordingEngine(ScriptedEngine):
    """A scripted engine that also records the sampling parameters of every call."""

    def __init__(self) -> None:
        super().__init__([7, 8, 9])
        self.params = []

    def generate(self, requests, params):
        self.params.append(params)
        return super().generate(requests, params)


class MemoryLogger(Logger):
    name, version = "memory", 0

    def __init__(self):
        super().__init__()
        self.logged: list[tuple[int, dict]] = []

    @property
    def experiment(self):
        return None

    def log_metrics(self, metrics, step=None):
        self.logged.append((step, dict(metrics)))

    def log_hyperparams(self, *args, **kwargs):
        pass


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    policy_source = tiny_qwen2(tmp_path_factory.mktemp("evaluation") / "model")
    policy_source.resolve()
    return policy_source


def benchmark_file(write_jsonl, name, count):
    return write_jsonl(f"{name}.jsonl", [{"problem": f"Compute {i} + 1.", "answer": str(i + 1)} for i in range(count)])


def make_data(source, benchmarks=None, val_batch_size=2) -> TrapoDataModule:
    return TrapoDataModule(
        policy=source,
        source=SyntheticSource(SyntheticArithmetic(num_operands=2, digits=1), train_size=8, val_size=3),
        prompts_per_step=2, val_batch_size=val_batch_size, max_prompt_tokens=256,
        max_response_tokens=MAX_RESPONSE_TOKENS, benchmarks=benchmarks,
    )


def make_module(source, **overrides) -> TrapoModule:
    options = dict(policy=source, max_prompt_tokens=256, max_response_tokens=MAX_RESPONSE_TOKENS, rollout_seed=11)
    return TrapoModule(**(options | overrides))


def make_trainer(**overrides) -> L.Trainer:
    options = dict(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                   enable_model_summary=False)
    return L.Trainer(**(options | overrides))


@pytest.fixture
def two_benchmarks(write_jsonl):
    return {
        "aime24": JsonlSource(val_files=[benchmark_file(write_jsonl, "aime24", 3)]),
        "math500": JsonlSource(val_files=[benchmark_file(write_jsonl, "math500", 4)]),
    }


def test_validate_and_test_report_avg_and_pass_at_k_per_benchmark(source, two_benchmarks):
    grader, engine = EveryFirstCorrect(4), RecordingEngine()
    module = make_module(source, rollout=engine, reward=grader, evaluation=EvalProtocol(samples=4, pass_at_k=[1, 2, 4]))
    data = make_data(source, two_benchmarks)
    trainer = make_trainer()
    (aime, math500) = trainer.validate(module, datamodule=data, verbose=False)
    # c = 1 of n = 4 on every problem: avg@4 = pass@1 = 1/4; pass@2 = 1 - C(3,2)/C(4,2) = 1/2; pass@4 = 1
    expected = {"accuracy": 0.25, "avg@4": 0.25, "pass@1": 0.25, "pass@2": 0.5, "pass@4": 1.0}
    assert {k: aime[f"val/aime24/{k}"] for k in expected} == pytest.approx(expected)
    assert {k: math500[f"val/math500/{k}"] for k in expected} == pytest.approx(expected)
    assert not any("dataloader_idx" in key for key in trainer.callback_metrics)
    assert aime["val/aime24/response_length"] == 3.0  # the scripted 3 tokens, no EOS
    assert aime["val/aime24/truncated_fraction"] == 1.0
    # each problem's 4 requests are consecutive; batches of 2 problems: aime24 3 = 2 + 1, math500 4 = 2 + 2
    assert [len(call) for call in engine.calls] == [8, 4, 8, 8]
    first = engine.calls[0]
    assert first[0] == first[1] == first[2] == first[3] != first[4]
    assert grader.calls[0] == ["1"] * 4 + ["2"] * 4  # answers repeated per sample

    (aime_test, _) = trainer.test(module, datamodule=data, verbose=False)
    assert {k: aime_test[f"test/aime24/{k}"] for k in expected} == pytest.approx(expected)
    assert not any(key.startswith("val/") for key in aime_test)


def test_the_default_benchmark_keeps_val_accuracy(source):
    module = make_module(source, rollout=RecordingEngine(), reward=EveryFirstCorrect(2), evaluation=EvalProtocol(samples=2))
    (metrics,) = make_trainer().validate(module, datamodule=make_data(source), verbose=False)
    assert metrics["val/accuracy"] == metrics["val/avg@2"] == metrics["val/pass@1"] == pytest.approx(0.5)
    assert set(metrics) == {
        "val/accuracy", "val/avg@2", "val/pass@1", "val/response_length", "val/truncated_fraction",
        "val/wrong_fraction", "val/unparseable_fraction", "val/timeout_fraction",
        "val/expert_nll",  # the held-out split has expert solutions: the held-out SFT loss
    }


def test_the_held_out_sft_loss_is_the_teacher_forced_nll_of_the_expert_solutions(source):
    """val/expert_nll against a plain forward of each held-out problem's prompt + solution + EOS: the mean -log p
    per solution token, pooled over the split (3 problems)."""
    import torch

    module = make_module(source, rollout=RecordingEngine(), reward=EveryFirstCorrect(1))
    data = make_data(source)
    (metrics,) = make_trainer().validate(module, datamodule=data, verbose=False)
    total, tokens = 0.0, 0
    stream = data.streams["val"]
    records = [stream.tokens.prompt_record(i) for i in range(len(stream.tokens))]
    with torch.no_grad():
        for record in records:
            response = record.solution_ids + (module.tokenizer.eos_token_id,)
            ids = torch.tensor([record.prompt_ids + response])
            logits = module.policy(input_ids=ids).logits[0, len(record.prompt_ids) - 1 : -1]  # [R, V]
            logp = torch.log_softmax(logits.float(), dim=-1).gather(-1, torch.tensor(response)[:, None])
            total, tokens = total - float(logp.sum()), tokens + len(response)
    assert metrics["val/expert_nll"] == pytest.approx(total / tokens, rel=1e-5)


def test_metrics_restart_every_validation(source):
    # two validations of the same module: the second must not include the first's problems
    module = make_module(source, rollout=RecordingEngine(), reward=EveryFirstCorrect(1))
    data = make_data(source)
    trainer = make_trainer()
    assert trainer.validate(module, datamodule=data, verbose=False)[0]["val/accuracy"] == 1.0
    module.reward = EveryFirstCorrect(3)  # of 3 problems, batches of 2 and 1: 1 of 2 correct, then 1 of 1
    assert trainer.validate(module, datamodule=data, verbose=False)[0]["val/accuracy"] == pytest.approx(2 / 3)


def test_the_sanity_check_is_not_counted_in_the_first_validation(source):
    trainer = make_trainer(max_steps=1, num_sanity_val_steps=1, val_check_interval=1)

    def correct_only_in_the_sanity_check(completions, answers):
        verdict = Verdict.correct if trainer.sanity_checking else Verdict.wrong
        return [RewardResult(verdict, float(verdict is Verdict.correct)) for _ in completions]

    module = make_module(source, rollout=RecordingEngine(), reward=correct_only_in_the_sanity_check)
    trainer.fit(module, datamodule=make_data(source))
    assert trainer.callback_metrics["val/accuracy"] == 0.0


def test_sampling_seeds_depend_on_benchmark_step_and_batch_only(source, two_benchmarks):
    engine = RecordingEngine()
    module = make_module(source, rollout=engine, reward=EveryFirstCorrect(1), evaluation=EvalProtocol(samples=3))
    make_trainer().validate(module, datamodule=make_data(source, two_benchmarks), verbose=False)
    seeds = [p.seed for p in engine.params]
    # step 0, rank 0; the seed of the held-out split is what one sample per prompt always used: (val, step, batch)
    prefixes = ("val/aime24", "val/math500")
    assert seeds == [derive_seed(11, prefix, 0, batch, 0) for prefix in prefixes for batch in (0, 1)]
    assert all(p.temperature == 0.6 for p in engine.params)
    engine.params.clear()
    make_trainer().validate(module, datamodule=make_data(source), verbose=False)
    assert [p.seed for p in engine.params] == [derive_seed(11, "val", 0, batch, 0) for batch in (0, 1)]


def test_validate_on_start_logs_what_validation_logs(source, two_benchmarks):
    """Real sampling (tiny random policy, HF generate) and the real verifier: ValidateOnStart at step 0 must log
    exactly the numbers a validation at step 0 logs, for every benchmark."""
    options = dict(evaluation=EvalProtocol(samples=3, pass_at_k=[1, 3]))
    logger = MemoryLogger()
    data = make_data(source, two_benchmarks)
    callback = ValidateOnStart()
    module = make_module(source, **options)
    # one step of an epoch of 4: the run's only validation is the one at start
    trainer = make_trainer(logger=logger, callbacks=[callback], max_steps=1, num_sanity_val_steps=0)
    trainer.fit(module, datamodule=data)
    assert callback.runs == 1
    ((step, at_start),) = [(s, m) for s, m in logger.logged if any(k.startswith("val/") for k in m)]
    assert step == 0
    at_start.pop("epoch")  # Lightning adds the epoch to every validation it logs

    fresh = make_module(source, **options)
    validated = make_trainer().validate(fresh, datamodule=make_data(source, two_benchmarks), verbose=False)
    merged = {k: v for metrics in validated for k, v in metrics.items()}
    assert set(at_start) == set(merged)
    assert {k for k in merged if k.endswith("/pass@3")} == {"val/aime24/pass@3", "val/math500/pass@3"}
    assert at_start == pytest.approx(merged)
    assert at_start["val/aime24/response_length"] > 0


class CountValidationHooks(L.Callback):
    """The validation hooks every callback sees, with the step they came at."""

    def __init__(self):
        self.batches, self.epochs = [], []

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0):
        self.batches.append((trainer.global_step, outputs["benchmark"], len(outputs["evaluation"].results)))

    def on_validation_epoch_end(self, trainer, pl_module):
        self.epochs.append(trainer.global_step)


def test_validate_on_start_is_the_validation_loop_every_callback_sees(source, two_benchmarks):
    """Step 0 goes through Lightning's validation loop, so other callbacks get their validation hooks for it (before
    this, `CompletionsTable` never saw step 0), and like every validation it validates nothing at limit_val_batches 0.
    (That a resumed run skips it is tested on real resumed runs: test_resume.py, test_scale.py.)"""
    hooks = CountValidationHooks()
    trainer = make_trainer(callbacks=[ValidateOnStart(), hooks], max_steps=1, num_sanity_val_steps=0)
    module = make_module(source, rollout=RecordingEngine(), reward=EveryFirstCorrect(1))
    trainer.fit(module, datamodule=make_data(source, two_benchmarks))
    # aime24's 3 problems in batches of 2 + 1, math500's 4 in 2 + 2; one validation epoch, at step 0
    assert hooks.batches == [(0, "aime24", 2), (0, "aime24", 1), (0, "math500", 2), (0, "math500", 2)]
    assert hooks.epochs == [0]
    assert module.training and module.policy.training  # training resumes in train mode

    limited = CountValidationHooks()
    callback = ValidateOnStart()
    trainer = make_trainer(callbacks=[callback, limited], max_steps=1, limit_val_batches=0)
    trainer.fit(make_module(source, rollout=RecordingEngine(), reward=EveryFirstCorrect(1)),
                datamodule=make_data(source, two_benchmarks))
    assert callback.runs == 0 and limited.batches == []


def test_invalid_protocols_fail_at_construction():
    with pytest.raises(ValueError, match="samples must be >= 1"):
        EvalProtocol(samples=0)
    with pytest.raises(ValueError, match="samples must be >= 1"):
        EvalProtocol(samples_per_benchmark={"aime24": 0})
    with pytest.raises(ValueError, match="distinct"):
        EvalProtocol(samples=4, pass_at_k=[2, 2])
    with pytest.raises(ValueError, match="must include 1"):
        EvalProtocol(pass_at_k=[4])
    with pytest.raises(ValueError, match="at least one benchmark"):
        EvalProtocol(averages={"math_avg": []})


def test_each_benchmark_gets_its_own_number_of_answers_and_only_the_k_it_allows():
    protocol = EvalProtocol(samples=1, pass_at_k=[1, 8, 32], samples_per_benchmark={"aime24": 32, "amc": 8})
    assert [protocol.samples_for(name) for name in ("aime24", "amc", "math500")] == [32, 8, 1]
    assert protocol.pass_at_k_for("aime24") == (1, 8, 32)
    assert protocol.pass_at_k_for("amc") == (1, 8)
    assert protocol.pass_at_k_for("math500") == (1,)
    with pytest.raises(ValueError, match=r"names benchmarks \['gsm8k'\]"):
        EvalProtocol(averages={"math_avg": ["aime24", "gsm8k"]}).check_benchmarks(["aime24", "math500"])


def test_per_benchmark_answers_and_an_average_over_benchmarks(source, two_benchmarks):
    """aime24 (3 problems) with 4 answers each, math500 (4 problems) with 1; every first answer correct and the
    rest wrong (EveryFirstCorrect(n) with each benchmark's n): aime24 avg@4 = 3 / 12 = 0.25, math500 avg@1 = 1;
    their average 0.625, logged as val/math_avg."""
    protocol = EvalProtocol(samples=1, pass_at_k=[1, 4], samples_per_benchmark={"aime24": 4},
                            averages={"math_avg": ["aime24", "math500"]})

    class FirstOfEachProblem:
        """Correct for the first answer to each problem (answers come problem by problem), the rest wrong."""

        reward_range = (0.0, 1.0)

        def __call__(self, completions, answers):
            first = [i == 0 or answers[i] != answers[i - 1] for i in range(len(answers))]
            return [RewardResult(Verdict.correct if f else Verdict.wrong, float(f)) for f in first]

    module = make_module(source, rollout=RecordingEngine(), reward=FirstOfEachProblem(), evaluation=protocol)
    metrics = {k: v for m in make_trainer().validate(module, datamodule=make_data(source, two_benchmarks),
                                                     verbose=False) for k, v in m.items()}
    assert metrics["val/aime24/avg@4"] == pytest.approx(0.25)
    assert metrics["val/aime24/pass@4"] == pytest.approx(1.0)
    assert metrics["val/math500/avg@1"] == pytest.approx(1.0)
    assert "val/math500/pass@4" not in metrics
    assert metrics["val/math_avg"] == pytest.approx(0.625)


def test_a_protocol_naming_a_missing_benchmark_stops_before_any_answer(source, two_benchmarks):
    module = make_module(source, rollout=RecordingEngine(), reward=EveryFirstCorrect(1),
                         evaluation=EvalProtocol(averages={"math_avg": ["aime24", "amc23"]}))
    with pytest.raises(ValueError, match="amc23"):
        make_trainer().validate(module, datamodule=make_data(source, two_benchmarks), verbose=False)
