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
from trapo_lightning.logprobs import (
    DEFAULT_CHUNK_TOKENS,
    hidden_logprobs_and_entropy,
    token_logprobs_and_entropy,
)

Scores = tuple[torch.Tensor, torch.Tensor]  # ([N, T] log-probs, [N, T] entropies), float32


class ScoringHead(torch.nn.Module):
    """Stands in for a causal LM's output layer during one forward: maps hidden states `[N, L, H]` to `[N, T, 2]`,
    the log-prob of `targets` `[N, T]` and the entropy at each of `positions` `[N, T]` (default: position j predicts
    target j, T <= L)."""

    def __init__(
        self, head: torch.nn.Module, targets: torch.Tensor, temperature: float, chunk_tokens: int,
        positions: torch.Tensor | None = None,
    ) -> None:
        super().__init__()
        # Not a submodule: the model's parameter names, and FSDP2's view of who owns the weight, stay the head's.
        object.__setattr__(self, "head", head)
        self.targets, self.temperature, self.chunk_tokens, self.positions = targets, temperature, chunk_tokens, positions

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        if self.positions is None:
            hidden = hidden[:, : self.targets.shape[1]]  # [N, T, H]
        else:
            hidden = hidden.gather(1, self.positions[..., None].expand(-1, -1, hidden.shape[-1]))  # [N, T, H]
        logprobs, entropy = hidden_logprobs_and_entropy(
            hidden, self.head.weight, self.targets, bias=self.head.bias, temperature=self.temperature,
            chunk_size=self.chunk_tokens,
        )
        return torch.stack([logprobs, entropy], dim=-1)  # [N, T, 2]


@contextlib.contextmanager
def scoring_head(
    model: torch.nn.Module, targets: torch.Tensor, temperature: float, chunk_tokens: int,
    positions: torch.Tensor | None = None,
) -> Iterator[None]:
    """Inside the block, `model(...).logits` is `[N, T, 2]` scores of `targets` instead of logits."""
    head = model.get_output_embeddings()
    if not isinstance(head, torch.nn.Linear):
        raise TypeError(f"the chunked LM head needs a Linear output layer, {type(model).__name__} has {type(head)}")
    if getattr(model.config, "final_logit_softcapping", None):
        raise TypeError(f"{type(model).__name__} soft-caps its logits after the head, which the chunked head skips")
    model.set_output_embeddings(ScoringHead(head, targets, temperature, chunk_tokens, positions))
    try:
        yield
    finally:
        model.set_output_embeddings(head)


def plain_logprobs(
    model: torch.nn.Module, batch: TrainBatch, temperature: float = 1.0, chunk_tokens: int = DEFAULT_CHUNK_TOKENS
) -> Scores:
    """Scores of every response token from one forward over the whole rows, prompt included."""
    with scoring_head(model, batch.targets, temperature, chunk_tokens, batch.predicting_positions()):
        out = model(
            input_ids=batch.input_ids, attention_mask=batch.attention_mask, position_ids=batch.position_ids,
            logits_to_keep=0, use_cache=False,  # 0: every position's hidden state goes to the head, which picks
        )
    return out.logits[..., 0], out.logits[..., 1]


def shared_prompt_logprobs(
    model: torch.nn.Module, batch: TrainBatch, temperature: float = 1.0, chunk_tokens: int = DEFAULT_CHUNK_TOKENS
) -> Scores:
    """Same as `plain_logprobs`, with each distinct prompt of the batch run once.

    The distinct prompts are taken out of the rows and left-padded to a common width Wp, so the prompt forward's
    last logits (`[U, 1, V]`, one position per distinct prompt) score response token 0; the responses (the batch's
    right-padded targets) run on the prompts' KV cache, and their first T - 1 positions score tokens 1..T-1.
    """
    prompts, row_to_prompt = torch.unique(batch.prompt_index, return_inverse=True)  # [U], [N]
    first_row = torch.empty_like(prompts).scatter_(  # [U] one row holding each prompt
        0, row_to_prompt, torch.arange(len(row_to_prompt), device=row_to_prompt.device)
    )
    prompt_ids, prompt_mask = _left_padded_prompts(batch, first_row)  # [U, Wp]
    prompt_out = model(
        input_ids=prompt_ids, attention_mask=prompt_mask,
        position_ids=(prompt_mask.cumsum(dim=1) - 1).clamp(min=0), logits_to_keep=1, use_cache=True,
    )
    cache = prompt_out.past_key_values
    cache.batch_select_indices(row_to_prompt)  # [U, ...] -> [N, ...], differentiable indexing
    first = token_logprobs_and_entropy(
        prompt_out.logits[row_to_prompt], batch.targets[:, :1], temperature=temperature
    )  # ([N, 1], [N, 1])
    response_mask = batch.response_mask.long()  # [N, T]
    positions = batch.prompt_lengths[:, None] + torch.arange(batch.response_width, device=response_mask.device)
    with scoring_head(model, batch.targets[:, 1:], temperature, chunk_tokens):
        rest = model(
            input_ids=batch.targets, attention_mask=torch.cat([prompt_mask[row_to_prompt], response_mask], dim=1),
            position_ids=positions, past_key_values=cache, use_cache=True,
        ).logits  # [N, T - 1, 2]
    return torch.cat([first[0], rest[..., 0]], dim=1), torch.cat([first[1], rest[..., 1]], dim=1)


def _left_padded_prompts(batch: TrainBatch, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`[U, Wp]` ids and mask of the prompts of `rows` (`[U]`), left-padded so that every prompt ends in the last
    column."""
    lengths = batch.prompt_lengths[rows]  # [U]
    width = int(lengths.max())
    column = torch.arange(width, device=lengths.device)[None, :]  # [1, Wp]
    offset = column - (width - lengths[:, None])  # [U, Wp]: index into the row, negative over the padding
    mask = (offset >= 0).long()
    ids = batch.input_ids[rows[:, None], offset.clamp(min=0)]
    return torch.where(mask.bool(), ids, batch.input_ids.new_zeros(())), mask


def response_logprobs(
    model: torch.nn.Module,
    batch: TrainBatch,
    temperature: float = 1.0,
    chunk_tokens: int = DEFAULT_CHUNK_TOKENS,
    share_prompts: bool = True,
) -> Scores:
    """`[N, T]` log-probs and entropies of the response tokens at `temperature`; shares prompt forwards when rows
    repeat a prompt and `share_prompts` is on."""
    if share_prompts and len(torch.unique(batch.prompt_index)) < batch.input_ids.shape[0]:
        return shared_prompt_logprobs(model, batch, temperature, chunk_tokens)
    return plain_logprobs(model, batch, temperature, chunk_tokens)
