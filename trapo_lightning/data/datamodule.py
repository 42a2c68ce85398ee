"""`TrapoDataModule`: streams prompts with expert solutions to the training step (TRAPO.md, "Settings"), and the
problems of the validation/test benchmarks to the evaluation.

Benchmarks (AIME, AMC, MATH-500, ...) are named sources whose `val` split is read, one dataloader each, in the
order given; Lightning hands the module the loader's index and `benchmark_names` turns it into the name the
metrics are logged under. Without benchmarks the training source's held-out split is the single benchmark `val`.

Each stage loads only what it uses: `fit` the training split and the benchmarks, `validate` and `test` the
benchmarks alone, so scoring a model needs no training data (a source with `val_files` only is enough).
"""

from __future__ import annotations

import re
from collections import Counter

import lightning as L
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch.utils.data import DataLoader

from trapo_lightning.data.prompts import PromptTemplate
from trapo_lightning.data.records import PromptBatch, StreamPosition
from trapo_lightning.data.sources import DataSource, SyntheticSource
from trapo_lightning.data.stream import PromptStream
from trapo_lightning.errors import ConfigError, DataError
from trapo_lightning.metrics import HELD_OUT
from trapo_lightning.models.sources import PolicySource

_BENCHMARK_NAME = re.compile(r"[A-Za-z0-9_-]+")
_TRAIN = "train"
_STAGES_WITH_TRAINING = ("fit",)
_STAGES_WITH_BENCHMARKS = ("fit", "validate", "test")


