"""Seconds per optimizer step: our TRAPO step, our plain-GRPO step and TRL's GRPOTrainer step (issue 6).

    python benchmarks/step_time.py                       # both model sizes, all three systems, table + phases
    python benchmarks/step_time.py --models tiny --repeats 3
    python benchmarks/step_time.py --profile trapo --models large   # cProfile of our step instead of the table
    python benchmarks/step_time.py --scenario realistic --max-tokens 1024   # real vocabulary, long-tailed lengths

The default (short) scenario is described below; the realistic one (long prompts, completions of drawn lengths
forced alike on both sides, Qwen's 151,936-token vocabulary) in benchmarks/step_lengths.py.

Run it from the bench environment (`pip install -e ".[test,bench]"`); without TRL installed the `trl` row is skipped.

What is compared, and why it is a fair fight:
- Same model folder (TinyRandomQwen2: the default config's 0.8M-parameter shape, and a ~30M-parameter Qwen2 of
  the same family and tokenizer), float32, same prompts (synthetic arithmetic through the paper's prompt and the
  tokenizer's chat template), 8 prompts x G = 8 completions per optimizer step, temperature 1.0, top-p 1, no top-k.
- Equal generation work: `min_new_tokens = max_new_tokens` on both sides (EOS suppressed until the budget), so
  every on-policy completion is exactly `max_new_tokens` long whatever the random weights sample. Otherwise the
  step time would measure when a random model happens to sample EOS, not the trainers.
- One optimizer step = one rollout batch: ours with `micro_batch_size` = 64 (one forward/backward), TRL with
  per_device_train_batch_size 64, num_generations 8, gradient_accumulation_steps 1, steps_per_generation 1,
  num_iterations 1 (so TRL skips its old-logprob forward, as we do), beta 0 (no reference forward on either side),
  loss_type dr_grpo, scale_rewards none (Dr.GRPO advantages), entropy bonus 0.001 on both, AdamW (lr, betas,
  weight decay 0.01 as torch's default), constant LR, grad clip 1.0, no bf16/fp16, no vLLM, CPU, and no gradient
  checkpointing (TRL turns it on by default; `trl-gc` is that default, which recomputes the forward in backward).
- Same reward: our `MathVerifyReward`, wrapped as a TRL reward function.
- `grpo` is our module with `NoGuidance` (one unguided micro-group of 8). `trapo` is the paper's micro-groups: on a
  random policy every reward is 0, so each prompt gets 4 unguided + 2 at prefix 0.25 + 1 at 0.5 + the full expert
  solution, in three sequential `generate` calls; its generated-token count is therefore lower than GRPO's.

Timing: every system runs in its own process (so peak RSS is its own), and the parent lets them take one step at a
time in turn, rotating the order every round, so machine noise spreads over all systems alike. A step is timed
from Lightning's `on_train_batch_start` to `on_train_batch_end` (TRL: `on_step_begin` to `on_step_end`), after the
batch is fetched. The first `--warmup` steps are dropped. Weight refresh is 0 for both: HF `generate` samples the
live module.
"""

from __future__ import annotations

import argparse
import cProfile
import json
import multiprocessing as mp
import pstats
import resource
import statistics
import sys
import tempfile
import time
import warnings
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from real_shape import write_model
from step_lengths import LengthMix, LongSource, force_lengths

MODELS = {
    # configs/trapo.yaml's policy until it moved to one layer (TinyRandomQwen2 defaults: hidden 128, 4 layers)
    "tiny": dict(hidden_size=128, num_layers=4, num_heads=4, num_kv_heads=2, intermediate_size=384),
    # same family and tokenizer, ~30M parameters
    "large": dict(hidden_size=512, num_layers=8, num_heads=8, num_kv_heads=2, intermediate_size=2048),
}
REAL_VOCAB_MODEL = dict(hidden=64, layers=2)  # the realistic scenario's policy: Qwen2, 151,936-token vocabulary
SYSTEMS = ("trapo", "grpo", "trl", "trl-gc")
DEFAULT_SYSTEMS = ("trapo", "grpo", "trl")


