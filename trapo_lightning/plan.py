"""`trapo plan --config X [--gpu-memory-gb N] [--model-config config.json]`: will a run fit its GPUs? (issue 11)

A pre-flight estimate of one GPU's memory during a TRAPO step, from the model's `config.json` (no weights are read)
and the run's config, parsed exactly as `fit` parses it (overrides included). Pure arithmetic, in small functions
of a `ModelShape` and a `RunShape`; `plan_memory` returns a `MemoryPlan`, `format_plan` prints it.

A step has two phases, and the larger one is the step's peak:
- rollout: what training keeps between steps (parameter, gradient and AdamW shards, the reference model if it is
  loaded) plus the rollout engine: vLLM's share (gpu_memory_utilization x GPU memory: its weight copy and KV cache),
  or, for transformers' `generate`, the gathered policy, its KV cache and the sampler's logits;
- update: the same resident state plus the forward/backward of the largest micro-batch: activations, one chunk of
  the LM head, FSDP2's gathered weights and unsharded gradients, and vLLM's memory if it does not sleep.
Gradients are counted in both: the module zeroes them at the start of each update, so they live through rollouts.

Bytes per element follow the Trainer's precision: `bf16-mixed` keeps float32 master weights, gradients and AdamW's
two states (8 bytes a parameter), with bfloat16 compute; `*-true` keeps everything in that dtype. Under FSDP2
(`ModelParallelStrategy`) parameters, gradients and states are divided by the shard group: the mesh's second
dimension, `tensor_parallel_size`, which `auto` sets to the devices per node (`sharding.py`).

Activations of a decoder layer (Qwen2 / Llama: RMSNorm, GQA attention through SDPA, SwiGLU MLP), bytes per token,
with b the compute dtype's bytes, h the hidden size, q = heads x head_dim, k = kv_heads x head_dim, i the MLP width:
    8h + 4bh + b(3q + 2k) + 4bi
after Korthikanti et al. 2022 ("Reducing Activation Recomputation in Large Transformer Models", section 4.1: 34h
per token for a GPT layer in 16 bit without attention scores), counted tensor by tensor for this layer as autograd
saves it: each RMSNorm keeps its float32 input (4h), its normalised input and its output (2bh); attention keeps
SDPA's q, k, v and output (flash / memory-efficient kernels keep no [T, T] scores) and o_proj's input
(b(3q + 2k)); the MLP keeps gate, up, silu(gate) and their product (4bi). No dropout (Qwen2 has none).
With activation checkpointing each layer keeps only its input (bh) and backward recomputes one layer at a time.
Backward through a layer adds a working set of its gradients, 3bi + 4bh (and, checkpointed, the recomputed layer);
it runs after the LM head's backward, so the larger of the two counts, not their sum. Checked against measured peaks on CPU
(`benchmarks/plan_check.py`, docs/performance.md). Not counted: the CUDA context and allocator fragmentation
(leave a few GiB of headroom), vLLM's own activation and CUDA-graph memory inside its share.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

GIB = 1 << 30

# (parameter, gradient, each of AdamW's two states, compute) bytes per element of each Lightning precision.
_PRECISION_BYTES = {
    "32-true": (4, 4, 4, 4), "32": (4, 4, 4, 4), "64-true": (8, 8, 8, 8),
    "bf16-mixed": (4, 4, 4, 2), "16-mixed": (4, 4, 4, 2),
    "bf16-true": (2, 2, 2, 2), "16-true": (2, 2, 2, 2),
}
ADAMW_STATES = 2  # exp_avg and exp_avg_sq, each the parameter's shape and dtype
FSDP_GATHERED_LAYERS = 2  # the layer computing and the next one, all-gathered ahead of it
# [chunk, V] float32 tensors alive at once in a chunk's backward (logprobs.py): saved logits, log-probs and their
# exp, and two gradients; measured 5.0 on CPU (benchmarks/plan_check.py: +128 chunk rows at V = 151,936 add
# 5.0 x 4 x 128 x V bytes).
LOGPROB_CHUNK_FLOAT32_COPIES = 5


@dataclass(frozen=True)
class ModelShape:
    """The sizes of a decoder-only causal LM that memory depends on (a Hugging Face `config.json`)."""

    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    tie_word_embeddings: bool
    attention_bias: bool
    max_position_embeddings: int | None = None

    @classmethod
    def from_config(cls, config: Mapping) -> ModelShape:
        """From a `config.json`'s fields (a dict, or a transformers config's `to_dict()`).

        Args:
            config: Needs hidden_size, intermediate_size, num_hidden_layers, num_attention_heads, vocab_size;
                num_key_value_heads defaults to the heads, head_dim to hidden / heads, tie_word_embeddings to false,
                attention_bias to Qwen2's q/k/v biases (model_type qwen2) or else false.
        """
        missing = [k for k in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                               "vocab_size") if config.get(k) is None]
        if missing:
            raise ValueError(f"the model config has no {', '.join(missing)}: a decoder-only LM's config.json is needed")
        heads = int(config["num_attention_heads"])
        return cls(
            hidden_size=int(config["hidden_size"]),
            intermediate_size=int(config["intermediate_size"]),
            num_layers=int(config["num_hidden_layers"]),
            num_heads=heads,
            num_kv_heads=int(config.get("num_key_value_heads") or heads),
            head_dim=int(config.get("head_dim") or config["hidden_size"] // heads),
            vocab_size=int(config["vocab_size"]),
            tie_word_embeddings=bool(config.get("tie_word_embeddings", False)),
            attention_bias=bool(config.get("attention_bias", config.get("model_type") == "qwen2")),
            max_position_embeddings=config.get("max_position_embeddings"),
        )

    @classmethod
    def from_file(cls, path: str | Path) -> ModelShape:
        """From a `config.json` file (or a model folder holding one)."""
        path = Path(path)
        if path.is_dir():
            path = path / "config.json"
        if not path.is_file():
            raise FileNotFoundError(f"no model config at {path}: give a config.json file or a model folder")
        return cls.from_config(json.loads(path.read_text()))


def layer_parameters(shape: ModelShape) -> int:
    """Parameters of one decoder layer: q/k/v/o projections (q/k/v biases if any), SwiGLU MLP, two RMSNorms."""
    h, q, kv = shape.hidden_size, shape.num_heads * shape.head_dim, shape.num_kv_heads * shape.head_dim
    attention = h * (q + 2 * kv) + q * h + (q + 2 * kv if shape.attention_bias else 0)
    return attention + 3 * h * shape.intermediate_size + 2 * h


def root_parameters(shape: ModelShape) -> int:
    """Parameters outside the decoder layers: embedding, final norm and (untied) LM head; FSDP2's root group."""
    embedding = shape.vocab_size * shape.hidden_size
    return embedding * (1 if shape.tie_word_embeddings else 2) + shape.hidden_size


