"""Swappable training behaviours, installed as `trapo_lightning.callbacks` (configs write that path)."""

from trapo_lightning.callbacks.completions import CompletionsTable
from trapo_lightning.callbacks.controllers import AdaptiveAlpha, AdaptiveKL, AlphaSchedule
from trapo_lightning.callbacks.preemption import PreemptionCheckpoint
from trapo_lightning.callbacks.prefix_schedules import (
    AdaptiveGuidance,
    CosineHint,
    FixedPrefix,
    LuffyGuidance,
    NoGuidanceSchedule,
    PrefixSchedule,
    SFTOnly,
)
from trapo_lightning.callbacks.validate_on_start import ValidateOnStart
from trapo_lightning.callbacks.vllm_refresh import VLLMRolloutRefresh

__all__ = [
    "AdaptiveAlpha",
    "AdaptiveGuidance",
    "AdaptiveKL",
    "AlphaSchedule",
    "CompletionsTable",
    "CosineHint",
    "FixedPrefix",
    "LuffyGuidance",
    "NoGuidanceSchedule",
    "PrefixSchedule",
    "PreemptionCheckpoint",
    "SFTOnly",
    "VLLMRolloutRefresh",
    "ValidateOnStart",
]
