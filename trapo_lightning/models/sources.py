"""Policy sources: each resolves to a Hugging Face folder (config, weights, tokenizer) loaded by `from_pretrained`.

`PretrainedFolder` is a user's model (e.g. Qwen2.5-Math-7B on local disk). `TinyRandomQwen2` is the embedded
default: a randomly initialised Qwen2 of a few hundred thousand parameters and a small BPE tokenizer trained in code, written
once as an ordinary folder so the rest of the code never knows the difference. Nothing is downloaded.
"""

from __future__ import annotations

import abc
import fcntl
import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase, Qwen2Config

from trapo_lightning.models.tokenizer import TOKENIZER_VERSION, build_tiny_tokenizer

SPEC_FILE = "trapo_tiny_spec.json"


class PolicySource(abc.ABC):
    """Something that yields a local Hugging Face model folder."""

    @abc.abstractmethod
    def resolve(self) -> Path:
        """Return the folder, creating it first if this source makes one."""

    def load_tokenizer(self) -> PreTrainedTokenizerBase:
        tokenizer = AutoTokenizer.from_pretrained(self.resolve())
        if tokenizer.pad_token_id is None:
            tokenizer.pad_token = tokenizer.eos_token
        return tokenizer

    def load_model(self, dtype: torch.dtype = torch.float32) -> PreTrainedModel:
        return AutoModelForCausalLM.from_pretrained(self.resolve(), dtype=dtype)


class PretrainedFolder(PolicySource):
    """A model folder on local disk, as written by `save_pretrained` (weights, config and tokenizer)."""

    def __init__(self, path: str) -> None:
        """
        Args:
            path: Folder holding config.json, the weights (safetensors) and the tokenizer files.
        """
        self.path = path

    def resolve(self) -> Path:
        folder = Path(self.path).expanduser()
        if not (folder / "config.json").is_file():
            raise FileNotFoundError(
                f"policy folder {folder} has no config.json; point `model.policy.init_args.path` at a folder "
                "written by `save_pretrained` (weights, config and tokenizer). Nothing is downloaded at run time."
            )
        return folder


class TinyRandomQwen2(PolicySource):
    """A tiny randomly initialised Qwen2 with a BPE tokenizer trained in code, written as a HF folder on first use."""

    def __init__(
        self,
        path: str = "runs/tiny_qwen2",
        hidden_size: int = 128,
        num_layers: int = 4,
        num_heads: int = 4,
        num_kv_heads: int = 2,
        intermediate_size: int = 384,
        max_position_embeddings: int = 1024,
        seed: int = 0,
    ) -> None:
        """
        Args:
            path: Folder to write the model and tokenizer to; reused when it already holds the same spec.
            hidden_size: Width of the residual stream.
            num_layers: Decoder layers.
            num_heads: Attention heads.
            num_kv_heads: Key/value heads (grouped-query attention, as in Qwen2).
            intermediate_size: Width of the MLP.
            max_position_embeddings: Longest sequence (prompt + response) the model supports.
            seed: Seed of the random initialisation.
        """
        self.path = path
        self.spec = dict(
            hidden_size=hidden_size,
            num_layers=num_layers,
            num_heads=num_heads,
            num_kv_heads=num_kv_heads,
            intermediate_size=intermediate_size,
            max_position_embeddings=max_position_embeddings,
            seed=seed,
            tokenizer=TOKENIZER_VERSION,  # a folder made by an older tokenizer is rewritten, not reused
            weights_format=2,  # 2: the tied LM head stored as embed_tokens (vLLM reads only that name)
        )

    def resolve(self) -> Path:
        folder = Path(self.path)
        folder.parent.mkdir(parents=True, exist_ok=True)
        with _file_lock(folder.with_name(folder.name + ".lock")):  # several ranks may race to write it
            if not self._is_current(folder):
                self._write(folder)
        return folder

    def _is_current(self, folder: Path) -> bool:
        spec_file = folder / SPEC_FILE
        return spec_file.is_file() and json.loads(spec_file.read_text()) == self.spec

    def _write(self, folder: Path) -> None:
        tokenizer = build_tiny_tokenizer()
        config = Qwen2Config(
            vocab_size=len(tokenizer),
            hidden_size=self.spec["hidden_size"],
            intermediate_size=self.spec["intermediate_size"],
            num_hidden_layers=self.spec["num_layers"],
            num_attention_heads=self.spec["num_heads"],
            num_key_value_heads=self.spec["num_kv_heads"],
            max_position_embeddings=self.spec["max_position_embeddings"],
            tie_word_embeddings=True,
            bos_token_id=None,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.spec["seed"])
            model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        staging = Path(tempfile.mkdtemp(prefix=folder.name + ".", dir=folder.parent))
        # Not model.save_pretrained: under a process group transformers writes nothing on ranks other than 0, and
        # whichever rank holds the lock must write the whole folder.
        model.config.save_pretrained(staging)
        model.generation_config.save_pretrained(staging)
        state = model.state_dict()
        del state["lm_head.weight"]  # tied to embed_tokens, stored once under that name, as save_pretrained does
        save_file({k: v.contiguous() for k, v in state.items()}, str(staging / "model.safetensors"),
                  metadata={"format": "pt"})
        tokenizer.save_pretrained(staging)
        (staging / SPEC_FILE).write_text(json.dumps(self.spec, indent=2))
        shutil.rmtree(folder, ignore_errors=True)
        os.replace(staging, folder)


@contextmanager
def _file_lock(path: Path):
    with open(path, "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