def parameter_count(shape: ModelShape) -> int:
    return shape.num_layers * layer_parameters(shape) + root_parameters(shape)


def layer_activation_bytes_per_token(shape: ModelShape, compute_bytes: int) -> int:
    """Bytes one decoder layer saves for backward per token, without checkpointing (module docstring)."""
    h, b, i = shape.hidden_size, compute_bytes, shape.intermediate_size
    q, kv = shape.num_heads * shape.head_dim, shape.num_kv_heads * shape.head_dim
    return 8 * h + 4 * b * h + b * (3 * q + 2 * kv) + 4 * b * i


def backward_working_bytes_per_token(shape: ModelShape, compute_bytes: int) -> int:
    """Gradients alive while backward runs through one layer: three MLP-wide and four hidden-wide per token."""
    return compute_bytes * (3 * shape.intermediate_size + 4 * shape.hidden_size)


def saved_activation_bytes(shape: ModelShape, tokens: int, compute_bytes: int, checkpointing: bool) -> int:
    """What the forward of one micro-batch of `tokens` (rows x padded width) keeps for backward: every layer's
    activations, or with checkpointing every layer's input; and the final norm's and the LM head's inputs.

    Args:
        shape: The model.
        tokens: Tokens through the forward (padding included).
        compute_bytes: Bytes of the compute dtype (2 for bf16).
        checkpointing: Each layer keeps only its input and is recomputed in backward, one at a time.
    """
    if checkpointing:
        per_layer = compute_bytes * shape.hidden_size
    else:
        per_layer = layer_activation_bytes_per_token(shape, compute_bytes)
    final_norm = 4 * shape.hidden_size + 3 * compute_bytes * shape.hidden_size
    return tokens * (shape.num_layers * per_layer + final_norm)


