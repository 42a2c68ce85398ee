"""Stream a policy's full tensors in size-capped buckets, for refreshing a rollout engine's weight copy (issue 3).

Under FSDP2 every parameter is a DTensor holding this rank's shard. Gathering the full state dict at once would
need the whole model's memory again on every rank; instead each parameter is gathered (`full_tensor()`, a
collective every rank runs in the same order) only when the consumer asks for the bucket it belongs to, so at
most one bucket of gathered tensors is alive at a time. Nothing goes through disk.

Only parameters are sent: they are what the optimizer changes. Buffers (e.g. rotary tables) are recomputed by the
engine from the model config. Names are the Hugging Face checkpoint names, with the wrappers that activation
checkpointing and torch.compile insert removed.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch.distributed.tensor import DTensor

_WRAPPER_PREFIXES = ("_checkpoint_wrapped_module.", "_orig_mod.", "_fsdp_wrapped_module.")


def iter_full_tensors(module: torch.nn.Module, bucket_bytes: int) -> Iterator[list[tuple[str, torch.Tensor]]]:
    """Yield buckets of (checkpoint name, full detached tensor) in `named_parameters` order (tied parameters
    once). A bucket holds at most `bucket_bytes` of tensors, or one tensor when that tensor alone is larger.
    Sizes are read from the parameters' global shapes, so a tensor is gathered only when its bucket is built."""
    if bucket_bytes < 1:
        raise ValueError(f"bucket_bytes must be >= 1, got {bucket_bytes}")
    pending: list[tuple[str, torch.Tensor]] = []
    pending_bytes = 0
    for name, param in module.named_parameters():
        nbytes = param.numel() * param.element_size()  # a DTensor reports its global size
        if pending and pending_bytes + nbytes > bucket_bytes:
            yield _gather(pending)
            pending, pending_bytes = [], 0
        pending.append((checkpoint_name(name), param))
        pending_bytes += nbytes
    if pending:
        yield _gather(pending)


def _gather(params: list[tuple[str, torch.Tensor]]) -> list[tuple[str, torch.Tensor]]:
    return [(name, full_tensor(param)) for name, param in params]


@torch.no_grad()
def full_tensor(param: torch.Tensor) -> torch.Tensor:
    """The whole tensor: gathered from the ranks' shards for a DTensor, the tensor itself otherwise (no copy)."""
    tensor = param.detach()
    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


def checkpoint_name(name: str) -> str:
    """`named_parameters` name without wrapper modules' prefixes: the name in the Hugging Face checkpoint."""
    for prefix in _WRAPPER_PREFIXES:
        name = name.replace(prefix, "")
    return name
