"""Trust-region and KL tuning callbacks: they write their module attribute every step, follow their update rule on
the step's measurements, and their state survives a real checkpoint round trip (a resumed run continues the same
trajectory)."""

import lightning as L
import pytest
import torch

from helpers import ScriptedEngine, one_torch_thread  # noqa: F401 (autouse fixture)
from test_module import make_data, make_module, make_trainer, source  # noqa: F401 (fixture)
from trapo_lightning.callbacks import AdaptiveAlpha, AdaptiveGuidance, AdaptiveKL, AlphaSchedule
from trapo_lightning.schedules import adaptive_alpha, adaptive_kl_coef


class Watch(L.Callback):
    """What the module held during each step, and what the step measured."""

    def __init__(self):
        self.alpha, self.kl_coef, self.metrics = [], [], []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.alpha.append(pl_module.loss.trust_region_alpha)
        self.kl_coef.append(pl_module.loss.kl_coef)
        self.metrics.append(outputs["metrics"])


def fit(source, callbacks, steps):
    make_trainer(max_steps=steps, callbacks=callbacks).fit(make_module(source), datamodule=make_data(source))


def test_alpha_schedule_sets_alpha_from_the_step(source):
    watch = Watch()
    fit(source, [AlphaSchedule(start=0.3, end=0.1, steps=2, shape="linear"), watch], steps=3)
    assert watch.alpha == pytest.approx([0.3, 0.2, 0.1])  # 0.3 + (0.1 - 0.3) * step / 2, then held


def test_adaptive_alpha_follows_its_rule_on_the_measured_share(source):
    watch = Watch()
    controller = AdaptiveAlpha(target_outside=0.0, initial=0.5, gain=2.0, low=0.01, high=0.5)
    fit(source, [controller, watch], steps=3)
    expected = 0.5
    for alpha, metrics in zip(watch.alpha, watch.metrics):
        assert alpha == pytest.approx(expected)
        expected = adaptive_alpha(expected, metrics["train/outside_trust_region"], 0.0, 2.0, 0.01, 0.5)
    assert controller.alpha == pytest.approx(expected)
    assert controller.alpha < 0.5  # a random tiny policy puts expert tokens below alpha: alpha comes down


def test_adaptive_kl_follows_the_ppo_rule(source):
    watch = Watch()
    controller = AdaptiveKL(target=1e-6, initial=0.1, horizon=10)
    fit(source, [controller, watch], steps=3)
    expected = 0.1
    for coef, metrics in zip(watch.kl_coef, watch.metrics):
        assert coef == pytest.approx(expected)
        expected = adaptive_kl_coef(expected, metrics["train/kl_per_token"], 1e-6, 10)
    assert controller.coef == pytest.approx(expected)


def checkpointed_trainer(tmp_path, max_steps, callback) -> L.Trainer:
    return L.Trainer(
        accelerator="cpu", devices=1, max_steps=max_steps, logger=False, enable_progress_bar=False,
        enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0,
        callbacks=[callback, L.pytorch.callbacks.ModelCheckpoint(dirpath=tmp_path, save_last=True, every_n_train_steps=1)],
    )


@pytest.mark.parametrize(
    ("build", "state_of"),
    [
        (lambda: AdaptiveAlpha(target_outside=0.0, initial=0.5, gain=2.0, low=0.01), lambda c: c.alpha),
        (lambda: AdaptiveKL(target=1e-6, initial=0.1, horizon=10), lambda c: c.coef),
        (lambda: AdaptiveGuidance(), lambda c: (c.totals, c.ema)),
    ],
    ids=["adaptive_alpha", "adaptive_kl", "adaptive_guidance"],
)
def test_state_survives_a_checkpoint_and_the_resumed_run_continues_it(source, tmp_path, build, state_of):
    straight = build()
    fit(source, [straight], steps=3)

    first = build()
    checkpointed_trainer(tmp_path, 2, first).fit(make_module(source), datamodule=make_data(source))
    saved = torch.load(tmp_path / "last.ckpt", weights_only=True)
    assert any(type(first).__name__ in key for key in saved["callbacks"])

    resumed = build()
    assert state_of(resumed) != state_of(first)
    checkpointed_trainer(tmp_path, 3, resumed).fit(
        make_module(source), datamodule=make_data(source), ckpt_path=tmp_path / "last.ckpt"
    )
    assert state_of(resumed) == state_of(straight)  # steps 0-1 then 2 after the resume == steps 0-2 straight
