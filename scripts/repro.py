"""The small-scale reproduction (docs/results.md): every method at its best learning rate, several seeds, two tasks.

    python scripts/repro.py                                   # the whole protocol, two runs at a time
    python scripts/repro.py --tasks three --seeds 0 1 2 --lrs 1e-5 3e-5 1e-4 3e-4 --max-steps 100 --jobs 2
    python scripts/repro_table.py                             # the table, with bootstrap intervals

What it runs (issue 14), all from one base model (configs/repro/base_sft.yaml, built once):
1. **Learning-rate sweep** on the first seed: every method at every rate of `--lrs`. SFT-then-RL sweeps its SFT
   stage first (each rate trained to convergence on the held-out SFT loss, configs/repro/sft_stage.yaml; the rate
   with the lowest loss is kept), then its RL stage from that model at every rate.
2. **Best rate** per method: the highest mean validation accuracy over the run's last two validations (1 sample
   per problem at T = 0.6), written to `<root>/<task>/best_lr.json`. Tasks after the first may reuse the first
   task's rates (`--sweep-tasks`; `--rates-from` reads them from an earlier invocation), which halves the cost.
3. **Seeds**: the other seeds at each method's best rate.
4. **Held-out test** of every best-rate run (configs/repro/test.yaml): 8 answers per problem, verdicts in
   `test_completions.jsonl`, from which scripts/repro_table.py bootstraps intervals over problems and seeds.

Runs are skipped when finished (a `done` file in their folder), so an interrupted reproduction picks up where it
stopped. Logs: `<root>/<task>/<method>/lr<lr>/seed<S>/version_0/`.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from trapo_lightning.plots import read_metrics

METHODS = ("trapo", "grpo", "sft", "luffy", "trapo_plain_sft", "sft_then_rl")
TASKS = {"three": [], "four": ["configs/repro/four_operands.yaml"]}
"""Task name -> configs added after common.yaml: three one-digit operands (the base solves about a third), four
(the base solves few)."""
COMMON = "configs/repro/common.yaml"
BASE = "configs/repro/base_sft.yaml"


@dataclass(frozen=True)
class Job:
    """One command and the folder it logs to; `run_jobs` runs a phase's jobs, phases one after another."""

    name: str
    folder: Path
    command: list[str] = field(hash=False)

    def done(self) -> bool:
        return (self.folder / "done").is_file()


def run_jobs(jobs: list[Job], workers: int, log_dir: Path) -> None:
    """Run the unfinished jobs, `workers` at a time; stop at the first failure (its log is named)."""
    todo = [job for job in jobs if not job.done()]
    if not todo:
        return
    log_dir.mkdir(parents=True, exist_ok=True)

    def one(job: Job) -> None:
        shutil.rmtree(job.folder, ignore_errors=True)  # a run killed half-way starts again, not as version_1
        log = log_dir / (job.name.replace("/", "_") + ".log")
        print(f"[repro] start {job.name}", flush=True)
        with log.open("w") as out:
            status = subprocess.run(job.command, stdout=out, stderr=subprocess.STDOUT, env=_env(),
                                    check=False).returncode
        if status != 0:
            raise RuntimeError(f"{job.name} failed (exit {status}); see {log}")
        job.folder.mkdir(parents=True, exist_ok=True)
        (job.folder / "done").write_text("")
        print(f"[repro] done  {job.name}", flush=True)

    with ThreadPoolExecutor(workers) as pool:
        for future in [pool.submit(one, job) for job in todo]:
            future.result()


