"""A test callback for `trapo fit` runs in other processes: what each rank saw, written where the test can read it.

Lightning's loggers write rank 0's numbers only; the sharding tests need every rank's loss (a 2-rank step's loss
is the mean of the ranks' losses) and the trained policy's logits on a fixed input (what an export must reproduce).
"""

from __future__ import annotations

import json
from pathlib import Path

import lightning as L
import torch

PROBE_IDS = list(range(5, 37))  # 32 token ids, all inside the tiny tokenizer's vocabulary


class RecordSteps(L.Callback):
    def __init__(self, folder: str) -> None:
        """
        Args:
            folder: Where to write `steps_rank<r>.jsonl` (every rank) and `probe_logits.pt` (rank 0: the probe's
                input ids and the trained policy's logits on them).
        """
        self.folder = Path(folder)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("train/")}
        row = {"global_step": trainer.global_step, "world_size": trainer.world_size, "metrics": metrics,
               "prompts": [record.problem for record in batch.records]}
        with open(self.folder / f"steps_rank{trainer.global_rank}.jsonl", "a") as handle:
            handle.write(json.dumps(row) + "\n")

    @torch.no_grad()
    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        policy = pl_module.policy
        was_training = policy.training
        policy.eval()
        ids = torch.tensor([PROBE_IDS], device=pl_module.device)
        logits = policy(input_ids=ids, use_cache=False).logits.float().cpu()  # every rank: a sharded forward
        policy.train(was_training)
        if trainer.is_global_zero:
            self.folder.mkdir(parents=True, exist_ok=True)
            torch.save({"input_ids": ids.cpu(), "logits": logits}, self.folder / "probe_logits.pt")
