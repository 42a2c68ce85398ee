"""Checkpoint and exit cleanly when the scheduler says the job is about to be stopped.

SLURM sends the signal set by `#SBATCH --signal=USR1@120` (SIGUSR1, 120 s before the time limit or on
preemption); Kubernetes and most schedulers send SIGTERM. The handler only raises a flag; the decision is taken at
the end of the current training step, agreed across ranks (one rank's signal stops them all), so the checkpoint
holds a whole step: weights, optimizer, data position, RNG and every callback's state (it runs after every other
callback, wherever the config lists it: `trapo_lightning.callback_rules`). It is written as `last.ckpt` in the
ModelCheckpoint folder (`trapo_lightning.checkpoints`), so the same command with `--ckpt_path last` resumes it. Under SLURM the
job is requeued (`scontrol requeue`) unless `requeue: false`.
"""

from __future__ import annotations

import os
import signal
import subprocess
import threading

import lightning as L
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

from trapo_lightning.checkpoints import checkpoint_path


class PreemptionCheckpoint(L.Callback):
    writes_checkpoints = True  # saves in on_train_batch_end, so the module runs it after every other callback
    def __init__(self, signals: list[str] | None = None, requeue: bool = True, filename: str = "last") -> None:
        """
        Args:
            signals: Signal names that mean "stop soon" (default: SIGTERM and SIGUSR1).
            requeue: Under SLURM (SLURM_JOB_ID set), requeue the job after the checkpoint is written.
            filename: Checkpoint name (without .ckpt) in the ModelCheckpoint folder; "last" makes
                `--ckpt_path last` find it.
        """
        names = signals if signals is not None else ["SIGTERM", "SIGUSR1"]
        unknown = [name for name in names if not hasattr(signal, name)]
        if unknown or not names:
            raise ValueError(f"unknown or no signal names {unknown or names}; use names like SIGTERM or SIGUSR1")
        self.signals = [getattr(signal, name) for name in names]
        self.requeue = requeue
        self.filename = filename
        self.received: int | None = None
        self._previous: dict[int, object] = {}

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        # Installed before Lightning registers its own handlers, which then call ours too.
        if stage != "fit" or threading.current_thread() is not threading.main_thread():
            return
        for signum in self.signals:
            self._previous[signum] = signal.signal(signum, self._on_signal)

    def _on_signal(self, signum: int, frame) -> None:
        self.received = signum
        previous = self._previous.get(signum)
        if callable(previous):
            previous(signum, frame)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx) -> None:
        if not trainer.strategy.reduce_boolean_decision(self.received is not None, all=False):
            return
        path = checkpoint_path(trainer, self.filename)
        trainer.save_checkpoint(path)
        rank_zero_info(f"Stop signal received: checkpoint written to {path} after step {trainer.global_step}.")
        trainer.should_stop = True
        if self.requeue and trainer.is_global_zero and "SLURM_JOB_ID" in os.environ:
            self._requeue(os.environ["SLURM_JOB_ID"])

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        for signum, handler in self._previous.items():
            if threading.current_thread() is threading.main_thread():
                signal.signal(signum, handler)
        self._previous = {}

    @staticmethod
    def _requeue(job_id: str) -> None:
        job = os.environ.get("SLURM_ARRAY_JOB_ID")
        if job is not None:
            job_id = f"{job}_{os.environ['SLURM_ARRAY_TASK_ID']}"
        try:
            result = subprocess.run(["scontrol", "requeue", job_id], capture_output=True, text=True, timeout=60)
        except (OSError, subprocess.TimeoutExpired) as err:
            rank_zero_warn(f"could not requeue SLURM job {job_id}: {err}; resubmit it with --ckpt_path last")
            return
        if result.returncode != 0:
            rank_zero_warn(f"scontrol requeue {job_id} failed: {result.stderr.strip()}; resubmit with --ckpt_path last")
        else:
            rank_zero_info(f"Requeued SLURM job {job_id}.")