def _env() -> dict[str, str]:
    # One thread per run: on 2 shared cores two threads can be 10x slower than one.
    return {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"), "WANDB_MODE": "offline"}


def lr_name(lr: float) -> str:
    return f"lr{lr:g}"


class Plan:
    """The commands of one task; folders under `<root>/<task>`."""

    def __init__(self, root: Path, task: str, max_steps: int) -> None:
        self.root, self.task, self.max_steps = root, task, max_steps
        self.configs = [COMMON, *TASKS[task]]

    def folder(self, method: str, lr: float, seed: int) -> Path:
        return self.root / self.task / method / lr_name(lr) / f"seed{seed}"

    def _fit(self, method: str, config: str, lr: float, seed: int, extra: list[str], tool: list[str]) -> Job:
        name = f"{self.task}/{method}/{lr_name(lr)}/seed{seed}"
        args = [arg for c in (*self.configs, config) for arg in ("--config", c)]
        args += ["--seed_everything", str(seed), "--data.seed", str(seed), "--model.optimizer.init_args.lr", str(lr),
                 "--trainer.logger.init_args.save_dir", str(self.root / self.task),
                 "--trainer.logger.init_args.name", f"{method}/{lr_name(lr)}/seed{seed}", *extra]
        return Job(name, self.folder(method, lr, seed), [*tool, *args])

    def train(self, method: str, lr: float, seed: int, sft_lr: float | None = None) -> Job:
        steps = ["--trainer.max_steps", str(self.max_steps)]
        if method != "sft_then_rl":
            return self._fit(method, f"configs/repro/{method}.yaml", lr, seed, steps, ["trapo", "fit"])
        start = self.folder("sft_stage", sft_lr, seed) / "model"
        return self._fit(method, "configs/repro/grpo.yaml", lr, seed,
                         [*steps, "--model.policy.init_args.path", str(start)], ["trapo", "fit"])

    def sft_stage(self, lr: float, seed: int) -> Job:
        out = self.folder("sft_stage", lr, seed) / "model"
        tool = [sys.executable, "scripts/fit_and_save.py", "--best", "--out", str(out)]
        return self._fit("sft_stage", "configs/repro/sft_stage.yaml", lr, seed, [], tool)

    def test(self, method: str, lr: float, seed: int) -> Job:
        """The run's last checkpoint on this task's held-out problems."""
        run = self.folder(method, lr, seed)
        checkpoints = sorted((run / "version_0" / "checkpoints").glob("*.ckpt"))
        checkpoint = str(checkpoints[-1]) if checkpoints else str(run / "version_0" / "checkpoints" / "missing.ckpt")
        return self._test(f"{method}/{lr_name(lr)}/seed{seed}", run,
                          ["--seed_everything", str(seed), "--ckpt_path", checkpoint])

    def base_test(self) -> Job:
        """The base model itself (no checkpoint) on this task's held-out problems."""
        return self._test("base", self.root / self.task / "base", [])

    def _test(self, name: str, run: Path, extra: list[str]) -> Job:
        args = [arg for c in (*self.configs, "configs/repro/test.yaml") for arg in ("--config", c)]
        args += [*extra, "--trainer.logger.init_args.save_dir", str(run), "--trainer.logger.init_args.name", "test"]
        return Job(f"{self.task}/{name}/test", run / "test", ["trapo", "test", *args])


def final_val_accuracy(run: Path) -> float:
    """Mean validation accuracy over the run's last two validations."""
    points = read_metrics(run).get("val/accuracy", [])
    if not points:
        raise RuntimeError(f"{run} logged no val/accuracy")
    return statistics.mean(v for _, v in points[-2:])


def best_sft_loss(run: Path) -> float:
    points = read_metrics(run).get("val/expert_nll", [])
    if not points:
        raise RuntimeError(f"{run} logged no val/expert_nll")
    return min(v for _, v in points)


def reproduce(args: argparse.Namespace) -> None:
    root, logs = Path(args.root), Path(args.root) / "logs"
    base = Job("base", root / "base", [sys.executable, "scripts/fit_and_save.py", "--out", str(root / "base"),
                                        "--config", BASE])
    run_jobs([base], 1, logs)
    rates: dict[str, float] = {}
    if args.rates_from:  # a task swept in an earlier invocation, or a JSON file of rates
        given = Path(args.rates_from)
        rates = json.loads((given if given.suffix == ".json" else root / args.rates_from / "best_lr.json").read_text())
    for task in args.tasks:
        plan = Plan(root, task, args.max_steps)
        best_file = root / task / "best_lr.json"
        sweep_seed, other_seeds = args.seeds[0], args.seeds[1:]
        if task in args.sweep_tasks or not rates:
            sft_lr = None
            if "sft_then_rl" in args.methods:
                run_jobs([plan.sft_stage(lr, sweep_seed) for lr in args.lrs], args.jobs, logs)
                sft_lr = min(args.lrs, key=lambda lr: best_sft_loss(plan.folder("sft_stage", lr, sweep_seed)))
            run_jobs([plan.train(m, lr, sweep_seed, sft_lr) for m in args.methods for lr in args.lrs], args.jobs, logs)
            rates = {m: max(args.lrs, key=lambda lr: final_val_accuracy(plan.folder(m, lr, sweep_seed)))
                     for m in args.methods}
            if sft_lr is not None:
                rates["sft_stage"] = sft_lr
            seeds = other_seeds
        else:
            seeds = args.seeds
        best_file.parent.mkdir(parents=True, exist_ok=True)
        best_file.write_text(json.dumps(rates, indent=1) + "\n")
        print(f"[repro] {task}: best rates {rates}", flush=True)
        if "sft_then_rl" in args.methods:
            run_jobs([plan.sft_stage(rates["sft_stage"], s) for s in seeds], args.jobs, logs)
        run_jobs([plan.train(m, rates[m], s, rates.get("sft_stage")) for s in seeds for m in args.methods],
                 args.jobs, logs)
        run_jobs([plan.base_test(), *(plan.test(m, rates[m], s) for s in args.seeds for m in args.methods)],
                 args.jobs, logs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", default="runs/repro")
    parser.add_argument("--tasks", nargs="+", choices=sorted(TASKS), default=["three", "four"])
    parser.add_argument("--sweep-tasks", nargs="*", default=["three"],
                        help="tasks that sweep the learning rate; the others reuse the previous task's best rates")
    parser.add_argument("--rates-from",
                        help="rates from this task's best_lr.json (an earlier invocation's sweep) or a .json file")
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2], help="the first one also sweeps")
    parser.add_argument("--lrs", nargs="+", type=float, default=[1e-5, 3e-5, 1e-4, 3e-4])
    parser.add_argument("--max-steps", type=int, default=150, help="optimizer steps of every run (RL stage)")
    parser.add_argument("--jobs", type=int, default=2, help="runs at a time")
    reproduce(parser.parse_args())


if __name__ == "__main__":
    main()