def layer_backward_bytes(shape: ModelShape, tokens: int, compute_bytes: int, checkpointing: bool) -> int:
    """What backward through one decoder layer adds: its gradients' working set, and with checkpointing the layer's
    recomputed activations."""
    recomputed = layer_activation_bytes_per_token(shape, compute_bytes) if checkpointing else 0
    return tokens * (recomputed + backward_working_bytes_per_token(shape, compute_bytes))


def logprob_chunk_bytes(shape: ModelShape, chunk_tokens: int, compute_bytes: int) -> int:
    """The chunked LM head's peak, one chunk at a time whatever the micro-batch's length
    (`logprobs.hidden_logprobs_and_entropy`): float32 `[chunk, V]` logits, log-probs, their exp and gradients; in a
    16-bit compute dtype also the logits and their gradient in it; and the chunk's `[V, H]` weight gradient before
    it is added to the running sum."""
    per_row = LOGPROB_CHUNK_FLOAT32_COPIES * 4 + (2 * compute_bytes if compute_bytes < 4 else 0)
    return chunk_tokens * shape.vocab_size * per_row + shape.vocab_size * shape.hidden_size * compute_bytes


def kv_bytes_per_token(shape: ModelShape, dtype_bytes: int) -> int:
    """KV cache per token: keys and values of every layer, 2 x layers x kv_heads x head_dim x bytes."""
    return 2 * shape.num_layers * shape.num_kv_heads * shape.head_dim * dtype_bytes


def micro_batch_tokens(sequence_tokens: int, max_rows: int, max_tokens: int | None) -> int:
    """Most tokens (rows x padded width) one micro-batch can hold (`batch.micro_batches`'s packing): `max_rows`
    full-length rows, or the token budget, but never less than one full-length row (which goes alone).

    Args:
        sequence_tokens: Longest row, max prompt + max response tokens.
        max_rows: `model.micro_batch_size`.
        max_tokens: `model.max_tokens_per_micro_batch` (None: no budget).
    """
    rows_bound = max_rows * sequence_tokens
    return rows_bound if max_tokens is None else max(sequence_tokens, min(max_tokens, rows_bound))


@dataclass(frozen=True)
class RolloutShape:
    """The rollout engine's memory settings (`model.rollout`)."""

    engine: str  # "vllm" or "hf"
    rows: int  # sequences sampled at once on a rank, at most: prompts_per_step x group size
    sequence_tokens: int  # max prompt + max response
    gpu_memory_utilization: float = 0.0
    sleeps: bool = False  # vLLM's sleep mode frees its memory during the update
    dtype_bytes: int = 2
    kv_cache_gib: float | None = None


@dataclass(frozen=True)
class RunShape:
    """What the run's config says that memory depends on."""

    precision: str = "32-true"
    shard_size: int = 1  # FSDP2 shard group; 1: the whole model on every device
    reference: bool = False
    micro_batch_tokens: int = 1024
    activation_checkpointing: bool = False
    logprob_chunk_tokens: int = 1024
    rollout: RolloutShape | None = None

    @property
    def bytes(self) -> tuple[int, int, int, int]:
        """(parameter, gradient, AdamW state, compute) bytes per element."""
        if self.precision not in _PRECISION_BYTES:
            raise ValueError(f"trapo plan knows no precision {self.precision!r}; known: {sorted(_PRECISION_BYTES)}")
        return _PRECISION_BYTES[self.precision]


@dataclass(frozen=True)
class Component:
    name: str
    bytes: int
    phases: tuple[str, ...]  # "rollout", "update"


@dataclass(frozen=True)
class MemoryPlan:
    """One GPU's memory during a step, by component and phase; `fits` when the larger phase fits the GPU."""

    components: tuple[Component, ...]
    gpu_bytes: int
    kv_cache_tokens: int | None = None  # tokens of KV cache the rollout engine has room for
    kv_tokens_needed: int | None = None  # every rollout row at full length at once
    notes: tuple[str, ...] = field(default_factory=tuple)

    def phase_bytes(self, phase: str) -> int:
        return sum(c.bytes for c in self.components if phase in c.phases)

    @property
    def peak_phase(self) -> str:
        return max(("rollout", "update"), key=self.phase_bytes)

    @property
    def peak_bytes(self) -> int:
        return self.phase_bytes(self.peak_phase)

    @property
    def fits(self) -> bool:
        return self.peak_bytes <= self.gpu_bytes and (self.kv_cache_tokens is None or self.kv_cache_tokens > 0)


