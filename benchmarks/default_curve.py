"""The embedded default's learning curve and wall time: README's first command, measured.

Runs `trapo fit --config configs/trapo.yaml` (plus any overrides given after `--`) in a fresh folder, so the tiny
model and tokenizer are built as on a new clone, and prints one row per validation: held-out accuracy at
temperature 0.6, and over the training steps since the previous validation the mean unguided reward, the share
of expert-guided samples and the step time. The target (issue 2): the whole fit within 5 minutes on 2 cores,
`val/accuracy` < 5% at the first validation and >= 80% at the last, and the guided share falling.

    python benchmarks/default_curve.py
    python benchmarks/default_curve.py --workdir runs/curve_seed1 -- --seed_everything 1
"""

from __future__ import annotations

import argparse
import csv
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "trapo.yaml"
PHASES = ("time/rollout_s", "time/forward_s", "time/backward_s", "time/optimizer_s")


def curve_rows(metrics_csv: Path) -> list[dict[str, float]]:
    """One row per validation: its step and accuracy, and the means of the training steps since the last one."""
    with metrics_csv.open() as f:
        rows = list(csv.DictReader(f))
    train = [r for r in rows if r.get("train/reward")]
    table, start = [], 0
    for val in (r for r in rows if r.get("val/accuracy")):
        step = int(val["step"])
        if step == 0:  # the validation before training (ValidateOnStart) follows no training step
            window = []
        else:
            window = [r for r in train if start <= int(r["step"]) <= step]
            start = step + 1

        def mean(key: str) -> float:
            return sum(float(r[key]) for r in window) / len(window) if window else float("nan")

        table.append({
            "step": step,
            "val_accuracy": float(val["val/accuracy"]),
            "reward": mean("train/reward"),
            "guided": mean("train/guided_fraction"),
            "step_s": sum(mean(key) for key in PHASES),
        })
    return table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", help="run folder (default: a fresh temporary one)")
    parser.add_argument("overrides", nargs="*", help="extra `trapo fit` arguments, after --")
    args = parser.parse_args()
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="trapo_curve_"))
    workdir.mkdir(parents=True, exist_ok=True)
    command = ["trapo", "fit", "--config", str(CONFIG), *args.overrides]
    start = time.perf_counter()
    with (workdir / "fit.log").open("w") as log:
        done = subprocess.run(command, cwd=workdir, stdout=log, stderr=subprocess.STDOUT)
    wall = time.perf_counter() - start
    if done.returncode != 0:
        sys.exit(f"`{' '.join(command)}` failed ({done.returncode}); see {workdir / 'fit.log'}")
    versions = sorted((workdir / "runs" / "trapo").glob("version_*"), key=lambda p: int(p.name.split("_")[1]))
    table = curve_rows(versions[-1] / "metrics.csv")
    print(f"`{' '.join(command)}` in {workdir}: {wall:.0f} s wall for the whole fit\n")
    print("| step | val/accuracy | unguided reward | guided share | step s |")
    print("|---:|---:|---:|---:|---:|")
    for row in table:
        cells = [f"{row[key]:.3f}" if row[key] == row[key] else "-" for key in ("val_accuracy", "reward", "guided")]
        step_s = f"{row['step_s']:.2f}" if row["step_s"] == row["step_s"] else "-"  # NaN before the first step
        print(f"| {row['step']} | {' | '.join(cells)} | {step_s} |")


if __name__ == "__main__":
    main()
