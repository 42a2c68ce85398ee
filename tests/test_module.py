"""`TrapoModule` under a real Lightning Trainer on a tiny Qwen2 and the synthetic task.

What the step must do to the models: the policy moves, the frozen reference does not (nor is it optimised or put in
train mode; with kl_coef 0 and no KL-tuning callback it is not even loaded), micro-batching does not change the
update, and checkpoints hold the policy but not the reference, which is restored from the policy folder on load.
"""

import lightning as L
import pytest
import torch

from helpers import ScriptedEngine, one_torch_thread, tiny_qwen2  # noqa: F401 (autouse fixture)
from trapo_lightning.batch import build_train_batch
from trapo_lightning.data.datamodule import TrapoDataModule
from trapo_lightning.data.sources import SyntheticSource
from trapo_lightning.data.synthetic import SyntheticArithmetic
from trapo_lightning.losses import TrapoLoss
from trapo_lightning.module import TrapoModule
from trapo_lightning.reward import RewardResult, Verdict
from trapo_lightning.sampling import Sample

MAX_PROMPT_TOKENS = 256
MAX_RESPONSE_TOKENS = 24  # room for a one-digit solution "3 + 4 = 7\n\n\boxed{7}" + EOS


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    policy_source = tiny_qwen2(tmp_path_factory.mktemp("module") / "model")
    policy_source.resolve()
    return policy_source


def adamw(params):
    return torch.optim.AdamW(params, lr=1e-2)


LOSS_SETTINGS = {"kl_coef", "entropy_coef", "normalizer", "trust_region_alpha", "policy", "sft", "clip_eps_low",
                 "clip_eps_high", "rollout_correction"}


def make_module(source, **overrides) -> TrapoModule:
    """A module on `source`; overrides named like `TrapoLoss` settings go to its `loss`."""
    kwargs = dict(
        policy=source, optimizer=adamw, max_prompt_tokens=MAX_PROMPT_TOKENS, max_response_tokens=MAX_RESPONSE_TOKENS
    )
    loss = {k: overrides.pop(k) for k in list(overrides) if k in LOSS_SETTINGS}
    return TrapoModule(**(kwargs | overrides), loss=TrapoLoss(**loss))


def make_data(source) -> TrapoDataModule:
    return TrapoDataModule(
        policy=source,
        source=SyntheticSource(SyntheticArithmetic(num_operands=2, digits=1), train_size=8, val_size=2),
        prompts_per_step=2,  # x G = 8 -> 16 sequences per step
        val_batch_size=2,
        max_prompt_tokens=MAX_PROMPT_TOKENS,
        max_response_tokens=MAX_RESPONSE_TOKENS,
    )


def make_trainer(max_steps=1, callbacks=()) -> L.Trainer:
    return L.Trainer(
        accelerator="cpu", devices=1, max_steps=max_steps, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0,
        callbacks=list(callbacks),
    )


