"""Trust-region and KL tuning callbacks: they write their module attribute every step, follow their update rule on
the step's measurements pooled over ranks by token counts, put what they reduce across ranks on the module's
device, and their state survives a real checkpoint round trip (a resumed run continues the same trajectory).

That ranks agree on every decision, and take the one a single process takes on the same data, is tested on 4 real
ranks in test_scale.py."""

import lightning as L
import pytest
import torch
from lightning.pytorch.strategies import SingleDeviceStrategy

from faults import SignalAtStep
from helpers import ScriptedEngine, one_torch_thread  # noqa: F401 (autouse fixture)
from test_module import make_data, make_module, make_trainer, source  # noqa: F401 (fixture)
from trapo_lightning.callbacks import AdaptiveAlpha, AdaptiveGuidance, AdaptiveKL, AlphaSchedule, PreemptionCheckpoint
from trapo_lightning.schedules import adaptive_alpha, adaptive_kl_coef, pooled_mean


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


def test_pooled_mean_weights_each_rank_by_its_tokens_by_hand():
    # ranks: 10 expert tokens with share 0.5, none (its share 0.0 is no measurement), 30 with share 0.2:
    # (0.5 * 10 + 0.2 * 30) / 40 = 11 / 40 = 0.275, the share over all 40 tokens; the unweighted mean over ranks
    # was (0.5 + 0.0 + 0.2) / 3 = 0.2333
    assert pooled_mean([0.5, 0.0, 0.2], [10, 0, 30]) == pytest.approx(0.275)
    assert pooled_mean([0.7], [3]) == pytest.approx(0.7)  # one process: its own mean
    assert pooled_mean([0.3, 0.9], [0, 0]) is None  # no tokens anywhere: nothing measured, no update
    with pytest.raises(ValueError, match="one count >= 0 per mean"):
        pooled_mean([0.5], [1, 2])


class ModuleDeviceOnlyStrategy(SingleDeviceStrategy):
    """A strategy whose collectives refuse tensors that are not on the module's device, as NCCL refuses CPU
    tensors (Lightning's reduce moves nothing)."""

    def _check(self, tensor):
        if isinstance(tensor, torch.Tensor) and tensor.device != self.lightning_module.device:
            raise RuntimeError(f"collective on {tensor.device}, the module is on {self.lightning_module.device}")

    def reduce(self, tensor, *args, **kwargs):
        self._check(tensor)
        return super().reduce(tensor, *args, **kwargs)

    def all_gather(self, tensor, *args, **kwargs):
        self._check(tensor)
        return super().all_gather(tensor, *args, **kwargs)


def on_meta_by_default(callback_class):
    """`callback_class` whose training hooks run with `meta` as the default device of new tensors.

    On a GPU run the default device (CPU) is not the module's (CUDA); on this CPU-only machine both are CPU, so a
    tensor made without `device=` would pass unnoticed. Here such a tensor lands on `meta`, and the strategy above
    refuses it. What this proves: every tensor the hooks hand to a collective was put on `pl_module.device`
    explicitly. It does not run NCCL."""

    class OnMetaByDefault(callback_class):
        def on_train_batch_start(self, *args, **kwargs):
            with torch.device("meta"):
                return super().on_train_batch_start(*args, **kwargs)

        def on_train_batch_end(self, *args, **kwargs):
            with torch.device("meta"):
                return super().on_train_batch_end(*args, **kwargs)

    return OnMetaByDefault


def logging_with_its_device_as_default(module):
    """Lightning's `log` makes its own tensors on the default device; it is not what the test is about, so inside
    the hooks above the module logs with its own device as the default."""
    log = module.log

    def log_on_its_device(*args, **kwargs):
        with torch.device(module.device):
            return log(*args, **kwargs)

    module.log = log_on_its_device  # log_dict goes through it too
    return module


@pytest.mark.parametrize(
    "build",
    [
        lambda: on_meta_by_default(AdaptiveAlpha)(target_outside=0.0, initial=0.5, gain=2.0, low=0.01),
        lambda: on_meta_by_default(AdaptiveKL)(target=1e-6, initial=0.1, horizon=10),
        lambda: on_meta_by_default(AdaptiveGuidance)(),
    ],
    ids=["adaptive_alpha", "adaptive_kl", "adaptive_guidance"],
)
def test_cross_rank_reductions_are_on_the_modules_device(source, build):
    callback = build()
    trainer = L.Trainer(
        accelerator="cpu", strategy=ModuleDeviceOnlyStrategy(device=torch.device("cpu")), max_steps=2,
        logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        num_sanity_val_steps=0, limit_val_batches=0, callbacks=[callback],
    )
    trainer.fit(logging_with_its_device_as_default(make_module(source)), datamodule=make_data(source))
    assert trainer.global_step == 2


def test_a_stop_signal_checkpoint_holds_the_state_of_callbacks_listed_after_it(source, tmp_path):
    """PreemptionCheckpoint saves in on_train_batch_end; listed before AdaptiveKL (as a config that appends a
    callback on the command line does), it still runs after it, so the checkpoint holds the coefficient the step's
    KL decided, which is what the run continues with."""
    controller = AdaptiveKL(target=1e-3, initial=0.1, horizon=10)
    trainer = L.Trainer(
        accelerator="cpu", devices=1, max_steps=3, logger=False, enable_progress_bar=False,
        enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0,
        callbacks=[PreemptionCheckpoint(requeue=False), controller, SignalAtStep(step=0),
                   L.pytorch.callbacks.ModelCheckpoint(dirpath=tmp_path, save_top_k=0)],
    )
    trainer.fit(make_module(source), datamodule=make_data(source))
    assert trainer.global_step == 1  # stopped after the step the signal came in
    saved = torch.load(tmp_path / "last.ckpt", weights_only=True)["callbacks"][controller.state_key]
    # step 0's KL is 0 (policy == reference): 0.1 * (1 - 0.2 / 10) = 0.098, not the 0.1 it started the step with
    assert saved == {"coef": pytest.approx(0.098)} and controller.coef == pytest.approx(0.098)
