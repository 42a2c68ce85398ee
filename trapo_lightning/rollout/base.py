"""The rollout engine interface.

The training step asks for one continuation per request: a request is the prompt's token ids followed by the
expert prefix chosen for it (empty when unguided) and its own budget of new tokens, so guided and unguided samples
of a micro-group go out in one engine call. Engines return the sampled token ids and the sampler's log-probs, so
a later issue can compare them with the trainer's log-probs (the train/rollout mismatch).
"""

from __future__ import annotations

import abc
from collections.abc import Iterable, Sequence
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
    """Samples continuations from the policy. `bind` is called once the policy exists (after `configure_model`).

    An engine either samples the training module itself (`weights_version` None: always current, nothing to
    refresh) or holds its own copy of the weights (vLLM): then `load_weights` replaces that copy and records the
    policy version it came from, and the module refuses to sample from a copy older than it allows.
    """

    @abc.abstractmethod
    def bind(self, policy: torch.nn.Module, eos_token_id: int, pad_token_id: int) -> None:
        """Attach the engine to the policy it samples from."""

    @abc.abstractmethod
    def generate(self, requests: Sequence[RolloutRequest], params: SamplingParams) -> list[Generation]:
        """One continuation per request, in request order."""

    @property
    def weights_version(self) -> int | None:
        """Policy version (optimizer steps taken) of the weights the engine samples from; None if it samples the
        live training module."""
        return None

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]], version: int) -> None:
        """Replace the engine's copy of the weights (Hugging Face parameter names, full tensors), streamed."""
        raise NotImplementedError(f"{type(self).__name__} samples the training module itself; nothing to load")

    def sleep(self) -> None:
        """Free the engine's accelerator memory between rollouts, where the backend can (no-op otherwise)."""

    def wake(self) -> None:
        """Undo `sleep` before the next rollout."""


class StaleRolloutError(RuntimeError):
    """The rollout engine's weights are older than the policy allows: samples would silently be off-policy."""


def check_rollout_version(engine_version: int | None, policy_version: int, max_staleness: int) -> None:
    """Raise unless the engine samples the live policy (None) or a copy at most `max_staleness` steps old."""
    if engine_version is None:
        return
    lag = policy_version - engine_version
    if not 0 <= lag <= max_staleness:
        raise StaleRolloutError(
            f"the rollout engine holds policy version {engine_version} but the policy is at version "
            f"{policy_version} (allowed lag: {max_staleness}). Add trapo_lightning.callbacks.VLLMRolloutRefresh to "
            "trainer.callbacks, or raise model.max_rollout_staleness to its every_n_steps - 1."
        )
