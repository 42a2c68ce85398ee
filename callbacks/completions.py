"""A table of sampled completions every N steps: what the policy actually wrote, under which guidance, and how it
was graded. Rows go to `completions.jsonl` in the logger's folder (one JSON object per row, appended) and, when a
`WandbLogger` is attached, to a W&B table `completions`."""

from __future__ import annotations

import json
from pathlib import Path

import lightning as L
from lightning.pytorch.loggers import WandbLogger

COLUMNS = ("step", "problem", "micro_group", "prefix_ratio", "expert_prefix", "completion", "reward", "verdict")


class CompletionsTable(L.Callback):
    def __init__(self, every_n_steps: int = 50, max_rows: int = 16, filename: str = "completions.jsonl") -> None:
        """
        Args:
            every_n_steps: Write the table after every this many training steps (and after the first).
            max_rows: Samples per table, taken in order (prompt by prompt, micro-group by micro-group).
            filename: File in the logger's folder (the run directory without a logger) the rows are appended to.
        """
        if every_n_steps < 1 or max_rows < 1:
            raise ValueError(f"every_n_steps and max_rows must be >= 1, got {every_n_steps} and {max_rows}")
        self.every_n_steps, self.max_rows, self.filename = every_n_steps, max_rows, filename
        self.steps_seen = 0

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx: int):
        step = self.steps_seen
        self.steps_seen += 1
        if step % self.every_n_steps or not outputs or not trainer.is_global_zero:
            return
        rows = self.rows(step, outputs["samples"], batch.records, pl_module.tokenizer)
        path = Path(trainer.log_dir or trainer.default_root_dir) / self.filename
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("a", encoding="utf-8") as handle:
            for row in rows:
                handle.write(json.dumps(row, ensure_ascii=False) + "\n")
        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger):
                logger.log_table(key="completions", columns=list(COLUMNS), data=[[r[c] for c in COLUMNS] for r in rows])

    def rows(self, step: int, samples, records, tokenizer) -> list[dict]:
        out = []
        for sample in samples[: self.max_rows]:
            prefix, own = sample.response_ids[: sample.prefix_len], sample.response_ids[sample.prefix_len :]
            out.append({
                "step": step,
                "problem": records[sample.prompt_index].problem,
                "micro_group": sample.micro_group,
                "prefix_ratio": round(float(sample.prefix_ratio), 4),
                "expert_prefix": tokenizer.decode(list(prefix), skip_special_tokens=True),
                "completion": tokenizer.decode(list(own), skip_special_tokens=True),
                "reward": sample.reward,
                "verdict": sample.verdict.value,
            })
        return out

    def state_dict(self) -> dict:
        return {"steps_seen": self.steps_seen}

    def load_state_dict(self, state_dict: dict) -> None:
        self.steps_seen = int(state_dict["steps_seen"])
