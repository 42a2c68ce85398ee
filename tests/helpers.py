"""Small builders shared by the module, rollout and sampling tests: a tiny policy source, a scripted rollout engine
and a scripted grader. The fakes stand in only for what a test is not about (sampling randomness, math-verify)."""

from __future__ import annotations

from collections.abc import Sequence

import pytest
import torch

from trapo_lightning.models import TinyRandomQwen2
from trapo_lightning.reward import RewardResult, Verdict
from trapo_lightning.rollout.base import Generation, RolloutEngine, RolloutRequest, SamplingParams, as_eos_ids


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """Import into a test module to run it on one intra-op thread. The tiny models' matmuls are microseconds of work,
    far less than waking and syncing OpenMP threads; on a busy 2-core machine spinning threads made each linear
    layer ~400x slower (11 ms instead of 0.03 ms)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_qwen2(path) -> TinyRandomQwen2:
    """A 2-layer, 32-wide random Qwen2 (about 30k parameters) with the tiny BPE tokenizer, written under `path`."""
    return TinyRandomQwen2(
        path=str(path),
        hidden_size=32,
        num_layers=2,
        num_heads=2,
        num_kv_heads=1,
        intermediate_size=64,
        max_position_embeddings=512,
    )


class ScriptedEngine(RolloutEngine):
    """Returns the same continuation `token_ids` (cut to each request's budget) for every request, and records
    every call. `finished` is True when the continuation ends with one of the bound EOS ids and fits the budget.
    `eos` is the first bound id (the tokenizer's), `eos_ids` all of them."""

    def __init__(self, token_ids: Sequence[int], logprob: float = -0.5) -> None:
        self.token_ids = list(token_ids)
        self.logprob = logprob
        self.calls: list[list[RolloutRequest]] = []
        self.eos = None
        self.eos_ids: tuple[int, ...] = ()

    def bind(self, policy: torch.nn.Module, eos_token_ids: Sequence[int], pad_token_id: int) -> None:
        self.eos_ids = as_eos_ids(eos_token_ids)
        self.eos = self.eos_ids[0]

    def generate(self, requests: Sequence[RolloutRequest], params: SamplingParams) -> list[Generation]:
        self.calls.append(list(requests))
        out = []
        for request in requests:
            ids = self.token_ids[: request.max_new_tokens]
            finished = bool(ids) and ids[-1] in self.eos_ids
            out.append(Generation(list(ids), [self.logprob] * len(ids), finished))
        return out


class ScriptedGrader:
    """A grader whose rewards are chosen per prompt: `script[answer][i]` lists the rewards of that prompt's
    micro-group i, handed out in order as the prompt's completions arrive (sampling grades each prompt's samples in
    micro-group order, whatever rounds it batches them in). Records every call's texts."""

    def __init__(
        self, script: dict[str, list[list[float]]], reward_range: tuple[float, float] | None = (0.0, 1.0)
    ) -> None:
        self.script = script
        self.reward_range = reward_range
        self.calls: list[list[tuple[str, str]]] = []
        self.graded: dict[str, int] = {}

    def __call__(self, completions: Sequence[str], answers: Sequence[str]) -> list[RewardResult]:
        self.calls.append(list(zip(completions, answers)))
        results = []
        for answer in answers:
            rewards = [r for micro_group in self.script[answer] for r in micro_group]
            index = self.graded.get(answer, 0)
            assert index < len(rewards), f"more completions for {answer!r} than its script holds"
            self.graded[answer] = index + 1
            reward = rewards[index]
            results.append(RewardResult(Verdict.correct if reward == 1.0 else Verdict.wrong, reward))
        return results


def requests_for(tokenizer, budgets) -> list[RolloutRequest]:
    """Rollout requests over a few short prompts, one per budget, cycling through the prompts."""
    prompts = ["1 + 2 =", "34 + 5 - 6 =", "7", "Compute 8 + 9.", "10 - 4 =", "what?", "2 + 2 + 2 + 2 ="]
    return [
        RolloutRequest(tuple(tokenizer(prompts[i % len(prompts)], add_special_tokens=False)["input_ids"]), budget)
        for i, budget in enumerate(budgets)
    ]


def plain_forward_logprobs(policy, prompt_ids, new_ids, temperature) -> torch.Tensor:
    """log softmax(logits / T) at the sampled ids, from one unpadded forward over prompt + sampled ids."""
    sequence = torch.tensor([list(prompt_ids) + list(new_ids)])
    with torch.no_grad():
        logits = policy(input_ids=sequence, use_cache=False).logits[0].float()  # [L, V]
    start = len(prompt_ids) - 1  # position start + j predicts new token j
    steps = logits[start : start + len(new_ids)] / temperature  # [n, V]
    return torch.log_softmax(steps, dim=-1).gather(-1, torch.tensor(new_ids)[:, None]).squeeze(-1)


class LaggingEngine(RolloutEngine):
    """An engine with its own copy of the policy's weights, like vLLM's, sampling through transformers' `generate`:
    it lags the policy until `load_weights` (driven by `VLLMRolloutRefresh`) refreshes it. Stands in for vLLM where
    the test is about what training does with off-policy samples, not about vLLM."""

    def __init__(self) -> None:
        from trapo_lightning.rollout import HFGenerateEngine

        self.engine = HFGenerateEngine()
        self.copy: torch.nn.Module | None = None
        self.version = 0

    def bind(self, policy: torch.nn.Module, eos_token_ids: Sequence[int], pad_token_id: int) -> None:
        import copy

        self.copy = copy.deepcopy(policy).eval()
        self.engine.bind(self.copy, eos_token_ids, pad_token_id)

    def generate(self, requests: Sequence[RolloutRequest], params: SamplingParams) -> list[Generation]:
        return self.engine.generate(requests, params)

    @property
    def weights_version(self) -> int:
        return self.version

    @torch.no_grad()
    def load_weights(self, weights, version: int) -> None:
        own = dict(self.copy.named_parameters())
        for name, tensor in weights:
            own[name].copy_(tensor)
        self.version = version