def snapshot(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


class ModeObserver(L.Callback):
    """Records the train/eval mode of both models at every training batch and the policy at train start."""

    def __init__(self):
        self.modes = []
        self.policy_at_start = None

    def on_train_start(self, trainer, pl_module):
        self.policy_at_start = snapshot(pl_module.policy)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        reference = pl_module.reference
        self.modes.append((pl_module.policy.training, None if reference is None else reference.training))


class CountCalls:
    def __init__(self, module: torch.nn.Module):
        self.count = 0
        self.handle = module.register_forward_hook(self)

    def __call__(self, module, inputs, output):
        self.count += 1


def fit_one_step(source, **overrides):
    """One real training step; returns the module, trainer, observer, starting weights and reference call count."""
    module = make_module(source, **overrides)
    module.configure_model()  # so the starting weights can be read; Lightning's own call is then a no-op
    start = (snapshot(module.policy), snapshot(module.reference))
    reference_calls = CountCalls(module.reference)
    observer = ModeObserver()
    trainer = make_trainer(callbacks=[observer])
    trainer.fit(module, datamodule=make_data(source))
    reference_calls.handle.remove()
    return module, trainer, observer, start, reference_calls.count


@pytest.fixture(scope="module")
def fitted(source):
    """The paper's setting (kl_coef = 0), real `generate` rollouts and math-verify rewards."""
    module = make_module(source)
    trainer = make_trainer(callbacks=[observer := ModeObserver()])
    trainer.fit(module, datamodule=make_data(source))
    return module, trainer, observer


@pytest.fixture(scope="module")
def fitted_with_kl(source):
    """A KL penalty: the reference is loaded and runs."""
    return fit_one_step(source, kl_coef=0.1, micro_batch_size=8)


def test_without_a_kl_term_the_reference_is_not_loaded(fitted, source):
    module, trainer, observer = fitted
    assert module.reference is None
    assert observer.modes == [(True, None)]
    on_disk = source.load_model().state_dict()
    assert any(not torch.equal(v, on_disk[k]) for k, v in module.policy.state_dict().items())


def test_a_callback_that_tunes_kl_coef_makes_the_module_load_the_reference(source):
    from trapo_lightning.callbacks import AdaptiveKL

    module = make_module(source)
    make_trainer(callbacks=[AdaptiveKL()]).fit(module, datamodule=make_data(source))
    assert module.reference is not None and module.loss.kl_coef > 0


def test_one_step_changes_the_policy_and_leaves_the_reference_identical(fitted_with_kl, source):
    module, trainer, _, (policy_start, reference_start), _ = fitted_with_kl
    assert trainer.global_step == 1
    policy_now, reference_now = snapshot(module.policy), snapshot(module.reference)
    changed = [k for k in policy_now if not torch.equal(policy_now[k], policy_start[k])]
    assert changed == list(policy_now)  # AdamW moves every tensor (gradient or weight decay)
    assert all(torch.equal(reference_now[k], reference_start[k]) for k in reference_now)
    on_disk = source.load_model().state_dict()  # the starting weights are the folder's
    assert all(torch.equal(reference_now[k], on_disk[k]) for k in on_disk)


def test_the_reference_is_frozen_outside_the_optimizer_and_stays_in_eval_mode(fitted_with_kl):
    module, trainer, observer, _, _ = fitted_with_kl
    optimised = {id(p) for group in trainer.optimizers[0].param_groups for p in group["params"]}
    assert optimised == {id(p) for p in module.policy.parameters()}
    assert not optimised & {id(p) for p in module.reference.parameters()}
    assert not any(p.requires_grad for p in module.reference.parameters())
    # during the step Lightning had put the module in train mode: the policy trains, the reference does not
    assert observer.modes == [(True, False)]
    assert not module.reference.training
    assert not any(m.training for m in module.reference.modules())
    module.train()
    assert module.policy.training and not module.reference.training


def test_the_reference_forward_runs_once_per_micro_batch_when_kl_coef_is_positive(fitted_with_kl):
    module, trainer, _, (policy_start, reference_start), reference_calls = fitted_with_kl
    # 2 prompts x 8 samples = 16 sequences in micro-batches of 8, each one prompt's group: per micro-batch, one
    # forward of the shared prompt and one of the responses on its KV cache
    assert reference_calls == 4
    assert trainer.callback_metrics["train/kl"] == 0.0  # the first step is taken at the reference's weights
    assert any(not torch.equal(v, policy_start[k]) for k, v in module.policy.state_dict().items())
    assert all(torch.equal(v, reference_start[k]) for k, v in module.reference.state_dict().items())


def test_step_logs_reward_and_loss_metrics(fitted):
    _, trainer, _ = fitted
    metrics = trainer.callback_metrics
    for key in ("train/reward", "train/loss", "train/sft_loss", "train/policy_loss", "train/grad_norm",
                "train/guided_fraction", "train/expert_tokens"):
        assert key in metrics, key
    # a random policy never solves a problem alone, so every prompt walks down to the full solution (1/8 guided at
    # 1.0, 2/8 at 0.25, 1/8 at 0.5) and the full expert solution always verifies
    assert metrics["train/guided_fraction"] == pytest.approx(0.5)
    assert metrics["train/accuracy"] >= 1 / 8
    assert float(metrics["train/expert_tokens"]) > 0


def sgd(params):
    return torch.optim.SGD(params, lr=1.0)


@pytest.mark.parametrize("normalizer", ["constant", "token_mean"])
def test_micro_batched_step_makes_the_same_update_as_one_full_batch(source, normalizer):
    """16 sequences of unequal lengths (two prompts; unguided, prefix-guided and full-solution rows) in micro-batches
    of 2 (8 x 2) or 3 (5 x 3 + 1) rows, or packed by token budgets, each micro-batch padded to its own width ==
    1 x 16, and so does recomputing each decoder layer in backward (activation checkpointing). Every micro-batch loss is normalised by the whole step's totals (sequences for `constant`, loss tokens
    for `token_mean`), so the gradients add up to the full batch's, entropy bonus included. The rollouts are
    scripted (the same in every run) and the optimizer is plain SGD, whose update is proportional to the gradient,
    unlike Adam's first step (~ lr * sign(g)), which would hide a wrong scale. Tolerance: atol 1e-7 / rtol 1e-4 per
    element; float32 summation order alone gives differences of ~5e-9, while a wrong normalisation would be off by a
    factor (e.g. 8 for micro-batches of 2).
    """
    updates, losses, plans = [], [], []
    settings = ((2, None, False), (3, None, False), (64, 150, False), (64, 400, True), (64, None, False))
    for micro_batch_size, max_tokens, checkpointing in settings:
        engine = ScriptedEngine([], logprob=-1.0)
        module = make_module(
            source, rollout=engine, optimizer=sgd, micro_batch_size=micro_batch_size, entropy_coef=0.01,
            normalizer=normalizer, max_tokens_per_micro_batch=max_tokens,
            activation_checkpointing=checkpointing,
        )
        module.configure_model()
        engine.token_ids = module.tokenizer("1 + 1 = 2", add_special_tokens=False)["input_ids"]
        engine.token_ids.append(module.tokenizer.eos_token_id)
        start = snapshot(module.policy)
        trainer = make_trainer()
        trainer.fit(module, datamodule=make_data(source))
        updates.append({k: v - start[k] for k, v in snapshot(module.policy).items()})
        losses.append(float(trainer.callback_metrics["train/loss"]))
        plans.append(float(trainer.callback_metrics["train/padding_efficiency"]))
    *micro_batched, full = updates
    assert max(float(u.abs().max()) for u in full.values()) > 1e-4  # the step did something
    for update, loss in zip(micro_batched, losses):
        for key in full:
            torch.testing.assert_close(update[key], full[key], rtol=1e-4, atol=1e-7, msg=key)
        assert loss == pytest.approx(losses[-1], rel=1e-5)
    # trimming each micro-batch to its own rows wastes less padding than one width for the whole step
    assert plans[0] > plans[-1] and plans[2] > plans[-1]


def fixed_samples(tokenizer) -> list[Sample]:
    def ids(text):
        return tuple(tokenizer(text, add_special_tokens=False)["input_ids"])

    def sample(p, mg, prompt, prefix, own):
        response = ids(prefix) + ids(own)
        return Sample(p, mg, 0.25 if prefix else 0.0, ids(prompt), response, len(ids(prefix)),
                      (-1.0,) * len(ids(own)), True, 0.0, Verdict.wrong)

    return [
        sample(0, 0, "Compute 1 + 2.", "", "3"),
        sample(1, 1, "Compute 14 - 5 + 2.", "14 - 5 = 9\n\n", "9 + 2 = 11"),
        sample(1, 1, "Compute 14 - 5 + 2.", "14 - 5 = 9\n\n", "\\boxed{11}"),
        sample(0, 3, "Compute 1 + 2.", "1 + 2 = 3\n\n\\boxed{3}", ""),
        sample(2, 0, "Compute 7.", "", "7 + 0 = 7 and so on"),
    ]


def test_padded_batch_logprobs_equal_unpadded_forwards(source):
    """Left padding + position ids counting real tokens: the trainer scores each sequence as if it were alone."""
    module = make_module(source, kl_coef=0.1)
    module.configure_model()
    samples = fixed_samples(module.tokenizer)
    batch = build_train_batch(samples, torch.zeros(len(samples)), module.tokenizer.pad_token_id)
    with torch.no_grad():
        logp, _ = module._policy_logprobs(batch)  # [N, T]
        ref_logp = module._reference_logprobs(batch)
        for row, s in enumerate(samples):
            sequence = torch.tensor([s.prompt_ids + s.response_ids])
            logits = module.policy(input_ids=sequence).logits[0]  # [L, V]
            start = len(s.prompt_ids) - 1
            n = len(s.response_ids)
            expected = torch.log_softmax(logits[start : start + n], dim=-1).gather(
                -1, torch.tensor(s.response_ids)[:, None]
            ).squeeze(-1)
            torch.testing.assert_close(logp[row, :n], expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ref_logp, logp)  # untrained policy == reference


def test_checkpoint_holds_the_policy_only_and_a_resume_rebuilds_the_reference(fitted_with_kl, source, tmp_path):
    module, trainer, *_ = fitted_with_kl
    path = tmp_path / "step1.ckpt"
    trainer.save_checkpoint(path)
    checkpoint = torch.load(path, weights_only=True)
    keys = list(checkpoint["state_dict"])
    assert {k.split(".")[0] for k in keys} == {"policy"}  # the reference is never a submodule: never saved
    trained = snapshot(module.policy)
    assert all(torch.equal(checkpoint["state_dict"][f"policy.{k}"], v) for k, v in trained.items())

    # Resume: Lightning loads strictly; the reference is not part of the module's state, and is the folder's weights
    resumed = make_module(source, kl_coef=0.1)
    observer = ModeObserver()
    resumed_trainer = make_trainer(max_steps=2, callbacks=[observer])
    resumed_trainer.fit(resumed, datamodule=make_data(source), ckpt_path=str(path))
    assert resumed_trainer.global_step == 2
    assert all(torch.equal(observer.policy_at_start[k], v) for k, v in trained.items())
    on_disk = source.load_model().state_dict()
    assert all(torch.equal(resumed.reference.state_dict()[k], v) for k, v in on_disk.items())
    assert not any(name.startswith("reference") for name, _ in resumed.named_modules())


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(trust_region_alpha=1.5), "trust_region_alpha"),
        (dict(micro_batch_size=0), "micro_batch_size"),
        (dict(max_response_tokens=0), "max_response_tokens"),
    ],
)
def test_invalid_arguments_fail_at_construction(source, overrides, message):
    with pytest.raises(ValueError, match=message):
        make_module(source, **overrides)


