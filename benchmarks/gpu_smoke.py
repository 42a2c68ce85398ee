"""GPU smoke check: a few TRAPO steps on one GPU the way the 7B config runs them, in a few minutes (issue 11).

    python benchmarks/gpu_smoke.py                 # ~0.5B random Qwen2, 4 steps, prints a summary
    python benchmarks/gpu_smoke.py --steps 6 --response-tokens 2048

What runs: a Qwen2-shaped random model of Qwen2.5-0.5B's shape (hidden 896, 24 layers, 14 / 2 heads, MLP 4864,
the real 151,936-token vocabulary; ~0.49B parameters, built here, nothing downloaded) with the project's tokenizer,
trained by `trapo fit`'s own CLI (`build_cli`, on a config written to a temporary folder) with what
configs/trapo_qwen2.5_math_7b.yaml uses, on one rank: vLLM colocated (`VLLMEngine`, `enable_sleep_mode: true`,
`gpu_memory_utilization` 0.3), `precision: bf16-mixed`, `ModelParallelStrategy` (FSDP2, a 1 x 1 mesh) and the
`VLLMRolloutRefresh` callback after every step; the paper's loss and micro-groups on the synthetic task.

What it prints, per step and as medians over the steps after the first: step seconds (with the module's own
rollout / forward / backward / optimizer split), the weight refresh's seconds and bytes (`VLLMRolloutRefresh`),
`train/rollout_logp_mismatch` (vLLM's sampler log-probs against the trainer's, bf16 both), and peak GPU memory:
`torch.cuda.max_memory_allocated` / `max_memory_reserved` (PyTorch's allocator: training, plus whatever vLLM
allocates through it) and the device's used memory at its highest step end (`mem_get_info`: everything on the GPU,
vLLM's pool and the CUDA contexts included); then `trapo plan`'s prediction for the same config, or "plan
unavailable" where this checkout has no `trapo plan`.

Without a CUDA device it prints why and exits with status 0 (so it can be smoke-imported and run on CPU).
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# Qwen2.5-0.5B's shape (its config.json), random weights.
QWEN2_0_5B = dict(
    hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2,
    vocab_size=151_936, max_position_embeddings=32768, rope_theta=1_000_000.0, rms_norm_eps=1e-6,
    tie_word_embeddings=True,
)
GIB = 1 << 30


def write_model(folder: Path) -> Path:
    """The random ~0.5B Qwen2, float32 (the master weights of bf16-mixed)."""
    from real_shape import write_qwen2  # benchmarks/ is on the path when this file runs as a script

    return write_qwen2(folder, **QWEN2_0_5B)


def write_config(folder: Path, model: Path, args: argparse.Namespace) -> Path:
    """A `trapo fit` config: the 7B config's engine, precision, strategy and refresh, at smoke-test size."""
    text = f"""\
seed_everything: 0
model:
  policy:
    class_path: trapo_lightning.models.PretrainedFolder
    init_args: {{path: {model}}}
  rollout:
    class_path: trapo_lightning.rollout.VLLMEngine
    init_args:
      dtype: bfloat16
      gpu_memory_utilization: {args.gpu_memory_utilization}
      max_model_len: {args.prompt_tokens + args.response_tokens}
      enable_sleep_mode: true
      enforce_eager: {str(args.enforce_eager).lower()}
  optimizer:
    class_path: torch.optim.AdamW
    init_args: {{lr: 1.0e-6}}
  max_prompt_tokens: {args.prompt_tokens}
  max_response_tokens: {args.response_tokens}
  micro_batch_size: 8
  max_tokens_per_micro_batch: {args.micro_batch_tokens}
data:
  source:
    class_path: trapo_lightning.data.sources.SyntheticSource
    init_args: {{train_size: 512, val_size: 8}}
  prompts_per_step: {args.prompts}
  val_batch_size: 8
trainer:
  accelerator: gpu
  devices: 1
  strategy:
    class_path: lightning.pytorch.strategies.ModelParallelStrategy
    init_args: {{data_parallel_size: 1, tensor_parallel_size: 1}}
  precision: bf16-mixed
  max_steps: {args.steps}
  limit_val_batches: 0
  num_sanity_val_steps: 0
  logger: false
  enable_checkpointing: false
  enable_progress_bar: false
  callbacks:
    - class_path: trapo_lightning.callbacks.VLLMRolloutRefresh
      init_args: {{every_n_steps: 1}}
"""
    path = folder / "smoke.yaml"
    path.write_text(text)
    return path


def make_probe():
    """A callback that times each step on the GPU and reads the metrics the module and the refresh report."""
    import lightning as L
    import torch
    from trapo_lightning.callbacks import VLLMRolloutRefresh

    class SmokeProbe(L.Callback):
        def __init__(self) -> None:
            self.steps: list[dict] = []
            self.device_used_peak = 0
            self.start = 0.0

        def _refresh(self, trainer) -> VLLMRolloutRefresh:
            return next(c for c in trainer.callbacks if isinstance(c, VLLMRolloutRefresh))

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            torch.cuda.synchronize()
            self.start = time.perf_counter()

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            torch.cuda.synchronize()
            seconds = time.perf_counter() - self.start
            free, total = torch.cuda.mem_get_info()
            self.device_used_peak = max(self.device_used_peak, total - free)
            metrics = {k: float(v) for k, v in outputs["metrics"].items()
                       if k.startswith("time/") or k == "train/rollout_logp_mismatch"}
            self.steps.append(dict(step_s=seconds, **metrics))

        def on_train_end(self, trainer, pl_module):
            # The refresh runs in its own on_train_batch_end, possibly after ours: read its records at the end.
            self.refresh = self._refresh(trainer).last

    return SmokeProbe()