BOTH = ("rollout", "update")
UPDATE = ("update",)
ROLLOUT = ("rollout",)


def resident_components(shape: ModelShape, run: RunShape) -> list[Component]:
    """What every phase holds: the policy's parameter, gradient and AdamW shards and the reference's shards."""
    params = parameter_count(shape)
    param_b, grad_b, state_b, _ = run.bytes
    shard = f" (1/{run.shard_size} shard)" if run.shard_size > 1 else ""
    out = [
        Component(f"policy parameters{shard}", _share(params * param_b, run.shard_size), BOTH),
        Component(f"gradients{shard}", _share(params * grad_b, run.shard_size), BOTH),
        Component(f"AdamW states, {ADAMW_STATES}{shard}", _share(ADAMW_STATES * params * state_b, run.shard_size), BOTH),
    ]
    if run.reference:
        out.append(Component(f"reference model{shard}", _share(params * param_b, run.shard_size), BOTH))
    return out


def update_components(shape: ModelShape, run: RunShape) -> list[Component]:
    """The forward and backward of the largest micro-batch."""
    param_b, _, _, compute_b = run.bytes
    tokens, checkpointing = run.micro_batch_tokens, run.activation_checkpointing
    # Backward runs the LM head's chunks first, then the layers one by one: the two never coexist.
    chunk = logprob_chunk_bytes(shape, run.logprob_chunk_tokens, compute_b)
    layer = layer_backward_bytes(shape, tokens, compute_b, checkpointing)
    out = [
        Component(f"activations, {tokens} tokens, {'with' if checkpointing else 'without'} checkpointing",
                  saved_activation_bytes(shape, tokens, compute_b, checkpointing), UPDATE),
        Component(f"backward peak: max(LM head chunk {run.logprob_chunk_tokens} x {shape.vocab_size} "
                  f"{chunk / GIB:.2f}, one layer's backward {layer / GIB:.2f})", max(chunk, layer), UPDATE),
    ]
    if run.shard_size > 1:  # FSDP2: gathered weights in the compute dtype, unsharded gradients before reduce-scatter
        root, layer = root_parameters(shape), layer_parameters(shape)
        out.append(Component(f"FSDP2 gathered weights (root + {FSDP_GATHERED_LAYERS} layers)",
                             (root + FSDP_GATHERED_LAYERS * layer) * compute_b, UPDATE))
        out.append(Component("FSDP2 unsharded gradients (root + 1 layer)",
                             root * compute_b + layer * (compute_b + 4), UPDATE))
    elif compute_b < param_b:  # autocast keeps a compute-dtype copy of every weight for the step
        out.append(Component("autocast weight copies", parameter_count(shape) * compute_b, UPDATE))
    return out


def rollout_components(shape: ModelShape, run: RunShape, gpu_bytes: int) -> tuple[list[Component], int | None]:
    """The rollout engine's memory, and how many tokens of KV cache it has room for (None: no engine planned)."""
    rollout = run.rollout
    if rollout is None:
        return [], None
    kv_token = kv_bytes_per_token(shape, rollout.dtype_bytes)
    weights = parameter_count(shape) * rollout.dtype_bytes
    if rollout.engine == "vllm":
        share = (int(rollout.kv_cache_gib * GIB) + weights if rollout.kv_cache_gib is not None
                 else int(rollout.gpu_memory_utilization * gpu_bytes))
        phases = ROLLOUT if rollout.sleeps else BOTH
        label = "asleep in the update" if rollout.sleeps else "kept in the update: no sleep mode"
        return [Component(f"vLLM weights + KV cache ({label})", share, phases)], (share - weights) // kv_token
    # transformers' generate on the policy: the gathered policy (under FSDP2), the KV cache of every row, and one
    # decoding step's logits: [rows, V] in the compute dtype, and the float32 log-softmax the engine keeps until the
    # next step shows the sampled token, beside the new step's (rollout/hf_generate.py).
    _, _, _, compute_b = run.bytes
    kv = rollout.rows * rollout.sequence_tokens * kv_token
    out = [Component(f"generate KV cache, {rollout.rows} rows", kv, ROLLOUT),
           Component("generate logits, one step (sampler log-probs)",
                     rollout.rows * shape.vocab_size * (compute_b + 2 * 4), ROLLOUT)]
    if run.shard_size > 1:
        out.insert(0, Component("policy gathered for generate", parameter_count(shape) * compute_b, ROLLOUT))
    return out, rollout.rows * rollout.sequence_tokens


