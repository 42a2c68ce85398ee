"""FSDP2 for TRAPO's two models under Lightning's `ModelParallelStrategy` (issue 3).

The policy (trained) and the reference (frozen, used only for the optional KL term) are sharded the same way:
`fully_shard` on every decoder layer, then on the root (embeddings, final norm, LM head). One layer group is
all-gathered just before its forward and freed after it, so a rank holds its shard of the whole model plus one
gathered layer, not the whole model. Every group reshards after forward, the root included: FSDP2's default keeps
the root gathered until backward, and the reference never runs backward.

The mesh is Lightning's 2-D `(data_parallel, tensor_parallel)` mesh, passed to `fully_shard` as is. TRAPO uses no
tensor parallelism, so FSDP2 reads it as HSDP: parameters are sharded across the second dimension and replicated
across the first. Lightning's default sizes (data_parallel = nodes, tensor_parallel = devices per node) therefore
shard within each node and replicate across nodes; `data_parallel_size: 1, tensor_parallel_size: <world size>`
shards across all ranks. Every rank is a data-parallel rank for the data stream either way.

Mixed precision follows the Trainer's `precision` through FSDP2's `MixedPrecisionPolicy`: with `bf16-mixed` the
sharded (master) weights, gradients and Adam states stay float32, while the gathered weights and the compute are
bfloat16 and gradients are reduced in float32 (the layout of the paper's verl runs).

Rollouts on the sharded policy (`GatheredRollout`): transformers' `generate` runs one forward per new token, and on a
sharded model each forward would all-gather every layer, so all ranks would have to call `generate` equally often
and decode equally long. They do not: a rank whose prompts are all fully guided in a micro-group (prefix ratio 1.0)
generates nothing, and the number of `generate` calls follows each rank's request count. So the whole policy is
gathered once when the module wakes the engine (every rank, every step and validation batch) and resharded when it
puts it to sleep; in between, generation makes no collective calls at all, and KV-cache decoding runs as on a single
device. The price is one full copy of the policy per device while sampling (in the compute dtype: 15 GB for a 7B
model in bfloat16), as an engine with its own weight copy (vLLM) also holds.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator, Sequence

import torch
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard

from trapo_lightning.rollout.base import Generation, RolloutEngine, RolloutRequest, SamplingParams

_HALF_TRUE = {"bf16-true": torch.bfloat16, "16-true": torch.float16}


def mixed_precision_policy(precision: str) -> MixedPrecisionPolicy:
    """The FSDP2 mixed-precision policy matching a Lightning `precision` setting.

    Args:
        precision: The Trainer's precision string. `bf16-mixed`: gather and compute in bfloat16 over float32
            sharded weights, reduce gradients in float32. `bf16-true` / `16-true`: Lightning casts the
            policy itself; the policy here makes the reference (which Lightning does not cast, see
            `TrapoModule.configure_model`) compute in the same dtype. Anything else (`32-true`; ModelParallelStrategy
            accepts no other): no casting.
    """
    if precision == "bf16-mixed":
        return MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    if precision in _HALF_TRUE:
        return MixedPrecisionPolicy(param_dtype=_HALF_TRUE[precision])
    return MixedPrecisionPolicy()


def decoder_layers(model: torch.nn.Module) -> Sequence[torch.nn.Module]:
    """The decoder layers of a Hugging Face causal LM (`model.model.layers`: Qwen2, Llama, Mistral, ...).

    Args:
        model: A `*ForCausalLM` model.
    """
    layers = getattr(getattr(model, "model", None), "layers", None)
    if not isinstance(layers, torch.nn.ModuleList) or len(layers) == 0:
        raise TypeError(
            f"cannot shard {type(model).__name__}: FSDP2 sharding here expects a Hugging Face causal LM with its "
            "decoder layers at `model.model.layers` (Qwen2, Llama, Mistral, ...); use a model of that layout or "
            "train on one device"
        )
    return layers


def shard_decoder(
    model: torch.nn.Module, mesh: DeviceMesh, mp_policy: MixedPrecisionPolicy | None = None
) -> torch.nn.Module:
    """Apply FSDP2 to `model` in place: each decoder layer, then the root. Returns `model`.

    Args:
        model: A Hugging Face causal LM with plain (unsharded) parameters.
        mesh: Device mesh to shard over; 1-D shards across it, 2-D is HSDP (replicate dim 0, shard dim 1).
        mp_policy: Mixed-precision policy of every group (default: none).
    """
    mp_policy = mp_policy or MixedPrecisionPolicy()
    for layer in decoder_layers(model):
        fully_shard(layer, mesh=mesh, mp_policy=mp_policy, reshard_after_forward=True)
    fully_shard(model, mesh=mesh, mp_policy=mp_policy, reshard_after_forward=True)
    return model


def fsdp_groups(model: torch.nn.Module) -> list[FSDPModule]:
    """Every FSDP2-managed module of `model`, in module order (the same on every rank).

    Args:
        model: A model sharded by `shard_decoder`.
    """
    return [module for module in model.modules() if isinstance(module, FSDPModule)]


@contextlib.contextmanager
def gathered_for_generation(model: torch.nn.Module) -> Iterator[None]:
    """Hold all of `model`'s parameters gathered, and its `generate` collective-free, inside the block.

    Entering all-gathers every group (a collective: every rank must enter, in the same order). Inside, forwards
    keep the gathered weights, and `generate` runs with `synced_gpus=False` (transformers turns it on for FSDP
    modules, adding an all-reduce per decoded token), so ranks may call it any number of times with any lengths.
    Leaving frees the gathered weights; it is local and needs no other rank.

    Args:
        model: A model sharded by `shard_decoder`, used without gradients inside the block.
    """
    groups = fsdp_groups(model)
    with torch.no_grad():
        for group in groups:
            group.unshard()
    for group in groups:
        group.set_reshard_after_forward(False, recurse=False)
    model.generate = functools.partial(model.generate, synced_gpus=False)
    try:
        yield
    finally:
        del model.generate  # the instance attribute; the class's generate is back
        for group in groups:
            group.set_reshard_after_forward(True, recurse=False)
            group.reshard()


class GatheredRollout(RolloutEngine):
    """Wraps an engine that samples the live policy so that it can sample a sharded one (see the module docstring).

    `wake` gathers the policy, `sleep` reshards it; the module calls both on every rank around every rollout.
    """

    def __init__(self, engine: RolloutEngine) -> None:
        """
        Args:
            engine: An engine that samples the training module itself (`weights_version` None), e.g.
                `HFGenerateEngine`.
        """
        if engine.weights_version is not None:
            raise ValueError(
                f"{type(engine).__name__} holds its own weight copy; it needs full weights streamed to it, "
                "not a gathered policy: use it without GatheredRollout"
            )
        self.engine = engine
        self._policy: torch.nn.Module | None = None
        self._gathered: contextlib.ExitStack | None = None

    def bind(self, policy: torch.nn.Module, eos_token_ids: Sequence[int], pad_token_id: int) -> None:
        self._policy = policy
        self.engine.bind(policy, eos_token_ids, pad_token_id)

    def wake(self) -> None:
        if self._policy is None:
            raise RuntimeError("GatheredRollout.wake called before bind(policy, ...)")
        if self._gathered is None:
            stack = contextlib.ExitStack()
            stack.enter_context(gathered_for_generation(self._policy))
            self._gathered = stack
        self.engine.wake()

    def sleep(self) -> None:
        self.engine.sleep()
        if self._gathered is not None:
            self._gathered.close()
            self._gathered = None

    def generate(self, requests: Sequence[RolloutRequest], params: SamplingParams) -> list[Generation]:
        if self._gathered is None:
            raise RuntimeError(
                "generate on a sharded policy outside wake()/sleep(): call wake() on every rank first, so the "
                "policy is gathered and generation needs no collective calls"
            )
        return self.engine.generate(requests, params)
