"""What the policy actually wrote, and how it was graded, as tables in the run folder (and in W&B).

Training: every N steps, the step's sampled completions with their guidance and verdicts, appended to
`completions.jsonl` in the logger's folder (one JSON object per row) and, when a `WandbLogger` is attached, logged
as the W&B table `completions`.

Validation and test (`trapo fit`'s validations, `trapo validate`, `trapo test`): each run's answers with the
reference answer, the verdict and the benchmark, appended to `val_completions.jsonl` / `test_completions.jsonl`
next to it (W&B tables `val_completions` / `test_completions`). At most `val_max_rows` answers per benchmark and
run are kept, the first ones in the benchmark's file order, so the files grow by a bounded amount with every
validation of a long training run; `val_max_rows: null` keeps every answer (what scoring a model once wants).
Each rank keeps the answers of its share of the problems; they are gathered to rank 0, which writes them, at the
end of the run. Lightning's sanity check writes nothing; `ValidateOnStart`'s validation at step 0 is written like
every other. Two tables in one run need different filenames (each keeps its own state under its filename).
"""

from __future__ import annotations

import json
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.loggers import WandbLogger

COLUMNS = ("step", "problem", "micro_group", "prefix_ratio", "expert_prefix", "completion", "reward", "verdict")
EVAL_COLUMNS = (
    "step", "benchmark", "source", "problem", "answer", "sample", "completion", "verdict", "response_tokens",
    "finished",
)


class CompletionsTable(L.Callback):
    def __init__(
        self,
        every_n_steps: int = 50,
        max_rows: int = 16,
        filename: str = "completions.jsonl",
        val_max_rows: int | None = 64,
    ) -> None:
        """
        Args:
            every_n_steps: Write the training table after every this many training steps (and after the first).
            max_rows: Samples per training table, taken in order (prompt by prompt, micro-group by micro-group).
            filename: File in the logger's folder (the run directory without a logger) the training rows are
                appended to; validation and test rows go to `val_<filename>` and `test_<filename>` beside it.
            val_max_rows: Answers written per benchmark in each validation or test run, the first ones in the
                benchmark's order (all of a problem's `model.evaluation` samples before the next problem); null: all.
        """
        if every_n_steps < 1 or max_rows < 1:
            raise ValueError(f"every_n_steps and max_rows must be >= 1, got {every_n_steps} and {max_rows}")
        if val_max_rows is not None and val_max_rows < 1:
            raise ValueError(f"val_max_rows must be >= 1 or null (every answer), got {val_max_rows}")
        self.every_n_steps, self.max_rows, self.filename = every_n_steps, max_rows, filename
        self.val_max_rows = val_max_rows
        self.steps_seen = 0
        self._folder: Path | None = None
        self._eval_rows: dict[str, list[dict]] = {}  # this rank's rows of the running validation/test, per benchmark

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        # `trainer.log_dir` is a collective (rank 0's folder is broadcast): every rank asks here, once.
        self._folder = Path(trainer.log_dir or trainer.default_root_dir)

    # -- training ---------------------------------------------------------------------------------------------------
    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx: int):
        step = self.steps_seen
        self.steps_seen += 1
        if step % self.every_n_steps or not outputs or not trainer.is_global_zero:
            return
        rows = self.rows(step, outputs["samples"], batch.records, pl_module.tokenizer)
        self._write(trainer, self.filename, "completions", COLUMNS, rows)

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

    # -- validation and test ----------------------------------------------------------------------------------------
    def on_validation_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._eval_rows = {}

    def on_test_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._eval_rows = {}

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int, dataloader_idx: int = 0):
        if not trainer.sanity_checking:
            self._keep(trainer.global_step, outputs, batch.records, pl_module.tokenizer)

    def on_test_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int, dataloader_idx: int = 0):
        self._keep(trainer.global_step, outputs, batch.records, pl_module.tokenizer)

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.sanity_checking:
            self._write_eval(trainer, "val")

    def on_test_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._write_eval(trainer, "test")

    def _keep(self, step: int, outputs, records, tokenizer) -> None:
        """Adds the batch's answers to its benchmark's rows, up to `val_max_rows`."""
        if not outputs:
            return
        rows = self._eval_rows.setdefault(outputs["benchmark"], [])
        room = None if self.val_max_rows is None else self.val_max_rows - len(rows)
        if room != 0:
            rows += self.eval_rows(step, outputs["benchmark"], outputs["evaluation"], records, tokenizer, room)

    @staticmethod
    def eval_rows(step: int, benchmark: str, evaluation, records, tokenizer, limit: int | None = None) -> list[dict]:
        """A row for each of the first `limit` (None: all) answers of an evaluated batch, which holds
        `evaluation.samples` answers per record, problem-major."""
        n = evaluation.samples
        generations = evaluation.generations[:limit]
        texts = tokenizer.batch_decode([g.token_ids for g in generations], skip_special_tokens=True)
        return [
            {
                "step": step,
                "benchmark": benchmark,
                "source": records[i // n].source,
                "problem": records[i // n].problem,
                "answer": records[i // n].answer,
                "sample": i % n,
                "completion": text,
                "verdict": result.verdict.value,
                "response_tokens": len(generation.token_ids),
                "finished": generation.finished,
            }
            for i, (text, result, generation) in enumerate(zip(texts, evaluation.results, generations))
        ]

    def _write_eval(self, trainer: L.Trainer, stage: str) -> None:
        """Gathers every rank's rows to rank 0 (ranks hold consecutive shares of each benchmark, in rank order),
        which writes the first `val_max_rows` per benchmark."""
        shares = [self._eval_rows]
        if trainer.world_size > 1 and torch.distributed.is_available() and torch.distributed.is_initialized():
            shares = [None] * trainer.world_size
            torch.distributed.all_gather_object(shares, self._eval_rows)
        self._eval_rows = {}
        if not trainer.is_global_zero:
            return
        rows = []
        for benchmark in dict.fromkeys(name for share in shares for name in share):  # first-seen order
            kept = [row for share in shares for row in share.get(benchmark, [])]
            rows += kept if self.val_max_rows is None else kept[: self.val_max_rows]
        if rows:
            filename = str(Path(self.filename).with_name(f"{stage}_{Path(self.filename).name}"))
            self._write(trainer, filename, f"{stage}_completions", EVAL_COLUMNS, rows)

    def _write(self, trainer: L.Trainer, filename: str, table: str, columns: tuple[str, ...], rows: list[dict]):
        path = (self._folder or Path(trainer.default_root_dir)) / filename
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("a", encoding="utf-8") as handle:
            for row in rows:
                handle.write(json.dumps(row, ensure_ascii=False) + "\n")
        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger):
                logger.log_table(key=table, columns=list(columns), data=[[r[c] for c in columns] for r in rows])

    @property
    def state_key(self) -> str:
        return self._generate_state_key(filename=self.filename)

    def state_dict(self) -> dict:
        return {"steps_seen": self.steps_seen}

    def load_state_dict(self, state_dict: dict) -> None:
        self.steps_seen = int(state_dict["steps_seen"])
