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
    """True when the sample ended with one of the EOS ids rather than running out of budget."""


class RolloutEngine(abc.ABC):
    """Samples continuations from the policy. `bind` is called once the policy exists (after `configure_model`).

    An engine either samples the training module itself (`weights_version` None: always current, nothing to
    refresh) or holds its own copy of the weights (vLLM): then `load_weights` replaces that copy and records the
    policy version it came from, and the module refuses to sample from a copy older than it allows.
    """

    @abc.abstractmethod
    def bind(self, policy: torch.nn.Module, eos_token_ids: Sequence[int], pad_token_id: int) -> None:
        """Attach the engine to the policy it samples from; a row ends at the first of any of `eos_token_ids`
        (`eos_token_ids` below collects them; `as_eos_ids` normalises what a caller passes)."""

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


def eos_token_ids(tokenizer, policy: torch.nn.Module | None) -> tuple[int, ...]:
    """Every id that ends a response: the tokenizer's EOS, then the policy's `generation_config.eos_token_id` (an
    int or a list). Qwen2.5's instruct models list two (151645 `<|im_end|>` and 151643 `<|endoftext|>`), and a
    sampler that stops on only one runs on past the other.

    Args:
        tokenizer: The policy's tokenizer (its `eos_token_id` may be None).
        policy: The policy model; a missing or empty generation config adds nothing.
    """
    listed = getattr(getattr(policy, "generation_config", None), "eos_token_id", None)
    listed = [] if listed is None else [listed] if isinstance(listed, int) else list(listed)
    ids = tuple(dict.fromkeys(i for i in [tokenizer.eos_token_id, *listed] if i is not None))
    if not ids:
        raise ValueError(
            "neither the tokenizer nor the policy's generation_config.json names an EOS token, so rollouts could "
            "never finish; set eos_token in the tokenizer config or eos_token_id in generation_config.json"
        )
    return ids


def as_eos_ids(eos_token_ids: int | Iterable[int]) -> tuple[int, ...]:
    """`eos_token_ids` as a non-empty tuple; a single int is taken as a one-id list."""
    ids = (eos_token_ids,) if isinstance(eos_token_ids, int) else tuple(int(i) for i in eos_token_ids)
    if not ids:
        raise ValueError("eos_token_ids is empty: rollouts could never finish; pass at least the tokenizer's EOS id")
    return ids


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
