"""Validate once before the first training step, so every curve starts at step 0 from the untrained policy.

Lightning's sanity check runs only a couple of batches and logs nothing; this runs the whole validation split and
logs it at step 0 through the trainer's loggers. It is skipped on resume (global_step > 0).
"""

from __future__ import annotations

import lightning as L
import torch


class ValidateOnStart(L.Callback):
    def __init__(self, enabled: bool = True) -> None:
        """
        Args:
            enabled: Run the step-0 validation (turn off to save its time).
        """
        self.enabled = enabled
        self.runs = 0

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not self.enabled or trainer.global_step > 0 or trainer.datamodule is None:
            return
        metrics = self.evaluate(trainer, pl_module)
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=0)
        self.runs += 1

    @staticmethod
    @torch.no_grad()
    def evaluate(trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, float]:
        """Size-weighted means of the module's per-batch metrics, averaged across ranks."""
        sums: dict[str, float] = {}
        count = 0
        for batch_idx, batch in enumerate(trainer.datamodule.val_dataloader()):
            for key, value in pl_module.evaluate(batch, "val", batch_idx).items():
                sums[key] = sums.get(key, 0.0) + value * len(batch)
            count += len(batch)
        keys = sorted(sums)
        totals = torch.tensor([sums[k] for k in keys] + [float(count)], dtype=torch.float64)
        totals = trainer.strategy.reduce(totals, reduce_op="sum")
        return {k: float(v / totals[-1]) for k, v in zip(keys, totals[:-1])}
