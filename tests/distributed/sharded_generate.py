"""Worker for tests/test_fsdp.py, run as `python -m torch.distributed.run --standalone --nproc_per_node 2 ...`.

Each rank holds a plain copy of the tiny policy and an FSDP2-sharded one (`shard_decoder`) and checks, writing
`result_rank<r>.json` into --out:
- rollouts: `GatheredRollout(HFGenerateEngine())` on the sharded policy samples exactly what `HFGenerateEngine` samples
  on the plain copy, with KV-cache decoding, although the ranks make different numbers of `generate` calls (one
  of them with no requests at all) with different budgets: a deadlock or a mismatch would show here;
- training after the rollout: the policy is resharded, and a forward/backward on it gives the plain model's loss,
  per-parameter gradients and `clip_grad_norm_` total (FSDP2 averages gradients over ranks; both ranks feed the
  same batch, so the average is the plain gradient).
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor

from trapo_lightning.models import PretrainedFolder
from trapo_lightning.rollout import HFGenerateEngine, RolloutRequest, SamplingParams
from trapo_lightning.sharding import GatheredRollout, shard_decoder

# per rank: the generate calls of one rollout phase, as lists of (prompt ids, budget); rank 1 makes an empty call
CALLS = {
    0: [[((5, 6, 7), 12), ((8, 9), 12)]],
    1: [[], [((10, 11, 12, 13), 20), ((14,), 20), ((15, 16), 7)], [((17, 18), 5)]],
}


def generations(engine, calls, seed: int) -> list[dict]:
    out = []
    for index, call in enumerate(calls):
        requests = [RolloutRequest(ids, budget) for ids, budget in call]
        for g in engine.generate(requests, SamplingParams(temperature=1.0, seed=seed + index)):
            out.append({"token_ids": g.token_ids, "logprobs": g.logprobs})
    return out


def count_decode_lengths(model: torch.nn.Module) -> list[int]:
    """Input lengths of every forward of `model.model`: 1 after the prefill means KV-cache decoding."""
    lengths: list[int] = []
    model.model.register_forward_pre_hook(lambda module, args, kwargs: lengths.append(kwargs["input_ids"].shape[1])
                                          if kwargs.get("input_ids") is not None else None, with_kwargs=True)
    return lengths


def training_step(model: torch.nn.Module, ids: torch.Tensor) -> tuple[float, dict[str, torch.Tensor], float]:
    model.zero_grad(set_to_none=True)
    loss = model(input_ids=ids, labels=ids, use_cache=False).loss
    loss.backward()
    grads = {name: p.grad.full_tensor() if isinstance(p.grad, DTensor) else p.grad.clone()
             for name, p in model.named_parameters()}
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    return float(loss.detach()), grads, float(norm.full_tensor() if isinstance(norm, DTensor) else norm)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", required=True, help="tiny policy folder, written before launch")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    source = PretrainedFolder(args.model)
    tokenizer = source.load_tokenizer()
    plain, sharded = source.load_model().train(), source.load_model().train()
    for model in (plain, sharded):
        model.config.use_cache = False  # as TrapoModule sets it: generate must turn the KV cache on by itself
    mesh = init_device_mesh("cpu", (1, dist.get_world_size()), mesh_dim_names=("data_parallel", "tensor_parallel"))
    shard_decoder(sharded, mesh)

    reference_engine, engine = HFGenerateEngine(), GatheredRollout(HFGenerateEngine())
    reference_engine.bind(plain, tokenizer.eos_token_id, tokenizer.pad_token_id)
    engine.bind(sharded, tokenizer.eos_token_id, tokenizer.pad_token_id)
    lengths = count_decode_lengths(sharded)
    engine.wake()
    got = generations(engine, CALLS[rank], seed=100 * rank)
    engine.sleep()
    decode_lengths = list(lengths)  # the training forward below adds its own
    expected = generations(reference_engine, CALLS[rank], seed=100 * rank)

    ids = torch.tensor([[5, 6, 7, 8, 9, 10, 11, 12]])
    loss, grads, norm = training_step(sharded, ids)
    plain_loss, plain_grads, plain_norm = training_step(plain, ids)
    result = {
        "same_tokens": [g["token_ids"] for g in got] == [g["token_ids"] for g in expected],
        "num_generations": len(got),
        "logprob_max_diff": max((abs(a - b) for g, e in zip(got, expected)
                                 for a, b in zip(g["logprobs"], e["logprobs"])), default=0.0),
        "decode_lengths": decode_lengths,
        "generate_calls": sum(1 for call in CALLS[rank] if call),
        "resharded": all(isinstance(p, DTensor) for p in sharded.parameters()),
        "loss_diff": abs(loss - plain_loss),
        "grad_max_diff": max(float((grads[n] - plain_grads[n]).abs().max()) for n in plain_grads),
        "grad_norm": norm,
        "plain_grad_norm": plain_norm,
    }
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / f"result_rank{rank}.json").write_text(json.dumps(result))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
