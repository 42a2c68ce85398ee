"""Keep a rollout engine's weight copy (vLLM) in step with the policy: refresh it every N optimizer steps.

When: after the optimizer step (`on_train_batch_end`), once the engine lags the policy by `every_n_steps`
versions, so the next step samples from the new weights; and at train start when they differ (a resumed policy
while the engine was built from the folder). Versions, not global steps, decide: a step skipped for a non-finite
loss changes no weight and needs no refresh. Every rank holds the same versions, so every rank refreshes at the
same step, as the FSDP gathers require.

How: `trapo_lightning.weights.iter_full_tensors` gathers the policy's parameters in buckets of at most `bucket_mb`
(one collective per tensor under FSDP2, never the whole state dict at once, never through disk); the engine
consumes the stream, tags its copy with the policy version and drops its prefix cache.

With every_n_steps > 1 a resumed run refreshes to the policy's current weights at start, where the uninterrupted
run still sampled from its older copy: resume is exact only with every_n_steps = 1 (the default).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any, NamedTuple

import lightning as L
import torch

from trapo_lightning.rollout.base import RolloutEngine
from trapo_lightning.weights import iter_full_tensors

_MB = 1 << 20


class RefreshStats(NamedTuple):
    version: int
    """Policy version the engine now holds."""
    nbytes: int
    """Bytes of full tensors streamed into the engine."""
    seconds: float


class VLLMRolloutRefresh(L.Callback):
    def __init__(self, every_n_steps: int = 1, bucket_mb: float = 512.0) -> None:
        """
        Args:
            every_n_steps: Refresh the engine's weights once it lags the policy by this many optimizer steps (1:
                every rollout from the current policy). Set model.max_rollout_staleness to at least this - 1.
            bucket_mb: Most MiB of gathered full tensors alive at once while streaming (a single larger tensor
                goes alone).
        """
        if every_n_steps < 1:
            raise ValueError(f"every_n_steps must be >= 1, got {every_n_steps}")
        if bucket_mb <= 0:
            raise ValueError(f"bucket_mb must be > 0, got {bucket_mb}")
        self.every_n_steps = every_n_steps
        self.bucket_bytes = max(1, int(bucket_mb * _MB))
        self.last: RefreshStats | None = None
        """The latest refresh, for inspection."""

    def due(self, engine_version: int, policy_version: int) -> bool:
        """Whether the engine's copy lags the policy enough to refresh after a step."""
        return policy_version - engine_version >= self.every_n_steps

    def refresh(self, policy: torch.nn.Module, engine: RolloutEngine, version: int) -> RefreshStats:
        """Stream `policy`'s parameters into `engine` and tag them with `version`."""
        start = time.perf_counter()
        moved = 0

        def stream() -> Iterator[tuple[str, torch.Tensor]]:
            nonlocal moved
            for bucket in iter_full_tensors(policy, self.bucket_bytes):
                moved += sum(t.numel() * t.element_size() for _, t in bucket)
                yield from bucket

        engine.load_weights(stream(), version)
        self.last = RefreshStats(version, moved, time.perf_counter() - start)
        return self.last

    # -- hooks --------------------------------------------------------------------------------------------------
    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        engine = pl_module.rollout
        if engine.weights_version is None:
            raise TypeError(
                f"VLLMRolloutRefresh refreshes an engine's own weight copy, but {type(engine).__name__} samples the "
                "training policy itself; drop the callback or use the VLLMEngine rollout."
            )
        if pl_module.max_rollout_staleness < self.every_n_steps - 1:
            raise ValueError(
                f"VLLMRolloutRefresh(every_n_steps={self.every_n_steps}) lets the engine lag up to "
                f"{self.every_n_steps - 1} steps, but model.max_rollout_staleness is "
                f"{pl_module.max_rollout_staleness}; raise it or lower every_n_steps."
            )
        if engine.weights_version != pl_module.policy_version:
            self._refresh_and_log(trainer, pl_module)

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if self.due(pl_module.rollout.weights_version, pl_module.policy_version):
            self._refresh_and_log(trainer, pl_module)

    def _refresh_and_log(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        stats = self.refresh(pl_module.policy, pl_module.rollout, pl_module.policy_version)
        metrics = {
            "rollout/weights_version": float(stats.version),
            "rollout/refresh_bytes": float(stats.nbytes),
            "rollout/refresh_seconds": stats.seconds,
        }
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=trainer.global_step)
