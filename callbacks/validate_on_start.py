"""Validate once before the first training step, so every curve starts at step 0 from the untrained policy.

Lightning's sanity check runs only a couple of batches and logs nothing; this runs every validation benchmark in
full and logs it at step 0 through the trainer's loggers, under the names validation uses (`val/accuracy`,
`val/<benchmark>/pass@k`, ...). It is skipped on resume (global_step > 0).
"""

from __future__ import annotations

import lightning as L
import torch

from trapo_lightning.metrics import HELD_OUT, BenchmarkMetrics, metric_prefix


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
        """Every benchmark's metrics over all its problems on all ranks (the metrics' sum states are reduced)."""
        loaders = trainer.datamodule.val_dataloader()
        loaders = loaders if isinstance(loaders, (list, tuple)) else [loaders]
        names = getattr(trainer.datamodule, "benchmark_names", [HELD_OUT])
        results: dict[str, float] = {}
        for name, loader in zip(names, loaders, strict=True):
            prefix = metric_prefix("val", name)
            metrics = BenchmarkMetrics(pl_module.val_samples, pl_module.pass_at_k).to(pl_module.device)
            for batch_idx, batch in enumerate(loader):
                metrics.update(pl_module.evaluate(batch, prefix, batch_idx))
            results.update(metrics.results(prefix))
        return results