def plan_memory(shape: ModelShape, run: RunShape, gpu_bytes: int) -> MemoryPlan:
    """One GPU's memory during a step of `run` on `shape`.

    Args:
        shape: The model.
        run: The run's settings.
        gpu_bytes: Memory of one GPU.
    """
    rollout, kv_tokens = rollout_components(shape, run, gpu_bytes)
    components = resident_components(shape, run) + update_components(shape, run) + rollout
    needed = None if run.rollout is None else run.rollout.rows * run.rollout.sequence_tokens
    notes = []
    longest = None if run.rollout is None else run.rollout.sequence_tokens
    if longest and shape.max_position_embeddings and longest > shape.max_position_embeddings:
        notes.append(f"prompt + response = {longest} tokens exceeds the model's max_position_embeddings "
                     f"{shape.max_position_embeddings}")
    return MemoryPlan(tuple(components), gpu_bytes, kv_tokens, needed, tuple(notes))


def format_plan(plan: MemoryPlan, title: str = "") -> str:
    """A table of components (GiB, and the phases that hold them), the two phases' totals and a one-line verdict."""
    lines = [title] if title else []
    lines += ["| component | GiB | phases |", "|---|---:|---|"]
    lines += [f"| {c.name} | {c.bytes / GIB:.2f} | {' + '.join(c.phases)} |" for c in plan.components]
    for phase in BOTH:
        lines.append(f"| **{phase} total** | **{plan.phase_bytes(phase) / GIB:.2f}** | |")
    if plan.kv_cache_tokens is not None:
        concurrent = plan.kv_cache_tokens / max(1, plan.kv_tokens_needed or 1)
        lines.append(f"KV cache: room for {max(0, plan.kv_cache_tokens):,} tokens; all rollout rows at full length "
                     f"need {plan.kv_tokens_needed:,} ({min(concurrent, 1.0):.0%} of them at once; the rest queue)")
    lines += [f"note: {note}" for note in plan.notes]
    gpu, peak = plan.gpu_bytes / GIB, plan.peak_bytes / GIB
    verdict = "FITS" if plan.fits else "DOES NOT FIT"
    lines.append(f"{verdict}: peak {peak:.1f} GiB ({plan.peak_phase}) of {gpu:.1f} GiB per GPU, "
                 f"{gpu - peak:+.1f} GiB headroom")
    return "\n".join(lines)


def _share(total: int, shard_size: int) -> int:
    return math.ceil(total / shard_size)


# -- from the run's config ---------------------------------------------------------------------------------------
def policy_shape(policy_source, model_config: str | None = None) -> ModelShape:
    """The policy's shape from `model_config` (a config.json or model folder) if given, else from the policy
    source: a `PretrainedFolder`'s config.json, or a `TinyRandomQwen2`'s settings (nothing is written)."""
    from trapo_lightning.models.sources import PretrainedFolder, TinyRandomQwen2

    if model_config is not None:
        return ModelShape.from_file(model_config)
    if isinstance(policy_source, PretrainedFolder):
        path = Path(policy_source.path).expanduser() / "config.json"
        if not path.is_file():
            raise FileNotFoundError(
                f"the policy folder {policy_source.path} has no config.json (a placeholder path?): give the model's "
                "config.json with --model-config PATH, e.g. configs/model_shapes/qwen2.5_math_7b.json"
            )
        return ModelShape.from_file(path)
    if isinstance(policy_source, TinyRandomQwen2):
        from trapo_lightning.models.tokenizer import build_tiny_tokenizer

        spec = policy_source.spec
        return ModelShape(
            hidden_size=spec["hidden_size"], intermediate_size=spec["intermediate_size"],
            num_layers=spec["num_layers"], num_heads=spec["num_heads"], num_kv_heads=spec["num_kv_heads"],
            head_dim=spec["hidden_size"] // spec["num_heads"], vocab_size=len(build_tiny_tokenizer()),
            tie_word_embeddings=True, attention_bias=True,
            max_position_embeddings=spec["max_position_embeddings"],
        )
    raise ValueError(f"trapo plan cannot read the shape of a {type(policy_source).__name__}: pass --model-config PATH")


