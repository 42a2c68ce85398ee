"""Rollout engines: sample continuations of prompt (+ expert prefix) token ids from the current policy."""

from trapo_lightning.rollout.base import (
    Generation,
    RolloutEngine,
    RolloutRequest,
    SamplingParams,
    StaleRolloutError,
    check_rollout_version,
)
from trapo_lightning.rollout.hf_generate import HFGenerateEngine

__all__ = [
    "Generation",
    "HFGenerateEngine",
    "RolloutEngine",
    "RolloutRequest",
    "SamplingParams",
    "StaleRolloutError",
    "check_rollout_version",
]