@dataclass(frozen=True)
class Setup:
    """Everything both trainers share; defaults follow configs/trapo.yaml as it was measured (8 prompts a step)."""

    model: str
    model_dir: str
    prompts_per_step: int = 8
    group_size: int = 8
    max_prompt_tokens: int = 128
    max_new_tokens: int = 24
    lr: float = 3e-3
    betas: tuple[float, float] = (0.9, 0.98)
    weight_decay: float = 0.01  # torch.optim.AdamW's default, which our configs use
    temperature: float = 1.0
    entropy_coef: float = 0.001
    threads: int = 1
    steps: int = 6
    dataset_size: int = 512
    task: dict = field(default_factory=lambda: dict(num_operands=3, digits=1, work="direct"))
    lengths: LengthMix | None = None
    """None: every completion exactly `max_new_tokens` (the short scenario); else long prompts (`LongSource`) and
    completions of drawn lengths up to `lengths.max_tokens`, forced alike on both sides (`step_lengths.py`)."""
    max_tokens_per_micro_batch: int | None = None

    @property
    def sequences(self) -> int:
        return self.prompts_per_step * self.group_size


def policy_source(setup: Setup):
    from trapo_lightning.models import PretrainedFolder, TinyRandomQwen2

    if setup.model == "real":
        folder = Path(setup.model_dir)
        if not (folder / "config.json").exists():
            write_model(folder, **REAL_VOCAB_MODEL)
        return PretrainedFolder(str(folder))
    return TinyRandomQwen2(path=setup.model_dir, max_position_embeddings=1024, **MODELS[setup.model])


def quiet() -> None:
    warnings.filterwarnings("ignore")  # min_new_tokens > a guided row's budget warns on every generate call
    import logging

    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    for name in ("lightning", "lightning.pytorch", "lightning.fabric"):
        logging.getLogger(name).setLevel(logging.ERROR)


class StepClock:
    """The worker's side of the turn-taking: announce readiness, wait for the go, time the step, report it."""

    def __init__(self, conn) -> None:
        self.conn = conn
        self.start = 0.0
        self.records: list[dict] = []

    def begin(self) -> None:
        if self.conn is not None:
            self.conn.send("ready")
            if self.conn.recv() != "go":
                raise RuntimeError("benchmark parent sent something other than 'go'")
        self.start = time.perf_counter()

    def end(self, phases: dict[str, float], generated_tokens: int) -> None:
        record = dict(step_s=time.perf_counter() - self.start, generated_tokens=generated_tokens, **phases)
        self.records.append(record)
        if self.conn is not None:
            self.conn.send(record)


