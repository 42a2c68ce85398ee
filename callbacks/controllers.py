"""Trust-region and KL tuning as callbacks (TRAPO.md, "Losses"). Each writes one module setting before every
training step, `pl_module.loss.trust_region_alpha` or `pl_module.loss.kl_coef` (declared in `writes`: one writer per
setting, `trapo_lightning.callback_rules`), from a pure update rule in `trapo_lightning.schedules`. The measured
input is pooled over ranks token-weighted (`pooled_mean`): every rank holds the same value, the one a single
process would compute on all ranks' data. The state is saved in checkpoints so a resume continues the trajectory.

- `AlphaSchedule`: alpha constant / linear / cosine from `start` to `end` over `steps`.
- `AdaptiveAlpha`: alpha that holds the share of expert-prefix tokens outside the trust region near a target.
- `AdaptiveKL`: PPO's adaptive KL coefficient toward a target per-token KL to the reference model.
"""

from __future__ import annotations

import lightning as L
import torch

from trapo_lightning.callback_rules import writer_state_key
from trapo_lightning.schedules import (
    ScheduleShape,
    adaptive_alpha,
    adaptive_kl_coef,
    pooled_mean,
    scheduled_value,
)


def measured_over_ranks(
    trainer: L.Trainer, pl_module: L.LightningModule, outputs, key: str, count_key: str
) -> float | None:
    """The step's metric `key`, a mean over this rank's `count_key` tokens, pooled over all ranks' tokens; None
    when no rank had any. A collective: every rank calls it at the same step, with or without a measurement."""
    metrics = (outputs or {}).get("metrics", {})
    mine = [float(metrics.get(key, 0.0)), float(metrics.get(count_key, 0.0))]
    # On the module's device: an NCCL process group has no CPU tensors, and Lightning does not move them.
    gathered = trainer.strategy.all_gather(torch.tensor(mine, dtype=torch.float64, device=pl_module.device))
    means, counts = gathered.reshape(-1, 2).T.tolist()  # [world, 2] (one process: [2])
    return pooled_mean(means, counts)


class AlphaSchedule(L.Callback):
    writes = ("loss.trust_region_alpha",)

    def __init__(self, start: float = 0.1, end: float = 0.1, steps: int = 1000, shape: ScheduleShape = "constant"):
        """
        Args:
            start: Trust-region alpha at step 0.
            end: Alpha from step `steps` on.
            steps: Length of the schedule in optimizer steps.
            shape: constant (start throughout), linear or cosine.
        """
        if not (0.0 <= start <= 1.0 and 0.0 <= end <= 1.0):
            raise ValueError(f"alpha must be in [0, 1], got start {start} and end {end}")
        if steps < 0:
            raise ValueError(f"steps must be >= 0, got {steps}")
        self.start, self.end, self.steps, self.shape = start, end, steps, ScheduleShape(shape)

    def alpha(self, step: int) -> float:
        return scheduled_value(step, self.start, self.end, self.steps, self.shape)

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch, batch_idx: int) -> None:
        pl_module.loss.trust_region_alpha = self.alpha(trainer.global_step)
        pl_module.log("trust_region/alpha", pl_module.loss.trust_region_alpha, on_step=True, on_epoch=False, batch_size=1)


class AdaptiveAlpha(L.Callback):
    writes = ("loss.trust_region_alpha",)

    def __init__(
        self, target_outside: float = 0.1, initial: float = 0.1, gain: float = 1.0, low: float = 1e-3,
        high: float = 0.5,
    ) -> None:
        """
        Args:
            target_outside: Share of expert-prefix tokens with p < alpha to hold (`train/outside_trust_region`).
            initial: Alpha at the first step (paper: 0.1).
            gain: How fast alpha moves: alpha *= exp(-gain * clip(outside - target, -0.2, 0.2)) per step.
            low: Smallest alpha allowed.
            high: Largest alpha allowed.
        """
        if not 0.0 <= target_outside <= 1.0:
            raise ValueError(f"target_outside must be in [0, 1], got {target_outside}")
        if gain <= 0:
            raise ValueError(f"gain must be > 0, got {gain}")
        if not 0 < low <= initial <= high <= 1:
            raise ValueError(f"need 0 < low <= initial <= high <= 1, got {low}, {initial}, {high}")
        self.target, self.gain, self.low, self.high = target_outside, gain, low, high
        self.alpha = initial

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch, batch_idx: int) -> None:
        pl_module.loss.trust_region_alpha = self.alpha
        pl_module.log("trust_region/alpha", self.alpha, on_step=True, on_epoch=False, batch_size=1)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx: int):
        outside = measured_over_ranks(trainer, pl_module, outputs, "train/outside_trust_region", "train/expert_tokens")
        if outside is not None:  # None: no expert tokens on any rank this step, nothing was measured
            self.alpha = adaptive_alpha(self.alpha, outside, self.target, self.gain, self.low, self.high)

    @property
    def state_key(self) -> str:
        return writer_state_key(self)

    def state_dict(self) -> dict:
        return {"alpha": self.alpha}

    def load_state_dict(self, state_dict: dict) -> None:
        self.alpha = float(state_dict["alpha"])


class AdaptiveKL(L.Callback):
    writes = ("loss.kl_coef",)  # the module loads its reference model because of it

    def __init__(self, target: float = 0.01, initial: float = 0.05, horizon: float = 100.0) -> None:
        """
        Args:
            target: Per-token KL to the reference model to hold (`train/kl_per_token`, with `model.kl_estimator`).
            initial: KL coefficient at the first step (must be > 0: at 0 the reference forward is skipped).
            horizon: Controller horizon in steps (PPO: coef *= 1 + clip(KL / target - 1, -0.2, 0.2) / horizon).
        """
        if target <= 0 or initial <= 0 or horizon <= 0:
            raise ValueError(f"target, initial and horizon must be > 0, got {target}, {initial}, {horizon}")
        self.target, self.horizon = target, horizon
        self.coef = initial

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch, batch_idx: int) -> None:
        pl_module.loss.kl_coef = self.coef
        pl_module.log("kl/coef", self.coef, on_step=True, on_epoch=False, batch_size=1)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx: int):
        kl = measured_over_ranks(trainer, pl_module, outputs, "train/kl_per_token", "train/rl_tokens")
        if kl is not None:  # None: no policy token on any rank this step (e.g. SFT only), no KL was measured
            self.coef = adaptive_kl_coef(self.coef, kl, self.target, self.horizon)

    @property
    def state_key(self) -> str:
        return writer_state_key(self)

    def state_dict(self) -> dict:
        return {"coef": self.coef}

    def load_state_dict(self, state_dict: dict) -> None:
        self.coef = float(state_dict["coef"])
