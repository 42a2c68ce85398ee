"""Faults injected into real `trapo fit` runs by the resume and robustness tests (listed as callbacks in a test's
config). They stand in only for the outside event, a kill, a preemption signal or a numerical blow-up, never for
the code under test."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import lightning as L
import torch


class HoldAtStep(L.Callback):
    """At the start of optimizer step `step` (after the checkpoint of the step before it is written), write `marker`
    and wait until the file `release` appears (at most a minute), so the test can kill or signal the process at a
    known point."""

    def __init__(self, step: int, marker: str, release: str) -> None:
        self.step = step
        self.marker = marker
        self.release = release

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step != self.step:
            return
        Path(self.marker).write_text(str(trainer.global_step))
        deadline = time.monotonic() + 60
        while not Path(self.release).exists() and time.monotonic() < deadline:
            time.sleep(0.05)


class NonFiniteLogitsAt(L.Callback):
    """Makes the policy's logits NaN during the training forwards of the given training batches (0-based)."""

    def __init__(self, batches: list[int]) -> None:
        self.batches = set(batches)
        self._handle = None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if pl_module.train_batches in self.batches:
            self._handle = pl_module.policy.lm_head.register_forward_hook(_nan_when_grad_enabled)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self._handle is not None:
            self._handle.remove()
            self._handle = None


def _nan_when_grad_enabled(module, inputs, output):
    # Rollouts run under no_grad and stay finite; only the training forward (with grad) blows up.
    return output * float("nan") if torch.is_grad_enabled() else output


class SignalAtStep(L.Callback):
    """Sends this process the scheduler's stop signal `signal_name` at the start of optimizer step `step`, on rank
    `rank` only (as a scheduler signals the one node it preempts)."""

    def __init__(self, step: int, rank: int = 0, signal_name: str = "SIGUSR1") -> None:
        self.step, self.rank, self.signum = step, rank, getattr(signal, signal_name)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == self.step and trainer.global_rank == self.rank:
            os.kill(os.getpid(), self.signum)
