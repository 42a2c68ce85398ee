"""Load a Hugging Face folder straight into FSDP2 shards, so that no rank ever holds the whole model (issue 11).

The plain way, `from_pretrained` on every rank and then `fully_shard`, puts the whole model in float32 host memory
on every rank first: for a 7B policy and its reference, about 60 GB per rank, 480 GB on an 8-GPU node. Here:
1. the model is built with its parameters on the meta device (no memory) and its buffers computed as usual
   (rotary tables are not in the checkpoint, so they must be built, not loaded);
2. `fully_shard` splits the meta parameters, and `to_empty` allocates only this rank's shards on its device;
3. each rank reads from the safetensors files exactly the rows of its shards (FSDP2 shards dimension 0), one
   tensor at a time, with the file opened per tensor so that the mapped pages of what was read are released.
A rank's peak host memory is then its shards plus one tensor's slice, whatever the world size.

Only parameters are read; they must be in the folder under the names the module uses (`save_pretrained`'s layout,
as every Qwen2 / Llama / Mistral checkpoint has). A tied LM head is the embedding's parameter and is read once.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import safe_open
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import MixedPrecisionPolicy
from torch.distributed.tensor import DTensor
from torch.distributed.tensor._utils import compute_local_shape_and_global_offset
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedModel

from trapo_lightning.sharding import shard_decoder
from trapo_lightning.weights import checkpoint_name

_SINGLE_FILE = "model.safetensors"
_INDEX_FILE = "model.safetensors.index.json"


@contextlib.contextmanager
def parameters_on_meta() -> Iterator[None]:
    """Modules built inside the block get their parameters on the meta device; buffers stay real.

    Each parameter is allocated where its module asks and moved to meta as soon as it is registered, so at most one
    parameter is ever materialised during construction.
    """
    register = torch.nn.Module.register_parameter

    def register_on_meta(module: torch.nn.Module, name: str, param: torch.nn.Parameter | None) -> None:
        register(module, name, param)
        if param is not None and param.device.type != "meta":
            module._parameters[name] = torch.nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)

    torch.nn.Module.register_parameter = register_on_meta
    try:
        yield
    finally:
        torch.nn.Module.register_parameter = register


def weight_files(folder: Path) -> dict[str, Path]:
    """Checkpoint tensor name -> the safetensors file holding it (one file, or a sharded index)."""
    index = folder / _INDEX_FILE
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        return {name: folder / file for name, file in weight_map.items()}
    single = folder / _SINGLE_FILE
    if not single.is_file():
        raise FileNotFoundError(
            f"{folder} has neither {_SINGLE_FILE} nor {_INDEX_FILE}: sharded loading reads safetensors weights; "
            "re-save the model with save_pretrained(safe_serialization=True)"
        )
    with safe_open(single, framework="pt") as handle:
        return {name: single for name in handle.keys()}


def load_sharded(
    folder: str | Path,
    mesh: DeviceMesh,
    device: torch.device,
    mp_policy: MixedPrecisionPolicy | None = None,
    dtype: torch.dtype = torch.float32,
) -> PreTrainedModel:
    """The causal LM of `folder`, sharded with `shard_decoder` over `mesh`, holding only this rank's shards.

    Args:
        folder: A Hugging Face model folder with safetensors weights.
        mesh: The device mesh to shard over (see `sharding.shard_decoder`).
        device: Where this rank's shards live.
        mp_policy: FSDP2 mixed-precision policy.
        dtype: Dtype of the sharded (master) parameters.
    """
    folder = Path(folder)
    config = AutoConfig.from_pretrained(folder)
    with parameters_on_meta():
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    buffers = {name: buffer.clone() for name, buffer in model.named_buffers()}
    shard_decoder(model, mesh, mp_policy)
    model.to_empty(device=device)
    with torch.no_grad():
        for name, value in buffers.items():
            model.get_buffer(name).copy_(value)
        read_local_shards(model, weight_files(folder))
    model.name_or_path = model.config._name_or_path = str(folder)  # as from_pretrained records it (vLLM reads it)
    return model


@torch.no_grad()
def read_local_shards(model: torch.nn.Module, files: dict[str, Path]) -> None:
    """Fill every parameter's local shard (or the whole tensor, if not a DTensor) from `files`."""
    for name, param in model.named_parameters():
        key = checkpoint_name(name)
        if key not in files:
            raise KeyError(
                f"parameter {key} of {type(model).__name__} is not in the checkpoint's safetensors files; the folder's "
                "weights do not match its config.json"
            )
        if isinstance(param, DTensor):
            local = param.to_local()
            shape, offset = compute_local_shape_and_global_offset(param.shape, param.device_mesh, param.placements)
            rows = slice(offset[0], offset[0] + shape[0]) if local.numel() else slice(0, 0)
        else:
            local, rows = param, slice(None)
        with safe_open(files[key], framework="pt") as handle:
            stored = handle.get_slice(key)
            if list(stored.get_shape()) != list(param.shape):
                raise ValueError(f"{key}: the checkpoint holds shape {stored.get_shape()}, the model {list(param.shape)}")
            local.copy_(stored[rows])
