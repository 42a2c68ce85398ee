"""Swappable training behaviours, installed as `trapo_lightning.callbacks` (configs write that path)."""

from trapo_lightning.callbacks.preemption import PreemptionCheckpoint
from trapo_lightning.callbacks.validate_on_start import ValidateOnStart

__all__ = ["PreemptionCheckpoint", "ValidateOnStart"]
