"""The policy update (trapo_lightning/update.py) under a real Lightning Trainer on a tiny Qwen2: several updates per
rollout batch make the clipped loss clip, rollouts from a lagging weight copy get importance weights that differ
from 1 and are logged (issue 12), and SFT's gradient does not depend on how its batch is split (issue 14)."""

import lightning as L
import pytest

from helpers import LaggingEngine, one_torch_thread  # noqa: F401 (autouse fixture)
from test_module import make_data, make_module, make_trainer, source  # noqa: F401 (fixture)
from trapo_lightning.callbacks import VLLMRolloutRefresh
from trapo_lightning.importance import RolloutCorrection


class Metrics(L.Callback):
    """Every step's logged metrics."""

    def __init__(self):
        self.steps = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.steps.append(outputs["metrics"])


def fit(source, steps, callbacks=(), **overrides):
    metrics = Metrics()
    module = make_module(source, **overrides)
    trainer = make_trainer(max_steps=steps, callbacks=[*callbacks, metrics])
    trainer.fit(module, datamodule=make_data(source))
    return module, trainer, metrics.steps


@pytest.mark.parametrize("policy", ["clipped", "unclipped"])
def test_two_epochs_over_a_rollout_batch_make_the_clipped_loss_clip(source, policy):
    # lr 3e-2 moves the tiny policy far within one update, so the second epoch's ratios leave [0.8, 1.2]
    module, trainer, steps = fit(source, 4, ppo_epochs=2, mini_batches_per_step=2, policy=policy,
                                 optimizer=lambda params: __import__("torch").optim.AdamW(params, lr=3e-2))
    # 2 epochs x 2 mini-batches: 4 optimizer steps over one rollout batch (global_step counts optimizer steps)
    assert trainer.global_step == 4 and module.policy_version == 4 and len(steps) == 1
    clip_fraction = steps[0]["train/clip_fraction"]
    assert clip_fraction > 0 if policy == "clipped" else clip_fraction == 0.0


def test_rollouts_from_a_lagging_copy_get_importance_weights(source):
    # the engine's copy is refreshed every 3 optimizer steps; up to 2 steps of lag are allowed. A tight cap (1.05)
    # shows which weights moved: a token whose sampler and trainer log-probs differ by more than ln 1.05 is truncated.
    correction = RolloutCorrection(level="token", mode="truncate", cap=1.05)
    _, _, steps = fit(source, 4, [VLLMRolloutRefresh(every_n_steps=3)], rollout=LaggingEngine(),
                      max_rollout_staleness=2, rollout_correction=correction,
                      optimizer=lambda params: __import__("torch").optim.AdamW(params, lr=1e-2))
    versions = [step["train/policy_version"] for step in steps]
    assert versions == [0.0, 0.0, 0.0, 3.0]  # steps 0-2 sampled version 0 (lag 0, 1, 2); step 3 the refreshed copy
    for lag, step in zip([0, 1, 2, 0], steps):
        if lag == 0:  # the sampler holds the policy's own weights: they agree to float32 rounding
            assert step["train/rollout_logp_mismatch"] < 1e-4
            assert step["train/rollout_is_rejected"] == 0.0
            assert step["train/rollout_is_mean"] == pytest.approx(1.0, abs=1e-4)
        else:  # a copy 1 or 2 updates old
            assert step["train/rollout_logp_mismatch"] > 1e-3
            assert step["train/rollout_is_rejected"] > 0.0
            assert step["train/rollout_is_mean"] != 1.0


@pytest.mark.parametrize("normalizer", ["constant", "token_mean"])
def test_sft_micro_batched_makes_the_same_update_as_one_full_batch(source, normalizer):
    """SFT (each prompt's whole expert solution, plain NLL, nothing sampled) on 16 solutions of unequal lengths, in
    micro-batches of 1, of 3, or packed by a token budget (400: 3 to 5 rows) == one batch of 16: the bug class of gradient accumulation
    that divides each micro-batch by its own token count (the 2026 critique of mixed-policy baselines). SGD, so the
    update is proportional to the gradient; the tolerance is float32 summation order's."""
    import torch
    from lightning.pytorch import Trainer

    from trapo_lightning.data.datamodule import TrapoDataModule
    from trapo_lightning.data.sources import SyntheticSource
    from trapo_lightning.data.synthetic import SyntheticArithmetic
    from trapo_lightning.guidance import MicroGroupGuidance

    from test_module import MAX_PROMPT_TOKENS, snapshot

    def data():
        return TrapoDataModule(
            policy=source, source=SyntheticSource(SyntheticArithmetic(num_operands=3, digits=2), train_size=16,
                                                  val_size=2),
            prompts_per_step=16, val_batch_size=2, max_prompt_tokens=MAX_PROMPT_TOKENS,
            max_response_tokens=160,
        )

    updates = []
    for micro_batch_size, max_tokens in ((1, None), (3, None), (16, 400), (16, None)):
        module = make_module(
            source, guidance=MicroGroupGuidance(sizes=[1], thresholds=[2.0], prefix_ratios=[1.0]), sft="plain",
            normalizer=normalizer, entropy_coef=0.0, micro_batch_size=micro_batch_size,
            max_tokens_per_micro_batch=max_tokens, max_response_tokens=160,
            optimizer=lambda params: torch.optim.SGD(params, lr=1.0),
        )
        module.configure_model()
        start = snapshot(module.policy)
        Trainer(accelerator="cpu", devices=1, max_steps=1, logger=False, enable_checkpointing=False,
                enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                limit_val_batches=0).fit(module, datamodule=data())
        updates.append({k: v - start[k] for k, v in snapshot(module.policy).items()})
    *micro_batched, full = updates
    assert max(float(u.abs().max()) for u in full.values()) > 1e-4
    for update in micro_batched:
        for key in full:
            torch.testing.assert_close(update[key], full[key], rtol=1e-4, atol=1e-7, msg=key)
