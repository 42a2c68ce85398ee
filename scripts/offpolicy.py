"""Issue 12's measurement: how stale vLLM rollouts hurt the embedded default, and what the correction buys back.

    python scripts/offpolicy.py [--steps 200] [--seeds 0 1] [--root runs/offpolicy]

The embedded default (configs/trapo.yaml) with the vLLM engine (float32, eager, a 1 GiB KV cache, on CPU), its
weights refreshed after every optimizer step (on-policy up to the sampler's numerics) or every 4 steps (rollouts up
to 3 steps stale), each without and with the rollout importance-sampling correction (token-level, truncated at 2: verl's
default form; `model.loss.init_args.rollout_correction`), for each seed. It prints, per setting, the held-out
accuracy at every validation (mean over seeds), the mean |log pi_train - log pi_rollout| of the policy's tokens
(`train/rollout_logp_mismatch`), the mean importance weight and the share of truncated tokens. Runs that finished
(a `done` file) are skipped; scripts/repro.py's `run_jobs` runs the others, one at a time.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

from repro import Job, run_jobs  # scripts/ is on the path when run as a script
from trapo_lightning.plots import read_metrics

CORRECTION = ('{"class_path": "trapo_lightning.importance.RolloutCorrection", '
              '"init_args": {"level": "token", "mode": "truncate", "cap": 2.0}}')
SETTINGS = {  # name -> (refresh every n steps, correction)
    "refresh1": (1, False),
    "refresh1_corrected": (1, True),
    "refresh4": (4, False),
    "refresh4_corrected": (4, True),
}


def command(root: Path, name: str, seed: int, steps: int) -> list[str]:
    every, corrected = SETTINGS[name]
    args = ["trapo", "fit", "--config", "configs/trapo.yaml", "--seed_everything", str(seed), "--data.seed", str(seed),
            "--trainer.max_steps", str(steps), "--trainer.val_check_interval", "25",
            "--model.rollout", ('{"class_path": "trapo_lightning.rollout.VLLMEngine", '
                                '"init_args": {"dtype": "float32", "enforce_eager": true, "kv_cache_gib": 1.0}}'),
            "--model.max_rollout_staleness", str(every - 1),
            "--trainer.callbacks", ('[{"class_path": "trapo_lightning.callbacks.ValidateOnStart"}, '
                                    '{"class_path": "trapo_lightning.callbacks.VLLMRolloutRefresh", '
                                    f'"init_args": {{"every_n_steps": {every}}}}}]'),
            "--trainer.logger.init_args.save_dir", str(root), "--trainer.logger.init_args.name", f"{name}/seed{seed}",
            "--trainer.enable_checkpointing", "false"]
    return args + (["--model.loss.init_args.rollout_correction", CORRECTION] if corrected else [])


def job(root: Path, name: str, seed: int, steps: int) -> Job:
    return Job(f"offpolicy/{name}/seed{seed}", root / name / f"seed{seed}", command(root, name, seed, steps))


def mean_over_runs(series: list[dict], key: str) -> str:
    values = [v for s in series for _, v in s.get(key, [])]
    return f"{statistics.mean(values):.3g}" if values else "-"


def table(root: Path, seeds: list[int]) -> None:
    rows = {name: [read_metrics(root / name / f"seed{s}" / "version_0") for s in seeds] for name in SETTINGS}
    steps = [step for step, _ in rows["refresh1"][0]["val/accuracy"]]
    print("| setting | " + " | ".join(f"val@{s + 1 if s else 0}" for s in steps)
          + " | logp mismatch | IS weight mean | truncated share |")
    print("|---|" + "---|" * (len(steps) + 3))
    for name, series in rows.items():
        val = [statistics.mean(dict(s["val/accuracy"]).get(step, float("nan")) for s in series) for step in steps]

        logged = [mean_over_runs(series, key) for key in
                  ("train/rollout_logp_mismatch", "train/rollout_is_mean", "train/rollout_is_rejected")]
        print(f"| {name} | " + " | ".join(f"{v:.3f}" for v in val) + " | " + " | ".join(logged) + " |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", type=Path, default=Path("runs/offpolicy"))
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    args = parser.parse_args()
    run_jobs([job(args.root, name, seed, args.steps) for seed in args.seeds for name in SETTINGS], 1,
             args.root / "logs")
    table(args.root, args.seeds)
    print(f"curves: trapo plot {' '.join(str(args.root / n / f'seed{args.seeds[0]}') for n in SETTINGS)} "
          f"--out docs/results/offpolicy", file=sys.stderr)


if __name__ == "__main__":
    main()