def fit(config: Path):
    """`trapo fit --config <config>` through the CLI's own parser, with the probe added to the Trainer."""
    from trapo_lightning.cli import build_cli

    cli = build_cli(["fit", "--config", str(config)], run=False)
    probe = make_probe()
    cli.trainer.callbacks.append(probe)
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    return probe


def plan(config: Path, model: Path, gpu_gib: float) -> str:
    """`trapo plan`'s prediction for the same config and GPU, if this checkout has the command."""
    if importlib.util.find_spec("trapo_lightning.plan") is None:
        return "plan unavailable (this checkout has no `trapo plan`)"
    command = [sys.executable, "-m", "trapo_lightning.cli", "plan", "--config", str(config),
               "--gpu-memory-gb", f"{gpu_gib:.0f}", "--model-config", str(model / "config.json")]
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode not in (0, 1):  # 1: the plan says it does not fit, which is still a plan
        return f"plan unavailable (`{' '.join(command[2:])}` failed: {(done.stderr or done.stdout).strip()[-400:]})"
    return done.stdout.strip()


def summary(probe, elapsed: float) -> None:
    import torch

    steps = probe.steps[1:] or probe.steps  # the first step pays for compilation and allocator warm-up

    def med(key: str) -> float:
        return statistics.median(s.get(key, float("nan")) for s in steps)

    print(f"\n== GPU smoke: {len(probe.steps)} steps in {elapsed:.0f} s wall ({torch.cuda.get_device_name()})")
    for i, s in enumerate(probe.steps):
        print(f"step {i}: " + ", ".join(f"{k} {v:.4g}" for k, v in s.items()))
    print(f"median step (steps 1..): {med('step_s'):.2f} s; rollout {med('time/rollout_s'):.2f} s, forward "
          f"{med('time/forward_s'):.2f} s, backward {med('time/backward_s'):.2f} s, optimizer "
          f"{med('time/optimizer_s'):.2f} s")
    print(f"train/rollout_logp_mismatch (median): {med('train/rollout_logp_mismatch'):.4g}")
    refresh = getattr(probe, "refresh", None)
    if refresh is not None:
        print(f"weight refresh (last): {refresh.seconds:.2f} s for {refresh.nbytes / GIB:.2f} GiB, version "
              f"{refresh.version}")
    print(f"peak GPU memory: allocated {torch.cuda.max_memory_allocated() / GIB:.2f} GiB, reserved "
          f"{torch.cuda.max_memory_reserved() / GIB:.2f} GiB (PyTorch's allocator); device used at the highest "
          f"step end {probe.device_used_peak / GIB:.2f} GiB (all of the GPU: vLLM's pool and CUDA contexts too)")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=4, help="optimizer steps (the first is reported, not counted)")
    parser.add_argument("--prompts", type=int, default=4, help="prompts per step (x 8 rollouts each)")
    parser.add_argument("--prompt-tokens", type=int, default=256, help="model.max_prompt_tokens")
    parser.add_argument("--response-tokens", type=int, default=1024,
                        help="model.max_response_tokens: a random model rarely samples EOS, so most rows run to it")
    parser.add_argument("--micro-batch-tokens", type=int, default=16384, help="model.max_tokens_per_micro_batch")
    parser.add_argument("--gpu-memory-utilization", type=float, default=0.3, help="vLLM's share of the GPU")
    parser.add_argument("--enforce-eager", action=argparse.BooleanOptionalAction, default=True,
                        help="vLLM without CUDA graphs: starts in seconds (--no-enforce-eager: faster decoding)")
    parser.add_argument("--workdir", help="where the model and config go (default: a temporary folder)")
    args = parser.parse_args(argv)

    import torch

    if not torch.cuda.is_available():
        print("gpu_smoke: no CUDA device here; this check needs one GPU (nothing was run).")
        return 0
    if importlib.util.find_spec("vllm") is None:
        print("gpu_smoke: vLLM is not installed; pip install -e '.[vllm]' first.", file=sys.stderr)
        return 1
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="trapo-gpu-smoke-") as tmp:
        folder = Path(args.workdir or tmp)
        folder.mkdir(parents=True, exist_ok=True)
        model = write_model(folder / "model")
        config = write_config(folder, model, args)
        print(f"model and config in {folder}; built in {time.perf_counter() - start:.0f} s", flush=True)
        probe = fit(config)
        summary(probe, time.perf_counter() - start)
        total_gib = torch.cuda.get_device_properties(0).total_memory / GIB
        print(f"\n== trapo plan --gpu-memory-gb {total_gib:.0f} for the same config:\n{plan(config, model, total_gib)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