class UngradableReward:
    """Every completion unparseable, as with data whose answers never match its solutions' format."""

    def __call__(self, completions, answers):
        return [RewardResult(Verdict.unparseable, 0.0) for _ in completions]


def test_a_step_with_nothing_graded_warns_at_log_spaced_steps(source):
    module = make_module(source, reward=UngradableReward())
    with pytest.warns(UserWarning, match="no reward of the step could be graded") as caught:
        make_trainer(max_steps=3).fit(module, datamodule=make_data(source))
    assert module.ungraded_steps == 3
    # warned at the 1st and 2nd ungraded step, not the 3rd (next: 4th)
    assert sum("no reward of the step" in str(w.message) for w in caught) == 2


def test_the_rollout_logprobs_of_the_generate_engine_match_the_training_forward(source):
    # HF generate samples the training module itself, so the only gap is padding/numerics (batched prefill + KV
    # cache against one left-padded forward): well under 1e-4 nats per token in float32.
    module = make_module(source)
    trainer = make_trainer(max_steps=1)
    trainer.fit(module, datamodule=make_data(source))
    assert trainer.callback_metrics["train/rollout_logp_mismatch"] < 1e-4
    assert trainer.callback_metrics["train/policy_version"] == 0  # sampled before the step's update
    assert module.policy_version == 1


