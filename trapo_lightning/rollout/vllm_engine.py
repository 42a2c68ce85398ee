"""Rollouts through vLLM, in the training process and on the same device as the policy: one engine per rank (vLLM's
external_launcher executor under a process group). With tensor parallel size 1 each samples its own rank's
requests; with `tensor_parallel_size` tp > 1 the engines of tp consecutive ranks hold one shard of the weights each
and sample their group's requests together, each rank keeping its own (`tensor_parallel.LockstepGroup`).

vLLM samples from its own copy of the weights, built from the policy's Hugging Face folder; that copy is the
policy at version 0. After optimizer steps, `load_weights` (driven by `VLLMRolloutRefresh`) streams the policy's
current tensors into it and tags it with the policy version, so the module can refuse stale samples.

Log-probs are vLLM's processed log-probs: those of the distribution actually sampled (after temperature and
top-p), so at temperature 1 and top-p 1 they are the policy's log-softmax, which the training forward reproduces
(the train/rollout mismatch). Each request draws from its own seed derived from the call's seed and its index, so
sampling is reproducible whatever vLLM batches together, and the same at any tensor parallel size (up to the
numerics of sharded matmuls). vLLM is imported only when an engine is bound.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import NamedTuple

import torch

from trapo_lightning.rollout import vllm_compat
from trapo_lightning.rollout.base import Generation, RolloutEngine, RolloutRequest, SamplingParams, as_eos_ids
from trapo_lightning.rollout.tensor_parallel import LockstepGroup
from trapo_lightning.seeding import derive_seed

_GIB = 1 << 30


class _Job(NamedTuple):
    """One request as sent to vLLM; plain values, so a tensor-parallel group can exchange it between ranks."""

    token_ids: tuple[int, ...]
    max_tokens: int
    seed: int | None
    temperature: float
    top_p: float


class VLLMEngine(RolloutEngine):
    """Sampling with an in-process vLLM engine on the policy's folder, refreshed in memory."""

    def __init__(
        self,
        dtype: str = "auto",
        gpu_memory_utilization: float = 0.3,
        max_model_len: int | None = None,
        enforce_eager: bool = False,
        enable_sleep_mode: bool = False,
        sleep_level: int = 1,
        kv_cache_gib: float | None = None,
        tensor_parallel_size: int = 1,
    ) -> None:
        """
        Args:
            dtype: Weights and activations in vLLM: "auto" (the folder's dtype; vLLM serves float32 folders as
                float16 on GPU), "bfloat16", "float16" or "float32" (use float32 on CPU: bf16 matmuls are far slower).
            gpu_memory_utilization: Fraction of the GPU's memory vLLM may take for its weight copy and KV cache; the
                training policy, its gradients and optimizer state share the same GPU.
            max_model_len: Longest prompt + response vLLM accepts (default: the model config's
                max_position_embeddings); smaller values shrink the KV cache it reserves.
            enforce_eager: Run eagerly, without CUDA graphs or torch.compile: seconds to start instead of minutes,
                slower decoding on GPU. On CPU, use it.
            enable_sleep_mode: Free vLLM's GPU memory (KV cache, and the weight copy per sleep_level) between
                rollouts so the backward pass has it. GPU only.
            sleep_level: 1 moves the weight copy to CPU memory while asleep; 2 discards it, which is cheaper but
                only valid when every rollout follows a weight refresh (VLLMRolloutRefresh every_n_steps 1).
            kv_cache_gib: KV cache size in GiB, overriding gpu_memory_utilization's share (on CPU: the cache's
                size in RAM; default there: vLLM's own, 4 GiB or VLLM_CPU_KVCACHE_SPACE).
            tensor_parallel_size: Ranks whose engines share one model, each holding a 1/tp shard of its weights (the
                paper sampled at 2). Groups are tp consecutive ranks, so tp must divide the world size; each group
                samples all its ranks' requests in lockstep and every rank keeps its own. 1: every rank samples
                alone. Above 1 it needs the training process group (a multi-device strategy).
        """
        if not 0 < gpu_memory_utilization <= 1:
            raise ValueError(f"gpu_memory_utilization must be in (0, 1], got {gpu_memory_utilization}")
        if max_model_len is not None and max_model_len < 1:
            raise ValueError(f"max_model_len must be >= 1 or None, got {max_model_len}")
        if sleep_level not in (1, 2):
            raise ValueError(f"sleep_level must be 1 (offload weights) or 2 (discard them), got {sleep_level}")
        if kv_cache_gib is not None and kv_cache_gib <= 0:
            raise ValueError(f"kv_cache_gib must be > 0 or None, got {kv_cache_gib}")
        if tensor_parallel_size < 1:
            raise ValueError(f"tensor_parallel_size must be >= 1, got {tensor_parallel_size}")
        self.dtype = dtype
        self.gpu_memory_utilization = gpu_memory_utilization
        self.max_model_len = max_model_len
        self.enforce_eager = enforce_eager
        self.enable_sleep_mode = enable_sleep_mode
        self.sleep_level = sleep_level
        self.kv_cache_gib = kv_cache_gib
        self.tensor_parallel_size = tensor_parallel_size
        self._group: LockstepGroup | None = None  # this rank's tensor-parallel group (tp > 1)
        self._llm = None
        self._folder: Path | None = None
        self._eos: tuple[int, ...] = ()
        self._version = 0  # vLLM starts from the folder: the policy before any optimizer step
        self._asleep: set[str] = set()  # memory tags vLLM has released ("weights", "kv_cache")

    # -- RolloutEngine ------------------------------------------------------------------------------------------
    def bind(self, policy: torch.nn.Module, eos_token_ids: Sequence[int], pad_token_id: int) -> None:
        """Build the vLLM engine on the folder the policy was loaded from. Binding again to a policy of the same
        folder keeps the engine (and its weights) and only takes the new EOS ids."""
        folder = policy_folder(policy)
        if self._llm is not None and folder != self._folder:
            raise RuntimeError(f"this VLLMEngine serves {self._folder}; make a new engine for {folder}")
        if self._llm is None:
            if self.tensor_parallel_size > 1:
                self._group = LockstepGroup(self.tensor_parallel_size)  # checks the process group and the sizes
            self._llm = vllm_compat.build_llm(
                folder,
                dtype=self.dtype,
                gpu_memory_utilization=self.gpu_memory_utilization,
                max_model_len=self.max_model_len,
                enforce_eager=self.enforce_eager,
                enable_sleep_mode=self.enable_sleep_mode,
                kv_cache_bytes=None if self.kv_cache_gib is None else int(self.kv_cache_gib * _GIB),
                tensor_parallel_size=self.tensor_parallel_size,
            )
            self._folder = folder
        self._eos = as_eos_ids(eos_token_ids)

    def generate(self, requests: Sequence[RolloutRequest], params: SamplingParams) -> list[Generation]:
        self._require_llm("generate")
        if self._asleep:
            raise RuntimeError("VLLMEngine.generate called while asleep; call wake() first")
        out = [Generation([], [], False) for _ in requests]
        todo = [i for i, r in enumerate(requests) if r.max_new_tokens > 0]  # vLLM needs max_tokens >= 1
        base_seed = params.seed
        if base_seed is None and self._group is not None:  # the group's engines must draw the same: seed explicitly
            base_seed = int(torch.randint(0, 1 << 62, ()).item())
        jobs = [
            _Job(
                tuple(requests[i].token_ids), requests[i].max_new_tokens,
                None if base_seed is None else derive_seed(base_seed, i), params.temperature, params.top_p,
            )
            for i in todo
        ]
        if self._group is None:
            completions = self._run(jobs)
        else:
            group_jobs, mine = self._group.exchange(jobs)
            completions = self._run(group_jobs)[mine]
        for i, (ids, logprobs, stopped) in zip(todo, completions):
            out[i] = Generation(ids, logprobs, stopped and bool(ids) and ids[-1] in self._eos)
        return out

    def _run(self, jobs: Sequence[_Job]) -> list[tuple[list[int], list[float], bool]]:
        if not jobs:
            return []
        per_request = [
            vllm_compat.sampling_params(
                temperature=job.temperature, top_p=job.top_p, max_tokens=job.max_tokens, seed=job.seed,
                stop_token_ids=self._eos,
            )
            for job in jobs
        ]
        return vllm_compat.generate(self._require_llm("generate"), [job.token_ids for job in jobs], per_request)

    def _finish_group_rollout(self) -> None:
        """Keep sampling the group's other ranks' requests until every rank of the group has finished its own."""
        while (turn := self._group.exchange(None)) is not None:
            self._run(turn[0])

    @property
    def weights_version(self) -> int:
        return self._version

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]], version: int) -> None:
        """Stream new weights into vLLM, then drop its prefix cache (KV computed by the old weights)."""
        llm = self._require_llm("load_weights")
        if "weights" in self._asleep:
            vllm_compat.wake_up(llm, ["weights"])
            self._asleep.discard("weights")
        vllm_compat.load_weights(llm, weights)
        vllm_compat.reset_prefix_cache(llm)
        self._version = version

    def sleep(self) -> None:
        """End this rank's rollout (tp > 1: after serving the group's other ranks until all are done), then free
        vLLM's memory where sleep mode is on. The module calls it on every rank after every rollout."""
        if self._group is not None and self._llm is not None:
            self._finish_group_rollout()
        if not self.enable_sleep_mode or self._asleep:
            return
        vllm_compat.sleep(self._require_llm("sleep"), self.sleep_level)
        self._asleep = {"weights", "kv_cache"}

    def wake(self) -> None:
        if not self._asleep:
            return
        if self.sleep_level == 2 and "weights" in self._asleep:
            raise RuntimeError(
                "VLLMEngine slept at sleep_level 2, which discards its weights, and no refresh loaded new ones "
                "before this rollout; use sleep_level 1 or VLLMRolloutRefresh(every_n_steps=1)."
            )
        vllm_compat.wake_up(self._require_llm("wake"), sorted(self._asleep))
        self._asleep = set()

    # -- lifecycle ----------------------------------------------------------------------------------------------
    def shutdown(self) -> None:
        """Release vLLM (its memory and its single-process distributed state); the engine can be bound again."""
        if self._llm is not None:
            vllm_compat.shutdown(self._llm)
        self._llm, self._folder, self._version, self._asleep, self._group = None, None, 0, set(), None

    def _require_llm(self, what: str):
        if self._llm is None:
            raise RuntimeError(f"VLLMEngine.{what} called before bind(policy, ...)")
        return self._llm


def policy_folder(policy: torch.nn.Module) -> Path:
    """The local folder a Hugging Face model was loaded from (`from_pretrained` records it in `name_or_path`)."""
    name = getattr(policy, "name_or_path", None) or getattr(getattr(policy, "config", None), "_name_or_path", "")
    folder = Path(name) if name else None
    if folder is None or not (folder / "config.json").is_file():
        raise ValueError(
            f"VLLMEngine builds vLLM from the folder the policy was loaded from, but the policy's name_or_path "
            f"is {name!r}, not a local folder with config.json. Load the policy with from_pretrained from a local "
            "folder (PretrainedFolder or TinyRandomQwen2)."
        )
    return folder
