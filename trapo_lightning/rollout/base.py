"""The rollout engine interface.

The training step asks for one continuation per request: a request is the prompt's token ids followed by the
expert prefix chosen for it (empty when unguided) and its own budget of new tokens, so guided and unguided samples
of a micro-group go out in one engine call. Engines return the sampled token ids and the sampler's log-probs, so
a later issue can compare them with the trainer's log-probs (the train/rollout mismatch).
"""

from __future__ import annotations

import abc
from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

import torch


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    """Seed of this call's sampling; None draws from the process's global RNG. The module passes one derived from
    (run seed, step, micro-group, rank), so a resumed run samples exactly what an uninterrupted one would."""

    def __post_init__(self) -> None:
        if self.temperature <= 0:
            raise ValueError(f"temperature must be > 0 (sampling), got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")


class RolloutRequest(NamedTuple):
    token_ids: tuple[int, ...]
    """Prompt ids followed by the expert prefix ids (if guided)."""
    max_new_tokens: int


class Generation(NamedTuple):
    token_ids: list[int]
    """Sampled ids, ending with EOS when `finished`."""
    logprobs: list[float]
    """The sampler's log-prob of each sampled id, at the sampling temperature."""
    finished: bool
    """True when the sample ended with EOS rather than running out of budget."""


class RolloutEngine(abc.ABC):
    """Samples continuations from the policy. `bind` is called once the policy exists (after `configure_model`)."""

    @abc.abstractmethod
    def bind(self, policy: torch.nn.Module, eos_token_id: int, pad_token_id: int) -> None:
        """Attach the engine to the policy it samples from."""

    @abc.abstractmethod
    def generate(self, requests: Sequence[RolloutRequest], params: SamplingParams) -> list[Generation]:
        """One continuation per request, in request order."""