def test_an_engine_with_a_stale_weight_copy_is_refused(source):
    from trapo_lightning.rollout import StaleRolloutError, check_rollout_version

    check_rollout_version(None, 7, 0)  # samples the live module
    check_rollout_version(7, 7, 0)
    check_rollout_version(6, 7, 1)  # one step behind, allowed by the config
    with pytest.raises(StaleRolloutError, match="holds policy version 6 but the policy is at version 7"):
        check_rollout_version(6, 7, 0)
    with pytest.raises(StaleRolloutError):
        check_rollout_version(8, 7, 0)  # ahead of the policy: a copy of some other run


def test_activation_checkpointing_recomputes_each_decoder_layer_in_backward(source):
    calls = {}
    for checkpointing in (False, True):
        engine = ScriptedEngine([], logprob=-1.0)
        module = make_module(
            source, rollout=engine, activation_checkpointing=checkpointing, micro_batch_size=64,
            share_prompt_forward=None if checkpointing else False,
        )
        module.configure_model()
        engine.token_ids = module.tokenizer("1 + 1 = 2", add_special_tokens=False)["input_ids"] + [
            module.tokenizer.eos_token_id
        ]
        layer, entered = module.policy.model.layers[0], []
        # a pre-hook: the recompute stops as soon as backward has what it needs, before the forward would return
        layer.register_forward_pre_hook(lambda *_: entered.append(1))
        make_trainer().fit(module, datamodule=make_data(source))
        calls[checkpointing] = len(entered)
    assert module.share_prompt_forward is False  # by default off with checkpointing: no KV cache to replay
    assert calls == {False: 1, True: 2}  # one micro-batch: its forward, and with checkpointing its recompute


def test_activation_checkpointing_and_an_explicit_shared_prompt_forward_conflict(source):
    with pytest.raises(ValueError, match="share_prompt_forward"):
        make_module(source, activation_checkpointing=True, share_prompt_forward=True)
