"""`trapo export`: turn a training checkpoint into a plain Hugging Face model folder (issue 3).

A checkpoint holds the trained policy under `state_dict` as `policy.<Hugging Face name>`; the frozen reference is
left out (it is the starting folder). It comes in two layouts:
- a single `.ckpt` file (one device, DDP, or `ModelParallelStrategy(save_distributed_checkpoint=False)`);
- a folder of shards written by `torch.distributed.checkpoint` (`ModelParallelStrategy`'s default, FSDP2).
Either way the policy is rebuilt from the training config's `model.policy` folder (architecture, tokenizer),
its weights are overwritten with the checkpoint's, and the result is written with `save_pretrained` next to the
tokenizer, so `from_pretrained` (transformers, vLLM, evaluation harnesses) loads it with no trace of Lightning.
A sharded folder is read in one process without a process group, whatever the world size that wrote it; only the
policy's tensors are read, never the optimizer states.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.metadata import TensorStorageMetadata
from transformers import PreTrainedModel

from trapo_lightning.models.sources import PolicySource

POLICY_PREFIX = "policy."  # the TrapoModule attribute that holds the policy
_SHARDED_PREFIX = "state_dict."  # ModelParallelStrategy nests the model state under this key in the shards
EXPORT_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def export_policy(policy: PolicySource, ckpt_path: str | Path, out: str | Path, dtype: str | None = None) -> Path:
    """Write the checkpoint's policy as a Hugging Face folder (weights, config, generation config, tokenizer).

    Args:
        policy: Where the trained policy started (the training config's `model.policy`): gives the architecture
            and the tokenizer.
        ckpt_path: A Lightning checkpoint: a `.ckpt` file, or a sharded checkpoint folder.
        out: Folder to write; created if missing.
        dtype: Save the weights as float32, bfloat16 or float16 (default: the dtype they were trained in).

    Returns:
        The output folder.
    """
    if dtype is not None and dtype not in EXPORT_DTYPES:
        raise ValueError(f"dtype must be one of {sorted(EXPORT_DTYPES)} or None (as trained), got {dtype!r}")
    checkpoint = Path(ckpt_path).expanduser()
    if checkpoint.is_dir():
        model = _load_sharded(policy, checkpoint)
    elif checkpoint.is_file():
        model = _load_single_file(policy, checkpoint)
    else:
        raise FileNotFoundError(f"no checkpoint at {checkpoint}: pass a .ckpt file or a sharded checkpoint folder")
    if dtype is not None:
        model.to(EXPORT_DTYPES[dtype])
    folder = Path(out).expanduser()
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    policy.load_tokenizer().save_pretrained(folder)
    return folder


def _load_single_file(policy: PolicySource, path: Path) -> PreTrainedModel:
    checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    if "state_dict" not in checkpoint:
        raise ValueError(f"{path} has no state_dict: it is not a Lightning checkpoint written by `trapo fit`")
    stored = {k: v for k, v in checkpoint["state_dict"].items() if k.startswith(POLICY_PREFIX)}
    model = policy.load_model(dtype=_stored_dtype({k: v.dtype for k, v in stored.items()}, path))
    with torch.no_grad():
        for key, target in _policy_targets(model, {k: v.shape for k, v in stored.items()}, path).items():
            target.copy_(stored[key])
    return model


def _load_sharded(policy: PolicySource, folder: Path) -> PreTrainedModel:
    metadata = FileSystemReader(folder).read_metadata().state_dict_metadata
    stored = {
        key.removeprefix(_SHARDED_PREFIX): meta
        for key, meta in metadata.items()
        if key.startswith(_SHARDED_PREFIX + POLICY_PREFIX) and isinstance(meta, TensorStorageMetadata)
    }
    model = policy.load_model(dtype=_stored_dtype({k: m.properties.dtype for k, m in stored.items()}, folder))
    targets = _policy_targets(model, {k: m.size for k, m in stored.items()}, folder)
    # The targets share storage with the model's parameters, so the shards are read straight into the model.
    with warnings.catch_warnings():  # one process without a process group is the point here, not a mistake
        warnings.filterwarnings("ignore", message="torch.distributed is disabled", category=UserWarning)
        dcp.load({_SHARDED_PREFIX.rstrip("."): targets}, checkpoint_id=folder, no_dist=True)
    return model


def _stored_dtype(dtypes: Mapping[str, torch.dtype], where: Path) -> torch.dtype:
    floating = {dtype for dtype in dtypes.values() if dtype.is_floating_point}
    if not floating:
        raise ValueError(
            f"{where} holds no policy weights (no `{POLICY_PREFIX}*` tensors in its state_dict); pass a checkpoint "
            "written by `trapo fit`"
        )
    if len(floating) > 1:
        raise ValueError(f"{where} mixes policy weight dtypes {sorted(map(str, floating))}; cannot pick one")
    return floating.pop()


def _policy_targets(
    model: PreTrainedModel, stored_shapes: Mapping[str, torch.Size], where: Path
) -> dict[str, torch.Tensor]:
    """The model's tensors to fill, keyed by checkpoint name, after checking that the checkpoint fits the model."""
    own = {POLICY_PREFIX + k: v for k, v in model.state_dict().items()}
    unknown = sorted(set(stored_shapes) - set(own))
    if unknown:
        raise ValueError(
            f"{where} has policy weights the model from model.policy lacks ({unknown[:3]} ...): the config's "
            "model.policy is not the model that was trained"
        )
    misshaped = [k for k in stored_shapes if tuple(stored_shapes[k]) != tuple(own[k].shape)]
    if misshaped:
        key = misshaped[0]
        raise ValueError(
            f"{where}: {key} has shape {tuple(stored_shapes[key])} but the model from model.policy has "
            f"{tuple(own[key].shape)}; the config's model.policy is not the model that was trained"
        )
    stored_storage = {own[k].untyped_storage().data_ptr() for k in stored_shapes}
    # A tied weight (the LM head sharing the embeddings) may be stored once; every other weight must be there.
    missing = sorted(
        k for k in own if k not in stored_shapes and own[k].untyped_storage().data_ptr() not in stored_storage
    )
    if missing:
        raise ValueError(f"{where} lacks policy weights {missing[:3]} ...: it is not a complete `trapo fit` checkpoint")
    return {k: own[k] for k in stored_shapes}
