"""Where TRAPO writes the checkpoints it takes itself: `PreemptionCheckpoint`'s on a stop signal and the module's
after too many non-finite steps in a row (one rule for both, so they always land together)."""

from __future__ import annotations

import os

import lightning as L


def checkpoint_path(trainer: L.Trainer, name: str) -> str:
    """`<folder>/<name>.ckpt`, the folder being the first ModelCheckpoint's, where the run's other checkpoints are
    and where `--ckpt_path last` looks; the trainer's `default_root_dir` without a ModelCheckpoint.

    Args:
        trainer: The running trainer (after setup, when ModelCheckpoint has resolved its folder).
        name: File name without `.ckpt`.
    """
    folder = getattr(trainer.checkpoint_callback, "dirpath", None) or trainer.default_root_dir
    return os.path.join(folder, f"{name}.ckpt")
