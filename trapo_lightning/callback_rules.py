"""What a run's callbacks must respect, checked in one place, `TrapoModule.setup` (before any model is loaded).

- One writer per module setting. A callback that sets a module setting before each step declares it in its class
  attribute `writes` (`"loss.kl_coef"`, `"loss.trust_region_alpha"`, `"guidance"`). Two writers of one setting
  would overwrite each other in callback order, so such a run is refused with an error naming both and the setting.
- One checkpoint entry per stateful callback. Lightning saves a callback's `state_dict` under its `state_key` (and
  refuses two callbacks with one key when the Trainer is built). A setting's writer is keyed by what it writes
  (`writer_state_key`), which the first rule makes unique and which survives retuning its arguments between runs.
  On resume Lightning silently loads nothing for a key the checkpoint lacks: `missing_states` names those, so the
  module can say which callbacks start afresh.
- Checkpoints written during a step come last. A callback that saves a checkpoint in `on_train_batch_end`
  (`writes_checkpoints = True`: `PreemptionCheckpoint`) runs after every other callback, as Lightning runs its
  ModelCheckpoint, so the checkpoint holds every other callback's state after the step whatever the config's order.
"""

from __future__ import annotations

from collections.abc import Sequence

import lightning as L

from trapo_lightning.errors import ConfigError


def setting_writers(callbacks: Sequence[L.Callback]) -> dict[str, list[L.Callback]]:
    """Each module setting written by a callback -> the callbacks declaring it in `writes`, in list order."""
    writers: dict[str, list[L.Callback]] = {}
    for callback in callbacks:
        for setting in getattr(callback, "writes", ()):
            writers.setdefault(setting, []).append(callback)
    return writers


def reference_needed(kl_coef: float, callbacks: Sequence[L.Callback]) -> bool:
    """Whether the frozen reference model has a use: it only serves the KL term, so when `kl_coef` is set or a
    callback may set it (AdaptiveKL). The module loads it by this rule and `trapo plan` counts it by it."""
    return kl_coef != 0 or "loss.kl_coef" in setting_writers(callbacks)


def writer_state_key(callback: L.Callback) -> str:
    """The checkpoint key of a callback that writes module settings: its class and the settings it writes."""
    return callback._generate_state_key(writes=list(callback.writes))


def stateful(callback: L.Callback) -> bool:
    """Whether the callback saves state in checkpoints (overrides `state_dict`)."""
    return type(callback).state_dict is not L.Callback.state_dict


def check_callbacks(callbacks: Sequence[L.Callback]) -> None:
    """Refuse two writers of one module setting, naming both and the setting."""
    for setting, writers in setting_writers(callbacks).items():
        if len(writers) > 1:
            names = " and ".join(type(c).__name__ for c in writers)
            raise ConfigError(
                f"{names} both write the module setting `{setting}`: each setting may have one writer per run "
                "(the later would silently undo the earlier); keep one of them in trainer.callbacks"
            )


def in_hook_order(callbacks: Sequence[L.Callback]) -> list[L.Callback]:
    """`callbacks` with those that write checkpoints during a step (`writes_checkpoints`) moved to the end, each
    group in its own order."""
    last = [c for c in callbacks if getattr(c, "writes_checkpoints", False)]
    return [c for c in callbacks if c not in last] + last


def missing_states(callbacks: Sequence[L.Callback], checkpoint: dict) -> list[str]:
    """Checkpoint keys of the callbacks with state that `checkpoint` holds none for: Lightning loads nothing for
    them, silently, so they would resume from their settings (a callback added since, or renamed settings)."""
    saved = checkpoint.get("callbacks") or {}
    return [c.state_key for c in callbacks if stateful(c) and c.state_dict() and c.state_key not in saved]
