"""The training forward: log-probs and entropies of every response token of a `TrainBatch`, through a chunked LM
head, so no `[N, T, V]` logits tensor ever exists (trapo_lightning/logprobs.py).

The model runs as a whole (its own `forward`, so FSDP2's hooks gather, free and reduce its parameters as usual),
but for the duration of the call its output layer is replaced by `ScoringHead`, which turns the last hidden states
into `[N, T, 2]` (log p(target), entropy) a chunk of tokens at a time instead of `[N, T, V]` logits. The head's
weight is read from the original output layer at call time, so under FSDP2 it is the gathered weight, and the
result is the root module's output, which is where FSDP2 hooks its backward.

All G samples of a prompt share the prompt, so its keys and values are the same in every row of the group. The
plain forward recomputes them G times; `shared_prompt_logprobs` runs each distinct prompt once, hands its KV cache
to the group's rows (an index, so the gradient of every row flows back into the one prompt forward), and runs only
the responses on top. The log-probs are the plain forward's (a test holds them equal); the saving is the prompt's
share of the work times (G - 1) / G: on the embedded default, a 44-token prompt under ~20-token responses, the
forward and backward see 2.4x fewer tokens. On a 7B run with 8k-token responses it is a few percent. It needs the KV
cache, which activation checkpointing cannot replay, so the two do not combine.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

from trapo_lightning.batch import TrainBatch
from trapo_lightning.logprobs import hidden_logprobs_and_entropy, token_logprobs_and_entropy

Scores = tuple[torch.Tensor, torch.Tensor]  # ([N, T] log-probs, [N, T] entropies), float32


class ScoringHead(torch.nn.Module):
    """Stands in for a causal LM's output layer during one forward: maps hidden states `[N, L, H]` to `[N, T, 2]`,
    the log-prob of `targets` `[N, T]` (T <= L; position j predicts target j) and the entropy at each position."""

    def __init__(self, head: torch.nn.Module, targets: torch.Tensor, temperature: float, chunk_tokens: int) -> None:
        super().__init__()
        # Not a submodule: the model's parameter names, and FSDP2's view of who owns the weight, stay the head's.
        object.__setattr__(self, "head", head)
        self.targets, self.temperature, self.chunk_tokens = targets, temperature, chunk_tokens

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        length = self.targets.shape[1]
        logprobs, entropy = hidden_logprobs_and_entropy(
            hidden[:, :length], self.head.weight, self.targets, bias=self.head.bias, temperature=self.temperature,
            chunk_size=self.chunk_tokens,
        )
        return torch.stack([logprobs, entropy], dim=-1)  # [N, T, 2]


@contextlib.contextmanager
def scoring_head(model: torch.nn.Module, targets: torch.Tensor, temperature: float, chunk_tokens: int) -> Iterator[None]:
    """Inside the block, `model(...).logits` is `[N, T, 2]` scores of `targets` instead of logits."""
    head = model.get_output_embeddings()
    if not isinstance(head, torch.nn.Linear):
        raise TypeError(f"the chunked LM head needs a Linear output layer, {type(model).__name__} has {type(head)}")
    if getattr(model.config, "final_logit_softcapping", None):
        raise TypeError(f"{type(model).__name__} soft-caps its logits after the head, which the chunked head skips")
    model.set_output_embeddings(ScoringHead(head, targets, temperature, chunk_tokens))
    try:
        yield
    finally:
        model.set_output_embeddings(head)


def plain_logprobs(model: torch.nn.Module, batch: TrainBatch, temperature: float = 1.0, chunk_tokens: int = 1024) -> Scores:
    """Scores of every response token from one forward over the whole rows, prompt included."""
    width = batch.response_width
    with scoring_head(model, batch.targets, temperature, chunk_tokens):
        out = model(
            input_ids=batch.input_ids, attention_mask=batch.attention_mask, position_ids=batch.position_ids,
            logits_to_keep=width + 1, use_cache=False,
        )
    return out.logits[..., 0], out.logits[..., 1]  # position j of the last T + 1 predicts response token j


def shared_prompt_logprobs(
    model: torch.nn.Module, batch: TrainBatch, temperature: float = 1.0, chunk_tokens: int = 1024
) -> Scores:
    """Same as `plain_logprobs`, with each distinct prompt of the batch run once.

    Prompts are left-padded to a common width Wp, so a row's prompt is `input_ids[:, :Wp]` and its response the
    rest. The prompt forward's last logits (`[U, 1, V]`, one position per distinct prompt) score response token 0;
    the response forward's first T - 1 positions score tokens 1..T-1.
    """
    prompt_width = batch.prompt_width
    prompts, row_to_prompt = torch.unique(batch.prompt_index, return_inverse=True)  # [U], [N]
    first_row = torch.empty_like(prompts).scatter_(  # [U] one row holding each prompt
        0, row_to_prompt, torch.arange(len(row_to_prompt), device=row_to_prompt.device)
    )
    prompt_out = model(
        input_ids=batch.input_ids[first_row, :prompt_width],
        attention_mask=batch.attention_mask[first_row, :prompt_width],
        position_ids=batch.position_ids[first_row, :prompt_width],
        logits_to_keep=1, use_cache=True,
    )
    cache = prompt_out.past_key_values
    cache.batch_select_indices(row_to_prompt)  # [U, ...] -> [N, ...], differentiable indexing
    first = token_logprobs_and_entropy(
        prompt_out.logits[row_to_prompt], batch.targets[:, :1], temperature=temperature
    )  # ([N, 1], [N, 1])
    with scoring_head(model, batch.targets[:, 1:], temperature, chunk_tokens):
        rest = model(
            input_ids=batch.input_ids[:, prompt_width:], attention_mask=batch.attention_mask,
            position_ids=batch.position_ids[:, prompt_width:], past_key_values=cache, use_cache=True,
        ).logits  # [N, T - 1, 2]
    return torch.cat([first[0], rest[..., 0]], dim=1), torch.cat([first[1], rest[..., 1]], dim=1)


def response_logprobs(
    model: torch.nn.Module,
    batch: TrainBatch,
    temperature: float = 1.0,
    chunk_tokens: int = 1024,
    share_prompts: bool = True,
) -> Scores:
    """`[N, T]` log-probs and entropies of the response tokens at `temperature`; shares prompt forwards when rows
    repeat a prompt and `share_prompts` is on."""
    if share_prompts and len(torch.unique(batch.prompt_index)) < batch.input_ids.shape[0]:
        return shared_prompt_logprobs(model, batch, temperature, chunk_tokens)
    return plain_logprobs(model, batch, temperature, chunk_tokens)
