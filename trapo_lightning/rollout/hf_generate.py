"""Rollouts through transformers' `generate` on the training policy itself (KV cache, batched, left padded).

The CPU default and the fallback everywhere: it samples from the very module being trained, so it never needs a
weight refresh. Requests of one sampling round for all prompts of the step go out in as few `generate` calls as the
batch cap allows; the longest budget in a call bounds it, and each row is then cut to its own budget.

Rows of one prompt's micro-group repeat the same tokens, so the engine prefills each distinct row once and hands
the KV cache to its copies (`share_prefill`); `generate` then starts from the cache. On the embedded default the
prompt is two thirds of a row's tokens and four rollouts share it.

The sampler's log-probs are taken step by step (`SampledLogprobs`): each decoding step keeps one `[N, V]`
log-softmax until the next step reveals which token was drawn, then keeps that token's log-prob alone. Asking
`generate` for its logits instead would keep every step's `[N, V]` row: at the paper's shape (1024 rows, 8k new
tokens, Qwen's 151,936-entry vocabulary) about 2.5 TB in float32.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from dataclasses import replace

import torch
from transformers import (
    GenerationConfig,
    LogitsProcessor,
    LogitsProcessorList,
    TemperatureLogitsWarper,
    TopPLogitsWarper,
)

from trapo_lightning.seeding import derive_seed
from trapo_lightning.rollout.base import Generation, RolloutEngine, RolloutRequest, SamplingParams, as_eos_ids


class HFGenerateEngine(RolloutEngine):
    """Sampling with `model.generate` on the policy being trained."""

    def __init__(self, max_batch_size: int = 256, share_prefill: bool = True) -> None:
        """
        Args:
            max_batch_size: Most sequences per `generate` call; larger request lists are split.
            share_prefill: Prefill each distinct request once and copy its KV cache to the requests that repeat it.
        """
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size must be >= 1, got {max_batch_size}")
        self.max_batch_size = max_batch_size
        self.share_prefill = share_prefill
        self._policy: torch.nn.Module | None = None
        self._eos: tuple[int, ...] = ()
        self._pad = -1

    def bind(self, policy: torch.nn.Module, eos_token_ids: Sequence[int], pad_token_id: int) -> None:
        self._policy, self._eos, self._pad = policy, as_eos_ids(eos_token_ids), pad_token_id

    def generate(self, requests: Sequence[RolloutRequest], params: SamplingParams) -> list[Generation]:
        if self._policy is None:
            raise RuntimeError("HFGenerateEngine.generate called before bind(policy, ...)")
        out: list[Generation] = []
        for start in range(0, len(requests), self.max_batch_size):
            chunk_params = params if params.seed is None else replace(params, seed=derive_seed(params.seed, start))
            out += self._generate_chunk(requests[start : start + self.max_batch_size], chunk_params)
        return out

    @torch.no_grad()
    def _generate_chunk(self, requests: Sequence[RolloutRequest], params: SamplingParams) -> list[Generation]:
        policy = self._policy
        budget = max(r.max_new_tokens for r in requests)
        if budget <= 0:
            return [Generation([], [], False) for _ in requests]
        input_ids, attention_mask = _left_pad([r.token_ids for r in requests], self._pad, _device_of(policy))
        config = GenerationConfig(
            do_sample=True,
            temperature=1.0,  # applied by our own processors below, so the log-probs are read between the warpers
            top_p=1.0,
            top_k=0,
            max_new_tokens=budget,
            eos_token_id=list(self._eos),
            pad_token_id=self._pad,
        )
        logprobs = SampledLogprobs(input_ids.shape[1], budget)
        was_training = policy.training
        policy.eval()
        try:
            cache = _shared_prefill(policy, requests, input_ids, attention_mask) if self.share_prefill else None
            with _seeded(params.seed, input_ids.device):
                sequences = policy.generate(
                    input_ids=input_ids, attention_mask=attention_mask, past_key_values=cache,
                    generation_config=config, logits_processor=_sampler(params, logprobs),
                )
        finally:
            policy.train(was_training)
        new_ids = sequences[:, input_ids.shape[1] :]  # [N, budget']
        step_logprobs = logprobs.finish(new_ids)  # [N, budget']
        return [
            _trim(ids, lps, request.max_new_tokens, self._eos)
            for ids, lps, request in zip(new_ids.tolist(), step_logprobs.tolist(), requests)
        ]


class SampledLogprobs(LogitsProcessor):
    """Records log softmax(logits / T) of each sampled token, one decoding step late, in O(N x T) memory.

    A logits processor sees step k's scores before its token is drawn, and sees that token (the last column of
    `input_ids`) only at step k + 1; so it keeps step k's `[N, V]` log-softmax until then and gathers the drawn
    token's entry. `finish` gathers the last step's from the returned sequences.

    Args:
        prompt_width: Columns of the (left-padded) input; new token k sits at column prompt_width + k.
        budget: Most new tokens the call can produce.
    """

    def __init__(self, prompt_width: int, budget: int) -> None:
        self.prompt_width = prompt_width
        self.budget = budget
        self.values: torch.Tensor | None = None  # [N, budget]
        self._pending: torch.Tensor | None = None  # [N, V] log-softmax of the step whose token is not drawn yet
        self._pending_step = -1

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        step = input_ids.shape[1] - self.prompt_width  # the new token these scores are about to draw
        if self.values is None:
            self.values = torch.zeros(scores.shape[0], self.budget, dtype=torch.float32, device=scores.device)
        if self._pending is not None:
            self._keep(input_ids[:, self.prompt_width + self._pending_step])
        self._pending = torch.log_softmax(scores.float(), dim=-1)  # [N, V]
        self._pending_step = step
        return scores

    def finish(self, new_ids: torch.LongTensor) -> torch.Tensor:
        """`[N, n]` log-probs of the `n` returned new tokens (`new_ids`: `[N, n]`)."""
        steps = new_ids.shape[1]
        if self._pending is not None and self._pending_step < steps:
            self._keep(new_ids[:, self._pending_step])
        self._pending = None
        if self.values is None:
            return torch.zeros(new_ids.shape, dtype=torch.float32)
        return self.values[:, :steps]

    def _keep(self, drawn: torch.LongTensor) -> None:
        self.values[:, self._pending_step] = self._pending.gather(-1, drawn[:, None]).squeeze(-1)


def _sampler(params: SamplingParams, logprobs: SampledLogprobs) -> LogitsProcessorList:
    """The warpers `generate` would build for (temperature, top_p), with the log-prob recorder between them: the
    recorded log-prob is log softmax(logits / T), before top-p's cut, as the trainer recomputes it. Passed as
    custom processors, they run in this order after any processor `generate` builds itself."""
    processors: list[LogitsProcessor] = []
    if params.temperature != 1.0:
        processors.append(TemperatureLogitsWarper(params.temperature))
    processors.append(logprobs)
    if params.top_p < 1.0:
        processors.append(TopPLogitsWarper(top_p=params.top_p))
    return LogitsProcessorList(processors)


def _shared_prefill(policy, requests: Sequence[RolloutRequest], input_ids: torch.Tensor, attention_mask: torch.Tensor):
    """KV cache of every row but its last token, computed once per distinct request; None when no request repeats.

    The last token stays out of the cache so `generate` has a position to produce the first new token's logits.
    Positions count real tokens, as `generate` counts them for a left-padded row.
    """
    rows = [tuple(r.token_ids) for r in requests]
    first_index: dict[tuple[int, ...], int] = {}  # distinct row -> where it first occurs, in order of occurrence
    for i, row in enumerate(rows):
        first_index.setdefault(row, i)
    if len(first_index) == len(rows) or input_ids.shape[1] < 2:
        return None
    slot = {row: k for k, row in enumerate(first_index)}
    first = torch.tensor(list(first_index.values()), device=input_ids.device)  # [U]
    copies = torch.tensor([slot[row] for row in rows], device=input_ids.device)  # [N]
    mask = attention_mask[first, :-1]  # [U, W - 1]
    positions = (mask.cumsum(dim=-1) - 1).masked_fill(mask == 0, 1)
    out = policy.base_model(input_ids=input_ids[first, :-1], attention_mask=mask, position_ids=positions, use_cache=True)
    cache = out.past_key_values
    cache.batch_select_indices(copies)
    return cache


@contextlib.contextmanager
def _seeded(seed: int | None, device: torch.device):
    """Sample from `seed` without touching the global RNG streams (generate takes no generator)."""
    if seed is None:
        yield
        return
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices, device_type="cuda"):
        torch.manual_seed(seed)
        yield


def _left_pad(rows: Sequence[Sequence[int]], pad_id: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, width - len(row) :] = torch.tensor(row, dtype=torch.long)
        mask[i, width - len(row) :] = 1
    return ids.to(device), mask.to(device)


def _trim(ids: list[int], logprobs: list[float], budget: int, eos_ids: Sequence[int]) -> Generation:
    """Cut a row at the first of any EOS id (kept) or at its own budget."""
    ids, logprobs = ids[:budget], logprobs[:budget]
    end = next((k + 1 for k, token in enumerate(ids) if token in eos_ids), None)
    if end is not None:
        return Generation(ids[:end], logprobs[:end], True)
    return Generation(ids, logprobs, False)


def _device_of(module: torch.nn.Module) -> torch.device:
    return next(module.parameters()).device
