"""A test callback for `trapo fit` runs in other processes: what each rank saw, written where the test can read it.

Lightning's loggers write rank 0's numbers only; the sharding tests need every rank's loss (a multi-rank step's loss
is the mean of the ranks' losses), every rank's decisions (the module settings the tuning callbacks wrote for the
step, their state after it, their logged statistics), every rank's validation numbers, and the trained policy's
logits on a fixed input (what an export must reproduce). List it after the callbacks whose state it records.
"""

from __future__ import annotations

import json
from pathlib import Path

import lightning as L
import torch

PROBE_IDS = list(range(5, 37))  # 32 token ids, all inside the tiny tokenizer's vocabulary
LOGGED = ("train/", "guidance/", "kl/", "trust_region/")  # the step's own numbers and the tuning callbacks'


class RecordSteps(L.Callback):
    def __init__(self, folder: str) -> None:
        """
        Args:
            folder: Where to write `steps_rank<r>.jsonl` and `val_rank<r>.jsonl` (every rank) and `probe_logits.pt`
                (rank 0: the probe's input ids and the trained policy's logits on them).
        """
        self.folder = Path(folder)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx) -> None:
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith(LOGGED)}
        row = {"global_step": trainer.global_step, "world_size": trainer.world_size, "metrics": metrics,
               "prompts": [record.problem for record in batch.records],
               "settings": {"kl_coef": pl_module.loss.kl_coef, "trust_region_alpha": pl_module.loss.trust_region_alpha},
               "states": {c.state_key: c.state_dict() for c in trainer.callbacks if getattr(c, "writes", ())}}
        self._append(trainer, "steps", row)

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.sanity_checking:
            metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/")}
            self._append(trainer, "val", {"global_step": trainer.global_step, "metrics": metrics})

    def _append(self, trainer: L.Trainer, kind: str, row: dict) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        with open(self.folder / f"{kind}_rank{trainer.global_rank}.jsonl", "a") as handle:
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