class TrapoDataModule(L.LightningDataModule):
    def __init__(
        self,
        policy: PolicySource | None = None,
        source: DataSource | None = None,
        prompt: PromptTemplate | None = None,
        prompts_per_step: int = 128,
        val_batch_size: int = 64,
        max_prompt_tokens: int = 1024,
        max_response_tokens: int = 8192,
        seed: int = 0,
        benchmarks: dict[str, DataSource] | None = None,
    ) -> None:
        """
        Args:
            policy: Whose tokenizer and chat template to use; the CLI links it from `model.policy`.
            source: Where the records come from (synthetic default, or JSONL, Parquet, datasets or OpenR1 files).
            prompt: System message and user template (default: the paper's).
            prompts_per_step: Prompts per optimizer step on each rank (the paper: 128; its script: 8).
            val_batch_size: Prompts per validation batch on each rank.
            max_prompt_tokens: Longer prompts are skipped and counted; the CLI links it from the model.
            max_response_tokens: Expert solutions longer than this (+EOS) are skipped and counted; linked too.
            seed: Seed of the per-epoch shuffle.
            benchmarks: Validation and test benchmarks by name, each a source whose `val` split holds
                {problem, answer} rows (e.g. `aime24: {class_path: trapo_lightning.data.sources.JsonlSource,
                init_args: {val_files: [aime24.jsonl]}}`); metrics are logged as `val/<name>/...`. Default: the
                source's held-out split, logged as `val/...`.
        """
        super().__init__()
        if prompts_per_step < 1 or val_batch_size < 1:
            raise ValueError("prompts_per_step and val_batch_size must be >= 1")
        for name in benchmarks or {}:
            if not _BENCHMARK_NAME.fullmatch(name) or name == "train":
                raise ValueError(
                    f"benchmark name {name!r} must be letters, digits, '_' or '-' (it becomes part of metric names), "
                    "and not 'train'"
                )
        self.policy = policy
        self.source = source or SyntheticSource()
        self.prompt = prompt or PromptTemplate()
        self.prompts_per_step = prompts_per_step
        self.val_batch_size = val_batch_size
        self.max_prompt_tokens = max_prompt_tokens
        self.max_response_tokens = max_response_tokens
        self.seed = seed
        self.benchmarks = dict(benchmarks) if benchmarks else {HELD_OUT: self.source}
        self.streams: dict[str, PromptStream] = {}  # "train", and one per benchmark under its name
        self._trained_position: StreamPosition | None = None  # just after the last batch handed to training
        self._resume_position: StreamPosition | None = None

    def setup(self, stage: str) -> None:
        """Loads the splits `stage` uses and that are not loaded yet: the training split for `fit`, the benchmarks
        for `fit`, `validate` and `test` (`predict` is not supported and loads nothing)."""
        wanted = [(_TRAIN, self.source)] if stage in _STAGES_WITH_TRAINING else []
        wanted += list(self.benchmarks.items()) if stage in _STAGES_WITH_BENCHMARKS else []
        wanted = [(name, source) for name, source in wanted if name not in self.streams]
        if not wanted:
            return
        if self.policy is None:
            raise ConfigError("TrapoDataModule needs `policy` (the CLI links it from model.policy) for its tokenizer")
        tokenizer = self.policy.load_tokenizer()
        for name, source in wanted:
            self.streams[name] = self._load_stream(name, source, tokenizer)
            if name == _TRAIN and self._resume_position is not None:
                self.streams[_TRAIN].resume_from(self._resume_position)

    def _load_stream(self, name: str, source: DataSource, tokenizer) -> PromptStream:
        """The stream of the training split (`name` "train") or of one benchmark's `val` split."""
        rank, world = (self.trainer.global_rank, self.trainer.world_size) if self.trainer else (0, 1)
        train = name == _TRAIN
        records, skipped = source.load("train" if train else "val")
        if skipped:
            rank_zero_warn(f"{name} data: skipped malformed rows by reason: {dict(skipped)}")
        batch_size = self.prompts_per_step if train else self.val_batch_size
        self._check_size(name, records, batch_size * world if train else world)
        if not train and len(records) % world:
            rank_zero_warn(
                f"{name}: {len(records)} problems over {world} ranks; each rank evaluates an equal share, so the "
                f"last {len(records) % world} are left out. Evaluate on a number of devices that divides it."
            )
        stream = PromptStream(
            records, tokenizer, self.prompt, batch_size, self.max_prompt_tokens, self.max_response_tokens,
            shuffle=train, drop_last=train, seed=self.seed, rank=rank, world_size=world,
        )
        stream.skipped = Counter({f"invalid_{k}": v for k, v in skipped.items()})
        rank_zero_info(stream.summary(name, skipped))
        return stream

    # -- exact resume: Lightning stores this in every checkpoint and hands it back before training restarts ----------
    def on_before_batch_transfer(self, batch: PromptBatch, dataloader_idx: int) -> PromptBatch:
        # Called for the batch about to be trained on, not for the one Lightning prefetched behind it.
        if self.trainer is not None and self.trainer.training and batch.position is not None:
            self._trained_position = batch.position
        return batch

    def state_dict(self) -> dict:
        return {"train_position": self._trained_position.state_dict()} if self._trained_position else {}

    def load_state_dict(self, state_dict: dict) -> None:
        if "train_position" not in state_dict:
            return
        self._resume_position = self._trained_position = StreamPosition.from_state_dict(state_dict["train_position"])
        if _TRAIN in self.streams:
            self.streams[_TRAIN].resume_from(self._resume_position)

    @property
    def benchmark_names(self) -> list[str]:
        """The benchmarks in the order of the validation and test dataloaders (`dataloader_idx`)."""
        return list(self.benchmarks)

    @staticmethod
    def _check_size(split: str, records: list, needed: int) -> None:
        if len(records) >= needed:
            return
        if split == _TRAIN:
            need = (
                f"one step across all ranks needs {needed}; add training data (the source's train_files) or lower "
                "data.prompts_per_step"
            )
        else:
            need = f"each of the {needed} ranks needs one; add problems (the source's val_files, or data.benchmarks)"
        raise DataError(f"the {split} split has {len(records)} usable records but {need}")

    def transfer_batch_to_device(self, batch: PromptBatch, device, dataloader_idx: int) -> PromptBatch:
        return batch  # token ids as Python tuples; the training step builds its tensors on the device itself

    def train_dataloader(self) -> DataLoader:
        return self._loader(_TRAIN)

    def val_dataloader(self) -> DataLoader | list[DataLoader]:
        """One loader per benchmark, in `benchmark_names` order; just the loader when there is one."""
        loaders = [self._loader(name) for name in self.benchmarks]
        return loaders if len(loaders) > 1 else loaders[0]

    def test_dataloader(self) -> DataLoader | list[DataLoader]:
        return self.val_dataloader()

    def _loader(self, split: str) -> DataLoader:
        # Batches are made by the stream (it counts skips); tokenizing prompts is cheap next to rollouts, so the
        # loader runs in-process, which also keeps the stream's epoch counter in this process.
        return DataLoader(self.streams[split], batch_size=None, collate_fn=_identity)


def _identity(batch):
    return batch