def shard_size(strategy, devices) -> int:
    """Devices one FSDP2 shard group spans: ModelParallelStrategy's `tensor_parallel_size` (`auto`: the devices per
    node, `sharding.py`); 1 for any other strategy (each device holds the whole model)."""
    from lightning.pytorch.strategies import ModelParallelStrategy

    if not isinstance(strategy, ModelParallelStrategy):
        return 1
    size = strategy._tensor_parallel_size
    if size != "auto":
        return int(size)
    if not isinstance(devices, int) or devices < 1:
        raise ValueError(f"trainer.devices is {devices!r}: trapo plan needs the number of devices per node, e.g. "
                         "--trainer.devices 8")
    return devices


def rollout_shape(engine, rows: int, sequence_tokens: int) -> RolloutShape:
    """The engine's memory settings: a `VLLMEngine`'s, or transformers' `generate` on the policy for any other."""
    from trapo_lightning.rollout.vllm_engine import VLLMEngine

    if isinstance(engine, VLLMEngine):
        return RolloutShape(
            "vllm", rows, sequence_tokens, engine.gpu_memory_utilization, engine.enable_sleep_mode,
            4 if engine.dtype == "float32" else 2, engine.kv_cache_gib,
        )
    return RolloutShape("hf", rows, sequence_tokens)


def run_shape(config, module, datamodule, callbacks, strategy) -> RunShape:
    """The `RunShape` of a parsed config: `config` the namespace, the others as the CLI built them.

    Args:
        config: The parsed config (`trainer.precision`, `trainer.devices`).
        module: The `TrapoModule` (its weights are not loaded).
        datamodule: The `TrapoDataModule` (`prompts_per_step`).
        callbacks: The trainer's callbacks (a KL-tuning one makes the reference load).
        strategy: The trainer's strategy object or name.
    """
    from trapo_lightning.callback_rules import reference_needed

    sequence = module.max_prompt_tokens + module.max_response_tokens
    rows = datamodule.prompts_per_step * module.guidance.group_size
    return RunShape(
        precision=str(config.trainer.precision or "32-true"),
        shard_size=shard_size(strategy, config.trainer.devices),
        reference=reference_needed(module.loss.kl_coef, callbacks or []),
        micro_batch_tokens=micro_batch_tokens(sequence, module.micro_batch_size, module.max_tokens_per_micro_batch),
        activation_checkpointing=module.activation_checkpointing,
        logprob_chunk_tokens=module.logprob_chunk_tokens,
        rollout=rollout_shape(module.rollout, rows, sequence),
    )


def plan_report(config, config_init, gpu_memory_gb: float, model_config: str | None = None) -> tuple[MemoryPlan, str]:
    """The plan and its printed report for a config parsed by `trapo plan` (`cli.PlanCLI`).

    Args:
        config: The parsed config namespace.
        config_init: The same with its classes built (`model`, `data`, `trainer.callbacks`, `trainer.strategy`).
        gpu_memory_gb: Memory of one GPU in GiB.
        model_config: A config.json (or model folder) to read the policy's shape from instead of its source.
    """
    if gpu_memory_gb <= 0:
        raise ValueError(f"--gpu-memory-gb must be > 0, got {gpu_memory_gb}")
    module = config_init.model
    shape = policy_shape(module.policy_source, model_config)
    run = run_shape(config, module, config_init.data, config_init.trainer.callbacks, config_init.trainer.strategy)
    plan = plan_memory(shape, run, int(gpu_memory_gb * GIB))
    engine = "none" if run.rollout is None else run.rollout.engine
    title = (
        f"{parameter_count(shape) / 1e9:.2f}B parameters; precision {run.precision}; FSDP2 shard group "
        f"{run.shard_size}; reference model {'loaded' if run.reference else 'not loaded'}; rollout engine {engine}; "
        f"largest micro-batch {run.micro_batch_tokens} tokens"
    )
    return plan, format_plan(plan, title)
