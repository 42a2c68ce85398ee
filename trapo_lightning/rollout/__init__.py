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
from trapo_lightning.rollout.vllm_engine import VLLMEngine

__all__ = [
    "Generation",
    "HFGenerateEngine",
    "RolloutEngine",
    "RolloutRequest",
    "SamplingParams",
    "StaleRolloutError",
    "VLLMEngine",
    "check_rollout_version",
]
