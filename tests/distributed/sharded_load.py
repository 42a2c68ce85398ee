"""Worker for tests/test_fsdp.py, run as `python -m torch.distributed.run --standalone --nproc_per_node 2 ...`.

Each rank loads the model folder `--model` straight into FSDP2 shards (`load_sharded`) and writes, into
`result_rank<r>.json` under --out: its peak RSS growth while loading (`ru_maxrss` before and after, in bytes),
the bytes of its local shards, and whether the sharded model's forward matches the plain model's (loaded after
the measurement, so its memory is not counted).
"""

from __future__ import annotations

import argparse
import json
import resource
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from transformers import AutoModelForCausalLM

from trapo_lightning.models.sharded import load_sharded


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", required=True)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    dist.init_process_group("gloo")
    torch.set_num_threads(1)
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    before = peak_rss_bytes()
    sharded = load_sharded(args.model, mesh, torch.device("cpu"))
    growth = peak_rss_bytes() - before
    local_bytes = sum(p.to_local().numel() * p.element_size() for p in sharded.parameters())
    plain = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    ids = torch.arange(3, 35)[None, :]
    with torch.no_grad():
        difference = float((sharded(input_ids=ids).logits - plain(input_ids=ids).logits).abs().max())
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    result = {"peak_rss_growth": growth, "local_bytes": local_bytes, "logits_max_diff": difference,
              "model_bytes": sum(p.numel() * p.element_size() for p in plain.parameters())}
    (out / f"result_rank{dist.get_rank()}.json").write_text(json.dumps(result))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
