"""Tensor-parallel rollout groups for the colocated vLLM engine (the paper's runs sample with vLLM at TP = 2).

Under vLLM's external_launcher executor every training rank runs its own engine, and with tensor parallel size
`tp` the engines of `tp` consecutive ranks (vLLM groups ranks that way) each hold one shard of the weights and must
run the very same `generate`, in lockstep: same requests, same order, same seeds. Each rank has its own requests,
so a call first gathers the group's requests (`all_gather_object` within the group), every rank of the group
samples all of them, and each rank keeps its own slice, as verl and TRL do with colocated vLLM.

Ranks do not call `generate` equally often (the number of sampling rounds follows each rank's rewards), so a rank
that has finished its rollouts keeps answering the others' calls until every rank of its group has finished:
`LockstepGroup.exchange(None)` says "done", and a round in which every rank says so ends the rollout for all.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch


def tensor_parallel_groups(world_size: int, size: int) -> list[list[int]]:
    """The ranks of each tensor-parallel group: `size` consecutive ranks, as vLLM lays them out.

    Args:
        world_size: Ranks of the training process group.
        size: Tensor parallel size; must divide `world_size`.
    """
    if size < 1:
        raise ValueError(f"tensor_parallel_size must be >= 1, got {size}")
    if world_size % size:
        raise ValueError(
            f"tensor_parallel_size {size} does not divide the world size {world_size}: every rank must belong to "
            "one vLLM tensor-parallel group. Set model.rollout.init_args.tensor_parallel_size to a divisor of "
            "trainer.devices x trainer.num_nodes."
        )
    return [list(range(start, start + size)) for start in range(0, world_size, size)]


def merge_requests(per_rank: Sequence[Sequence[Any] | None]) -> tuple[list[Any], list[slice]]:
    """The group's requests in rank order, and where each rank's own lie in that list.

    Args:
        per_rank: Each rank's requests, or None for a rank that has finished (it contributes none).
    """
    merged: list[Any] = []
    slices = []
    for items in per_rank:
        start = len(merged)
        merged += list(items or ())
        slices.append(slice(start, len(merged)))
    return merged, slices


class LockstepGroup:
    """This rank's tensor-parallel group, exchanging rollout requests so the group's engines run in lockstep.

    Building it creates the process subgroups: a collective over the whole training process group.
    """

    def __init__(self, size: int) -> None:
        """
        Args:
            size: Tensor parallel size; must divide the world size of the initialised process group.
        """
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()):
            raise RuntimeError(
                f"tensor_parallel_size {size} needs the training process group (vLLM's external_launcher executor "
                "shares it); run under a multi-device strategy, or use tensor_parallel_size 1"
            )
        groups = tensor_parallel_groups(dist.get_world_size(), size)
        self.group, _ = dist.new_subgroups_by_enumeration(groups)
        self.size = size
        self.rank_in_group = dist.get_rank() % size

    def exchange(self, items: Sequence[Any] | None) -> tuple[list[Any], slice] | None:
        """Every rank's `items` merged in rank order and this rank's slice of them; None once every rank of the
        group passed None (finished). A collective within the group: each rank calls it equally often.

        Args:
            items: This rank's requests (picklable), or None when it has none left to make this rollout.
        """
        gathered: list[Any] = [None] * self.size
        torch.distributed.all_gather_object(gathered, None if items is None else list(items), group=self.group)
        if all(part is None for part in gathered):
            return None
        merged, slices = merge_requests(gathered)
        return merged, slices[self.rank_in_group]
