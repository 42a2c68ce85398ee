"""Validate once before the first training step, so every curve starts at step 0 from the untrained policy.

Lightning's sanity check runs only a couple of batches and logs nothing. This runs the fit's own validation loop
at train start, as Lightning runs it between training steps: the module's `validation_step` over every validation
benchmark (within `limit_val_batches`), its `BenchmarkMetrics` summed over ranks, every callback's validation hooks
(`CompletionsTable` writes the step-0 answers), and the loggers get the results at step 0 under the names every
validation uses (`val/accuracy`, `val/<benchmark>/pass@k`, ...). It is skipped on resume (global_step > 0) and when
the run validates nothing (no validation data, or `limit_val_batches: 0`).
"""

from __future__ import annotations

import lightning as L


class ValidateOnStart(L.Callback):
    def __init__(self, enabled: bool = True) -> None:
        """
        Args:
            enabled: Run the step-0 validation (turn off to save its time).
        """
        self.enabled = enabled
        self.runs = 0
        """Step-0 validations run by this callback (for inspection)."""

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not self.enabled or trainer.global_step > 0 or not trainer.enable_validation:
            return
        # What Lightning's training epoch loop does around a validation between steps (`on_advance_end`): mark the
        # trainer as validating, so the val loop is the active one, then hand training back. The logger
        # connector's first-iteration flag is kept for the first training step's logging.
        first_loop_iter = trainer._logger_connector._first_loop_iter
        trainer.validating = True
        trainer.fit_loop.epoch_loop.val_loop.run()
        trainer.training = True
        trainer._logger_connector._first_loop_iter = first_loop_iter
        self.runs += 1