# -- ours -------------------------------------------------------------------------------------------------------------
def run_ours(setup: Setup, guided: bool, clock: StepClock) -> None:
    import lightning as L
    import torch

    from trapo_lightning.guidance import MicroGroupGuidance, NoGuidance
    from trapo_lightning.losses import TrapoLoss
    from trapo_lightning.module import TrapoModule

    class Timing(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            clock.begin()

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            metrics = outputs["metrics"]
            phases = {
                "rollout_s": metrics.get("time/rollout_s", 0.0),
                "forward_s": metrics.get("time/forward_s", 0.0),
                "backward_s": metrics.get("time/backward_s", 0.0),
                "optimizer_s": metrics.get("time/optimizer_s", 0.0),
            }
            clock.end(phases, sum(len(s.rollout_logprobs) for s in outputs["samples"]))

    source = policy_source(setup)
    module = TrapoModule(
        policy=source,
        guidance=MicroGroupGuidance() if guided else NoGuidance(setup.group_size),
        optimizer=partial(torch.optim.AdamW, lr=setup.lr, betas=setup.betas, weight_decay=setup.weight_decay),
        max_prompt_tokens=setup.max_prompt_tokens,
        max_response_tokens=setup.max_new_tokens,
        rollout_temperature=setup.temperature,
        # configs/trapo.yaml's alpha for a random-init policy
        loss=TrapoLoss(trust_region_alpha=0.001, entropy_coef=setup.entropy_coef),
        micro_batch_size=setup.sequences,
        max_tokens_per_micro_batch=setup.max_tokens_per_micro_batch,
        rollout_seed=0,
    )
    module.configure_model()
    if setup.lengths is None:
        module.policy.generation_config.min_new_tokens = setup.max_new_tokens  # equal work: see the module docstring
    else:
        force_lengths(module.policy, setup.lengths, module.tokenizer.eos_token_id, module.tokenizer.pad_token_id)
    data = data_module(setup, source)
    trainer = L.Trainer(
        accelerator="cpu", devices=1, max_steps=setup.steps, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0,
        callbacks=[Timing()],
    )
    trainer.fit(module, datamodule=data)


def data_module(setup: Setup, source):
    from trapo_lightning.data.datamodule import TrapoDataModule
    from trapo_lightning.data.sources import SyntheticSource
    from trapo_lightning.data.synthetic import SyntheticArithmetic

    records = (SyntheticSource(SyntheticArithmetic(**setup.task), train_size=setup.dataset_size, val_size=8)
               if setup.lengths is None else LongSource(setup.lengths, train_size=setup.dataset_size))
    return TrapoDataModule(
        policy=source, source=records, prompts_per_step=setup.prompts_per_step, val_batch_size=4,
        max_prompt_tokens=setup.max_prompt_tokens, max_response_tokens=setup.max_new_tokens,
    )


def our_order(setup: Setup) -> list:
    """The training records in the order our data stream hands them out (its seeded shuffle), so TRL, which
    takes its dataset in order, sees the same prompts at the same step."""
    data = data_module(setup, policy_source(setup))
    data.setup("fit")
    by_problem = {r.problem: r for r in data.source.load("train")[0]}
    order = []
    for batch in data.streams["train"]:
        order += [by_problem[r.problem] for r in batch.records]
        if len(order) >= setup.prompts_per_step * setup.steps:
            return order
    return order


# -- TRL --------------------------------------------------------------------------------------------------------------
def run_trl(setup: Setup, clock: StepClock, gradient_checkpointing: bool = False) -> None:
    from transformers import TrainerCallback
    from trl import GRPOTrainer

    from trapo_lightning.reward import MathVerifyReward

    grader = MathVerifyReward()

    def math_verify_reward(completions, answer, **kwargs) -> list[float]:
        texts = [c[-1]["content"] if isinstance(c, list) else c for c in completions]
        return [result.reward for result in grader(texts, answer)]

    class TimedGRPOTrainer(GRPOTrainer):
        """Charges generation + grading + advantages to `rollout` and the loss forward to `forward`."""

        phases = {"rollout_s": 0.0, "forward_s": 0.0}
        generated_tokens = 0

        def _generate_and_score_completions(self, inputs):
            start = time.perf_counter()
            out = super()._generate_and_score_completions(inputs)
            self.phases["rollout_s"] += time.perf_counter() - start
            self.generated_tokens += int(out["completion_mask"].sum())
            return out

        def compute_loss(self, *args, **kwargs):
            start = time.perf_counter()
            out = super().compute_loss(*args, **kwargs)
            self.phases["forward_s"] += time.perf_counter() - start
            return out

    class Timing(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            clock.begin()
            trainer.phases.update(rollout_s=0.0, forward_s=0.0)
            trainer.generated_tokens = 0

        def on_step_end(self, args, state, control, **kwargs):
            clock.end(dict(trainer.phases), trainer.generated_tokens)

    source = policy_source(setup)
    model, tokenizer = source.load_model(), source.load_tokenizer()
    if setup.lengths is not None:
        force_lengths(model, setup.lengths, tokenizer.eos_token_id, tokenizer.pad_token_id)
    trainer = TimedGRPOTrainer(
        model=model, reward_funcs=[math_verify_reward], args=trl_config(setup, gradient_checkpointing),
        train_dataset=trl_dataset(setup), processing_class=tokenizer, callbacks=[Timing()],
    )
    trainer.train()


def trl_dataset(setup: Setup):
    """The same synthetic problems as ours, as conversational prompts: TRL applies the same chat template."""
    from datasets import Dataset

    from trapo_lightning.data.prompts import PAPER_SYSTEM, PAPER_USER
    from trapo_lightning.data.synthetic import SyntheticArithmetic

    if setup.lengths is None:
        records = SyntheticArithmetic(**setup.task).records("train", setup.dataset_size)
    else:
        records = our_order(setup)
    return Dataset.from_list([
        {
            "prompt": [
                {"role": "system", "content": PAPER_SYSTEM},
                {"role": "user", "content": PAPER_USER.format(problem=r.problem)},
            ],
            "answer": r.answer,
        }
        for r in records
    ])


def trl_config(setup: Setup, gradient_checkpointing: bool):
    """One generation batch = one optimizer step = prompts_per_step x G completions, as in ours."""
    from trl import GRPOConfig

    return GRPOConfig(
        output_dir=tempfile.mkdtemp(prefix="trl-bench-"),
        per_device_train_batch_size=setup.sequences,
        num_generations=setup.group_size,
        gradient_accumulation_steps=1,
        steps_per_generation=1,
        num_iterations=1,
        max_steps=setup.steps,
        max_completion_length=setup.max_new_tokens,
        # the realistic scenario forces each row's length through `force_lengths` instead
        generation_kwargs={"min_new_tokens": setup.max_new_tokens} if setup.lengths is None else {},
        temperature=setup.temperature,
        top_p=1.0,
        top_k=0,
        beta=0.0,
        loss_type="dr_grpo",
        scale_rewards="none",
        entropy_coef=setup.entropy_coef,
        learning_rate=setup.lr,
        adam_beta1=setup.betas[0],
        adam_beta2=setup.betas[1],
        weight_decay=setup.weight_decay,
        optim="adamw_torch",
        lr_scheduler_type="constant",
        max_grad_norm=1.0,
        bf16=False,
        fp16=False,
        gradient_checkpointing=gradient_checkpointing,  # TRL's default is True; we don't recompute activations
        use_cpu=True,
        use_vllm=False,
        report_to="none",
        logging_strategy="no",
        save_strategy="no",
        disable_tqdm=True,
        shuffle_dataset=False,
        dataloader_pin_memory=False,
        seed=0,
    )


# -- worker and parent ------------------------------------------------------------------------------------------------
def run_system(system: str, setup: Setup, clock: StepClock) -> None:
    if system.startswith("trl"):
        run_trl(setup, clock, gradient_checkpointing=system == "trl-gc")
    else:
        run_ours(setup, system == "trapo", clock)


def worker(system: str, setup: Setup, conn) -> None:
    import os

    import torch

    os.dup2(os.open(os.devnull, os.O_WRONLY), 1)  # trainers' own prints would interleave with the table; stderr stays
    quiet()
    torch.set_num_threads(setup.threads)
    run_system(system, setup, StepClock(conn))
    if conn is not None:
        conn.send({"peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024})


def trl_available() -> bool:
    try:
        import trl  # noqa: F401
    except ImportError:
        return False
    return True


def race(systems: list[str], setup: Setup, warmup: int) -> dict[str, dict]:
    """Run the systems in their own processes, one step at a time in rotating order; returns per-system results."""
    ctx = mp.get_context("spawn")
    pipes, procs = {}, {}
    for system in systems:
        parent_end, child_end = ctx.Pipe()
        procs[system] = ctx.Process(target=worker, args=(system, setup, child_end), daemon=True)
        procs[system].start()
        child_end.close()  # so a worker that dies raises EOFError here instead of hanging the parent
        pipes[system] = parent_end
    pending = {s: pipes[s].recv() for s in systems}  # "ready": built and waiting at its first step
    steps = {s: [] for s in systems}
    for round_index in range(setup.steps):
        shift = round_index % len(systems)
        for system in systems[shift:] + systems[:shift]:
            if pending[system] != "ready":
                raise RuntimeError(f"{system} worker ended early: {pending[system]}")
            pipes[system].send("go")
            steps[system].append(pipes[system].recv())
            print(f"  round {round_index} {system}: {steps[system][-1]}", file=sys.stderr, flush=True)
            pending[system] = pipes[system].recv()  # next "ready" (or the final summary): nothing else runs meanwhile
    results = {}
    for system in systems:
        procs[system].join()
        results[system] = dict(steps=steps[system][warmup:], **pending[system])
    return results


def median(values) -> float:
    return statistics.median(values) if values else float("nan")


def param_count(setup: Setup) -> int:
    from safetensors.torch import load_file

    return sum(t.numel() for f in Path(setup.model_dir).glob("*.safetensors") for t in load_file(f).values())


def report(setup: Setup, results: dict[str, dict]) -> None:
    trl_step = median([s["step_s"] for s in results["trl"]["steps"]]) if "trl" in results else None
    lengths = (f"{setup.max_new_tokens} new tokens" if setup.lengths is None else
               f"prompts 100-300 tokens, completions drawn up to {setup.lengths.max_tokens} tokens")
    print(f"\n## {setup.model}: {param_count(setup) / 1e6:.2f}M parameters, {setup.prompts_per_step} prompts x "
          f"{setup.group_size}, {lengths}, {setup.threads} torch thread(s), "
          f"{len(next(iter(results.values()))['steps'])} timed steps per system")
    print("| system | median s/step | min-max s | generated tok/step | generated tok/s | peak RSS MB | ours / TRL |")
    print("|---|---|---|---|---|---|---|")
    for system, result in results.items():
        times = [s["step_s"] for s in result["steps"]]
        tokens = median([s["generated_tokens"] for s in result["steps"]])
        rate = median([s["generated_tokens"] / s["step_s"] for s in result["steps"]])
        ratio = "" if trl_step is None or system.startswith("trl") else f"{median(times) / trl_step:.2f}"
        if ratio and "trl" in results:  # paired per round: the steps of one round ran back to back
            paired = [a["step_s"] / b["step_s"] for a, b in zip(result["steps"], results["trl"]["steps"])]
            ratio += f" (paired {median(paired):.2f})"
        print(f"| {system} | {median(times):.3f} | {min(times):.3f}-{max(times):.3f} | {tokens:.0f} | {rate:.0f} | "
              f"{result['peak_rss_mb']:.0f} | {ratio} |")
    print("\nPhase medians, seconds (weight refresh: 0 for all, HF generate samples the live module):")
    print("| system | rollout (generate + reward) | logprob forward | backward | optimizer | other |")
    print("|---|---|---|---|---|---|")
    for system, result in results.items():
        phase = {k: median([s.get(k, 0.0) for s in result["steps"]]) for k in
                 ("rollout_s", "forward_s", "backward_s", "optimizer_s")}
        # the remainder per step, then its median (medians of parts do not add up to the median of the whole)
        rest = median([s["step_s"] - sum(s.get(k, 0.0) for k in phase) for s in result["steps"]])
        if system.startswith("trl"):  # TRL's loop does not split backward from the optimizer: both are the rest
            print(f"| {system} | {phase['rollout_s']:.3f} | {phase['forward_s']:.3f} | {rest:.3f} (with optimizer) | - | - |")
            continue
        print(f"| {system} | {phase['rollout_s']:.3f} | {phase['forward_s']:.3f} | {phase['backward_s']:.3f} | "
              f"{phase['optimizer_s']:.3f} | {rest:.3f} |")


def profile(system: str, setup: Setup, warmup: int, out: str) -> None:
    """Run one system in this process; cProfile covers the steps after warm-up only."""
    import torch

    quiet()
    torch.set_num_threads(setup.threads)
    profiler = cProfile.Profile()

    class ProfilingClock(StepClock):
        def begin(self) -> None:
            if len(self.records) == warmup:
                profiler.enable()
            super().begin()

    clock = ProfilingClock(None)
    run_system(system, setup, clock)
    profiler.disable()
    profiler.dump_stats(out)
    timed = clock.records[warmup:]
    print(f"{system} on {setup.model}: {len(timed)} profiled steps, median {median([r['step_s'] for r in timed]):.3f} s;"
          f" phases {[{k: round(v, 3) for k, v in r.items()} for r in timed]}")
    stats = pstats.Stats(out)
    stats.sort_stats("tottime").print_stats(25)
    stats.sort_stats("cumulative").print_stats(40)


# -- logprob memory (issue 6, item 3) ---------------------------------------------------------------------------------
def peak_allocated_bytes(fn) -> int:
    """Peak bytes torch allocated on CPU while `fn` ran, above what was live before: the CPU allocator reports every
    allocation and free to the profiler under `profile_memory=True` (tracemalloc and RSS would not see them
    exactly). Same measurement as tests/test_logprobs_memory.py."""
    from torch.profiler import ProfilerActivity, profile as torch_profile

    with torch_profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted((e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"),
                    key=lambda e: e.start_ns())
    live = peak = 0
    for event in events:
        live += event.nbytes()
        peak = max(peak, live)
    return peak


def logprobs_memory(threads: int, batch: int = 2, vocab: int = 4096, lengths=(256, 1024, 4096)) -> None:
    """Peak memory and time of forward + backward through `token_logprobs_and_entropy` (chunks of 1024 rows, the
    default) against log_softmax + gather + entropy on whole [B, T, V] tensors, for bf16 and float32 logits."""
    import torch

    from trapo_lightning.logprobs import token_entropy, token_logprobs, token_logprobs_and_entropy

    torch.set_num_threads(threads)
    variants = {
        "ours (chunked, checkpointed)": token_logprobs_and_entropy,
        "naive (log_softmax on [B,T,V])": lambda logits, targets: (token_logprobs(logits, targets),
                                                                   token_entropy(logits)),
    }
    print(f"\n## logprob + entropy, forward + backward: B={batch}, V={vocab}, {threads} thread(s)")
    print("| logits dtype | T | chunks | float32 [B,T,V] MB | logits MB | variant | peak MB | peak / float32 [B,T,V] | s |")
    print("|---|---|---|---|---|---|---|---|---|")
    for dtype in (torch.bfloat16, torch.float32):
        for length in lengths:
            generator = torch.Generator().manual_seed(0)
            logits = torch.randn(batch, length, vocab, generator=generator).to(dtype)  # [B, T, V]
            targets = torch.randint(0, vocab, (batch, length), generator=generator)  # [B, T]
            float32_btv = batch * length * vocab * 4
            for name, fn in variants.items():
                leaf = logits.clone().requires_grad_(True)

                def step():
                    logprobs, entropy = fn(leaf, targets)
                    (logprobs.sum() + 0.001 * entropy.sum()).backward()

                peak = peak_allocated_bytes(step)
                leaf.grad = None
                start = time.perf_counter()
                step()
                seconds = time.perf_counter() - start
                print(f"| {str(dtype).removeprefix('torch.')} | {length} | {-(-batch * length // 1024)} | "
                      f"{float32_btv / 1e6:.0f} | {leaf.numel() * leaf.element_size() / 1e6:.0f} | {name} | "
                      f"{peak / 1e6:.0f} | {peak / float32_btv:.2f} | {seconds:.2f} |")


def setups(args) -> list[Setup]:
    common = dict(threads=args.threads, steps=args.warmup + args.repeats)
    if args.scenario == "short":
        return [Setup(model=model, model_dir=str(Path(args.model_root) / model), max_new_tokens=args.max_new_tokens,
                      **common) for model in args.models]
    mix = LengthMix(max_tokens=args.max_tokens)
    return [Setup(
        model="real", model_dir=str(Path(args.model_root) / "real_vocab"), prompts_per_step=args.prompts,
        group_size=args.group_size, max_prompt_tokens=320, max_new_tokens=args.max_tokens, lengths=mix,
        max_tokens_per_micro_batch=args.micro_batch_tokens, dataset_size=64, **common,
    )]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", choices=sorted(MODELS), default=["tiny", "large"])
    parser.add_argument("--scenario", choices=("short", "realistic"), default="short",
                        help="realistic: Qwen2 with the real 151,936-token vocabulary, 100-300-token prompts, "
                             "long-tailed completion lengths up to --max-tokens (ignores --models)")
    parser.add_argument("--max-tokens", type=int, default=2048, help="realistic: longest completion")
    parser.add_argument("--prompts", type=int, default=2, help="realistic: prompts per step")
    parser.add_argument("--group-size", type=int, default=8, help="realistic: completions per prompt")
    parser.add_argument("--micro-batch-tokens", type=int, default=8192,
                        help="realistic: our model.max_tokens_per_micro_batch")
    parser.add_argument("--systems", nargs="+", choices=SYSTEMS, default=list(DEFAULT_SYSTEMS),
                        help="trl-gc: TRL with its default gradient checkpointing (recomputes the forward in backward)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps per system")
    parser.add_argument("--repeats", type=int, default=5, help="timed steps per system")
    parser.add_argument("--max-new-tokens", type=int, default=24, help="fixed completion length (both sides)")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads per worker")
    parser.add_argument("--model-root", default="runs/bench_models", help="where the random model folders go")
    parser.add_argument("--profile", choices=SYSTEMS, help="cProfile this system instead of racing")
    parser.add_argument("--profile-out", default="runs/step_time.prof")
    parser.add_argument("--json-out", help="also write every timed step of every system to this JSON file")
    parser.add_argument("--logprobs-memory", action="store_true",
                        help="only the peak-memory table of the logprob computation (no models, no TRL)")
    args = parser.parse_args(argv)
    if args.logprobs_memory:
        logprobs_memory(args.threads)
        return
    systems = [s for s in args.systems if not s.startswith("trl") or trl_available()]
    if systems != args.systems:
        print("trl is not installed (pip install -e '.[bench]'): its row is skipped", file=sys.stderr)
    everything = {}
    for setup in setups(args):
        model = setup.model
        policy_source(setup).resolve()  # written once, here, before the workers race to load it
        if args.profile:
            profile(args.profile, setup, args.warmup, args.profile_out)
            continue
        print(f"running {model}: {systems} x {setup.steps} steps ...", file=sys.stderr, flush=True)
        results = race(systems, setup, args.warmup)
        report(setup, results)
        everything[model] = results
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(everything, indent=1))
    if not args.profile:
        print(f"\nsetup: {asdict(setup) | {'model_dir': args.model_root}}")


if __name__ == "__main__":
    main()
